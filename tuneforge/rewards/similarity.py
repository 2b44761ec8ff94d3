"""Text-similarity metrics for the ``text_similarity`` grader, in pure Python.

All scores lie in [0, 1]. The definitions follow the common reference implementations so that rewards
mean what users expect:

- ``fuzzy_match``: normalised Indel similarity of the two strings, ``2·LCS / (len(a) + len(b))`` over
  characters (what rapidfuzz's ``fuzz.ratio`` reports, divided by 100).
- ``bleu``: sentence BLEU-4 with brevity penalty, uniform weights, sacreBLEU's "exp" smoothing and
  effective order (orders longer than the output are skipped), over word/punctuation tokens.
- ``rouge_1`` … ``rouge_5``: n-gram overlap F1; ``rouge_l``: longest-common-subsequence F1; both over
  lower-cased Unicode word tokens (rouge-score's tokeniser, without dropping non-ASCII letters). As in
  rouge-score, a text with fewer than n words has no n-grams, so ``rouge_4`` of a 3-word answer is 0
  even against itself: prefer ``rouge_1``/``rouge_l`` for short answers.

LCS uses the bit-parallel algorithm (one big-integer operation per symbol of the second sequence), so
fuzzy matching two 2,000-character answers costs milliseconds, not seconds.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Hashable, Sequence

from tuneforge.errors import RecipeError, suggest

_BLEU_TOKEN = re.compile(r"\w+|[^\w\s]")
_ROUGE_TOKEN = re.compile(r"[^\W_]+")

UNSUPPORTED = {
    "gleu": "Google-BLEU is not implemented",
    "meteor": "METEOR needs WordNet synonym data",
    "cosine": "cosine similarity needs an embedding model",
}


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence (Hyyrö's bit-vector algorithm)."""
    if not a or not b:
        return 0
    if len(b) > len(a):
        a, b = b, a  # the longer sequence becomes the bit-vector: fewer Python-level iterations
    masks: dict[Hashable, int] = {}
    for i, symbol in enumerate(a):
        masks[symbol] = masks.get(symbol, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for symbol in b:
        u = v & masks.get(symbol, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def fuzzy_match(output: str, reference: str) -> float:
    total = len(output) + len(reference)
    return 1.0 if total == 0 else 2.0 * lcs_length(output, reference) / total


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(output: str, reference: str, max_order: int = 4) -> float:
    hyp, ref = _BLEU_TOKEN.findall(output), _BLEU_TOKEN.findall(reference)
    if not hyp or not ref:
        return float(not hyp and not ref)
    log_precision, orders, smooth = 0.0, 0, 1.0
    for n in range(1, max_order + 1):
        total = len(hyp) - n + 1
        if total <= 0:
            break  # effective order: a 2-token answer is judged on 1- and 2-grams only
        ref_counts = _ngrams(ref, n)
        matches = sum(min(c, ref_counts[g]) for g, c in _ngrams(hyp, n).items())
        if matches == 0 and n == 1:
            return 0.0  # nothing in common: smoothing must not invent a score (sacreBLEU stops early too)
        if matches == 0:
            smooth *= 2.0
            precision = 1.0 / (smooth * total)
        else:
            precision = matches / total
        log_precision += math.log(precision)
        orders += 1
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1.0 - len(ref) / len(hyp))
    return brevity * math.exp(log_precision / orders)


def _rouge_tokens(text: str) -> list[str]:
    return _ROUGE_TOKEN.findall(text.lower())


def _f1(overlap: int, n_output: int, n_reference: int) -> float:
    if overlap == 0 or n_output == 0 or n_reference == 0:
        return 0.0
    precision, recall = overlap / n_output, overlap / n_reference
    return 2 * precision * recall / (precision + recall)


def rouge_n(output: str, reference: str, n: int) -> float:
    hyp, ref = _ngrams(_rouge_tokens(output), n), _ngrams(_rouge_tokens(reference), n)
    overlap = sum(min(c, ref[g]) for g, c in hyp.items())
    return _f1(overlap, sum(hyp.values()), sum(ref.values()))


def rouge_l(output: str, reference: str) -> float:
    hyp, ref = _rouge_tokens(output), _rouge_tokens(reference)
    return _f1(lcs_length(hyp, ref), len(hyp), len(ref))


METRICS: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": fuzzy_match,
    "bleu": bleu,
    **{f"rouge_{n}": (lambda o, r, n=n: rouge_n(o, r, n)) for n in range(1, 6)},
    "rouge_l": rouge_l,
}


def metric(name: str, where: str = "evaluation_metric") -> Callable[[str, str], float]:
    """The metric function for ``name``; a clear error for OpenAI metrics tuneforge does not compute."""
    if name in METRICS:
        return METRICS[name]
    supported = ", ".join(METRICS)
    if name in UNSUPPORTED:
        why = UNSUPPORTED[name]
        raise RecipeError(f"{where}: {name!r} is not supported by tuneforge ({why}); supported: {supported}")
    hint = suggest(str(name), list(METRICS) + list(UNSUPPORTED), cutoff=0.5)
    raise RecipeError(f"{where}: unknown metric {name!r}{hint} (supported: {supported})")


def similarity(name: str, output: str, reference: str) -> float:
    return metric(name)(output, reference)
