"""Metrics over generated answers: exact match after normalisation, accuracy, macro-F1, per-skill accuracy.

Everything here scores *strings* a model generated greedily against short reference answers, so the one
policy that matters is ``normalize_answer``: it forgives formatting (surrounding space, a trailing full
stop, quotes, text after the first line) but not content. Case is kept by default because some answers
are about case (an "uppercase" skill would be free marks otherwise).
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

_TRAILING = ".!?,;:"
_QUOTES = "\"'`“”‘’"


def normalize_answer(s: str, *, lowercase: bool = False) -> str:
    """The comparable form of an answer.

    NFKC-normalised, cut at the first non-empty line (a model that keeps talking after its answer is judged
    on the answer), whitespace collapsed, surrounding quotes and trailing sentence punctuation removed.
    """
    s = unicodedata.normalize("NFKC", s)
    line = next((ln for ln in s.splitlines() if ln.strip()), "")
    line = " ".join(line.split())
    prev = None
    while line != prev:  # peel '"19."' and '19."' alike
        prev = line
        line = line.strip(_QUOTES).rstrip(_TRAILING).strip()
    return line.lower() if lowercase else line


def exact_match(pred: str, ref: str, *, lowercase: bool = False) -> bool:
    """Whether ``pred`` equals ``ref`` after ``normalize_answer``."""
    return normalize_answer(pred, lowercase=lowercase) == normalize_answer(ref, lowercase=lowercase)


def _paired(preds: Sequence[str], refs: Sequence[str]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"got {len(preds)} predictions for {len(refs)} references; they must pair up")
    if not refs:
        raise ValueError("no references to score")


def accuracy(preds: Sequence[str], refs: Sequence[str], *, lowercase: bool = False) -> float:
    """Fraction of exact matches."""
    _paired(preds, refs)
    return sum(exact_match(p, r, lowercase=lowercase) for p, r in zip(preds, refs)) / len(refs)


def macro_f1(preds: Sequence[str], refs: Sequence[str], labels: Iterable[str] | None = None) -> float:
    """Unweighted mean of per-class F1 (answers normalised first).

    Which classes are averaged:

    * ``labels=None``: every class in refs ∪ preds (scikit-learn's default). A malformed prediction then
      becomes a class of its own with F1 0, so many *different* wrong strings cost more than one repeated.
    * ``labels`` given (e.g. the taxonomy's leaves): those labels that occur in refs or preds. Predictions
      outside the label set are plain errors — a miss for the true class, never a class of their own —
      and labels that occur nowhere are skipped (their F1 is undefined, not 0), so the score does not
      depend on how much of the label set an evaluation sample happens to cover.

    Every reference must be in ``labels`` when it is given.
    """
    _paired(preds, refs)
    p = [normalize_answer(x) for x in preds]
    r = [normalize_answer(x) for x in refs]
    present = set(p) | set(r)
    if labels is None:
        classes = present
    else:
        label_set = {normalize_answer(x) for x in labels}
        unknown = sorted(set(r) - label_set)
        if unknown:
            raise ValueError(f"references not in the label set: {unknown[:5]}")
        classes = label_set & present

    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for pi, ri in zip(p, r):
        if pi == ri:
            tp[ri] += 1
        else:
            fn[ri] += 1
            fp[pi] += 1
    # Each class here occurs in refs or preds, so 2·tp + fp + fn > 0.
    scores = [2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) for c in classes]
    return sum(scores) / len(scores)


def per_skill_accuracy(items: Sequence[dict], preds: Sequence[str], *, lowercase: bool = False) -> dict[str, float]:
    """Accuracy per ``item["skill"]`` against ``item["answer"]``, skills in order of first appearance."""
    if len(items) != len(preds):
        raise ValueError(f"got {len(preds)} predictions for {len(items)} items; they must pair up")
    hits: dict[str, list[bool]] = {}
    for i, (item, pred) in enumerate(zip(items, preds)):
        if "skill" not in item or "answer" not in item:
            raise ValueError(f"item {i}: needs 'skill' and 'answer' keys, has {sorted(item)}")
        hits.setdefault(item["skill"], []).append(exact_match(pred, item["answer"], lowercase=lowercase))
    return {skill: sum(h) / len(h) for skill, h in hits.items()}


# ------------------------------------------------------------------------------ library-backed text metrics


def rouge_scores(preds: Sequence[str], refs: Sequence[str], kind: str = "rougeL") -> list[float]:
    """Per-item ROUGE F-measure from Google's ``rouge-score`` (``rouge1``, ``rouge2``, ``rougeL``…).

    Its tokenizer lower-cases and keeps ASCII letters and digits only, as in the papers that report ROUGE.
    """
    from rouge_score.rouge_scorer import RougeScorer

    _paired(preds, refs)
    scorer = RougeScorer([kind])
    return [scorer.score(r, p)[kind].fmeasure for p, r in zip(preds, refs)]


def bleu_statistics(preds: Sequence[str], refs: Sequence[str], max_order: int = 4) -> list[list[int]]:
    """Per-item sacreBLEU sufficient statistics ``[correct_1..N, total_1..N, hyp_len, ref_len]``.

    Their sum, reduced with sacreBLEU's ``compute_bleu``, is exactly ``BLEU().corpus_score`` (13a tokens, exp
    smoothing) — which is what lets the bootstrap resample corpus BLEU without re-tokenizing anything.
    """
    from sacrebleu.metrics import BLEU

    _paired(preds, refs)
    bleu = BLEU(max_ngram_order=max_order, effective_order=True)  # effective order only affects the score
    rows = []
    for p, r in zip(preds, refs):
        s = bleu.sentence_score(p, [r])
        rows.append([*s.counts, *s.totals, s.sys_len, s.ref_len])
    return rows


def regex_scores(preds: Sequence[str], refs: Sequence[str], pattern: str, *, lowercase: bool = False) -> list[float]:
    """1.0 per item where the pattern fits the output.

    Without a capture group, the pattern only has to be found in the output (``re.search``); with one, the first
    group of the first match is the extracted answer and must equal the reference (``exact_match``), e.g.
    ``"answer is (\\d+)"`` for chain-of-thought answers.
    """
    import re

    _paired(preds, refs)
    regex = re.compile(pattern)
    out = []
    for p, r in zip(preds, refs):
        m = regex.search(p)
        if m is None:
            out.append(0.0)
        elif regex.groups:
            out.append(float(exact_match(m.group(1) or "", r, lowercase=lowercase)))
        else:
            out.append(1.0)
    return out
