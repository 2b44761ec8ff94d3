"""The metrics of OpenAI's ``text_similarity`` grader, computed by the libraries that define them.

``similarity(name, output, reference)`` scores one pair, ``similarity_batch`` many (one embedding pass for
``cosine``); every score lies in [0, 1]. OpenAI names the metrics but leaves most settings open; these are
tuneforge's choices:

- ``fuzzy_match``: RapidFuzz's ``fuzz.ratio`` / 100 — the normalised Indel similarity of the two strings,
  ``2·LCS / (len(a) + len(b))`` over characters (OpenAI: "fuzzy string match, using rapidfuzz"). Case,
  spacing and punctuation count; two empty strings are identical (1.0).
- ``bleu``: sacreBLEU's sentence BLEU / 100 with its sentence-level defaults: 13a tokenisation, "exp"
  smoothing, effective order (n-gram orders longer than the output are skipped), case-sensitive.
- ``gleu``: NLTK's sentence GLEU (Google-BLEU: the smaller of 1..4-gram precision and recall) over the
  same 13a tokens, as Hugging Face ``evaluate``'s ``google_bleu`` computes it.
- ``meteor``: NLTK's METEOR (exact, Porter-stem and WordNet-synonym matches; alpha 0.9, beta 3, gamma 0.5)
  over lower-cased 13a tokens. It needs NLTK's WordNet data, installed ahead of time: tuneforge never
  downloads at run time, so without it the metric is refused when the grader is loaded.
- ``rouge_1`` … ``rouge_5``, ``rouge_l``: rouge-score F-measures, without stemming (rouge-score's default).
  Tokens are rouge-score's on ASCII text (lower-cased runs of letters and digits) but keep the letters of
  every script: rouge-score's own tokenizer deletes non-ASCII letters, which scores Russian or Greek 0 and
  "café" as "caf". A text with fewer than n words has no n-grams, so ``rouge_4`` of a 3-word answer is 0
  even against itself: prefer ``rouge_1``/``rouge_l`` for short answers.
- ``cosine``: cosine similarity of sentence embeddings, negatives as 0 (:mod:`tuneforge.rewards.embeddings`;
  by default the bundled all-MiniLM-L6-v2, where OpenAI uses text-embedding-3-large).

Texts without a token score 0 on the token metrics (the libraries' value: there is nothing to match).
Scorers, tokenizers and models are built once per process; the library imports (NLTK's is ~2 s) happen
on first use.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import cache, partial
from typing import Any

from rapidfuzz import fuzz
from rapidfuzz.distance import LCSseq

from tuneforge.errors import RecipeError, suggest
from tuneforge.rewards import embeddings

_WORD = re.compile(r"[^\W_]+")  # a run of letters or digits of any script: [a-z0-9]+ on ASCII


class UnicodeWords:
    """rouge-score's tokenizer interface: lower-cased runs of letters/digits, no stemming."""

    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())


_WORDS = UnicodeWords()


@cache
def _bleu() -> Any:
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=True)


@cache
def _tokenizer_13a() -> Callable[[str], str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def tokens_13a(text: str) -> list[str]:
    """sacreBLEU's default (13a) tokens, as BLEU sees them."""
    return _tokenizer_13a()(text.rstrip()).split()


@cache
def _rouge_scorer(kind: str) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([kind], use_stemmer=False, tokenizer=_WORDS)


def fuzzy_match(output: str, reference: str) -> float:
    return fuzz.ratio(output, reference) / 100.0


def bleu(output: str, reference: str) -> float:
    return _bleu().sentence_score(output, [reference]).score / 100.0


def gleu(output: str, reference: str) -> float:
    from nltk.translate.gleu_score import sentence_gleu

    return float(sentence_gleu([tokens_13a(reference)], tokens_13a(output)))


def rouge_n(output: str, reference: str, n: int) -> float:
    kind = f"rouge{n}"
    return float(_rouge_scorer(kind).score(reference, output)[kind].fmeasure)


def rouge_l(output: str, reference: str) -> float:
    # rouge-score's ROUGE-L fills a pure-Python LCS table (65 ms for two 480-word answers, quadratic);
    # RapidFuzz's bit-parallel LCS over the same tokens gives the same length in microseconds, and
    # rouge-score's own F-measure turns it into the score (tests check both agree with RougeScorer).
    from rouge_score import scoring

    hyp, ref = _WORDS.tokenize(output), _WORDS.tokenize(reference)
    if not hyp or not ref:
        return 0.0
    lcs = LCSseq.similarity(hyp, ref)
    return float(scoring.fmeasure(lcs / len(hyp), lcs / len(ref)))


_NO_WORDNET = (
    "'meteor' needs NLTK's WordNet data, which is not installed (tuneforge never downloads data at run time): "
    "install it once, ahead of time, with `python -m nltk.downloader wordnet`, or copy an nltk_data folder "
    "holding corpora/wordnet to a directory named in $NLTK_DATA"
)


def wordnet_installed() -> bool:
    import nltk

    for resource in ("corpora/wordnet", "corpora/wordnet.zip"):
        try:
            nltk.data.find(resource)
            return True
        except LookupError:
            pass
    return False


def meteor(output: str, reference: str) -> float:
    if not wordnet_installed():
        raise RecipeError(_NO_WORDNET)
    from nltk.corpus import wordnet
    from nltk.translate.meteor_score import meteor_score

    return float(meteor_score([tokens_13a(reference)], tokens_13a(output), wordnet=wordnet))


def cosine(output: str, reference: str) -> float:
    """Cosine similarity with the default (bundled, local) encoder; graders choose theirs in their config."""
    return embeddings.cosine_scores(embeddings.default_embedder(), [output], [reference])[0]


# OpenAI's evaluation_metric names, in its order.
METRICS: dict[str, Callable[[str, str], float]] = {
    "cosine": cosine,
    "fuzzy_match": fuzzy_match,
    "bleu": bleu,
    "gleu": gleu,
    "meteor": meteor,
    **{f"rouge_{n}": partial(rouge_n, n=n) for n in range(1, 6)},
    "rouge_l": rouge_l,
}


def metric(name: str, where: str = "evaluation_metric") -> Callable[[str, str], float]:
    """The metric function for ``name``; a clear error for an unknown name or a metric that cannot run here."""
    if name not in METRICS:
        hint = suggest(str(name), list(METRICS), cutoff=0.5)
        raise RecipeError(f"{where}: unknown metric {name!r}{hint} (supported: {', '.join(METRICS)})")
    if name == "meteor" and not wordnet_installed():
        raise RecipeError(f"{where}: {_NO_WORDNET}")
    if name == "cosine":
        embeddings.default_embedder(where)  # raises when the bundled encoder is not installed
    return METRICS[name]


def similarity(name: str, output: str, reference: str) -> float:
    return metric(name)(output, reference)


def similarity_batch(name: str, outputs: Sequence[str], references: Sequence[str]) -> list[float]:
    """``similarity`` for many pairs; ``cosine`` embeds each distinct text once, in batches."""
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs but {len(references)} references")
    fn = metric(name)
    if name == "cosine":
        return embeddings.cosine_scores(embeddings.default_embedder(), outputs, references)
    return [fn(o, r) for o, r in zip(outputs, references)]
