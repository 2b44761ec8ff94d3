"""A metric as per-item statistics and a reduction — what makes resampling items exact and cheap.

Every metric tuneforge reports is ``reduce(Σᵢ wᵢ · sᵢ)``: each item contributes a short vector of sufficient
statistics ``sᵢ`` and the metric is a function of their weighted sum. A mean is ``(Σ score, Σ 1)``; macro-F1 is
per-class true positives, false positives and false negatives; corpus BLEU is matched and total n-grams and the
two lengths; perplexity is ``(Σ nll, Σ tokens)``. The point value has every ``wᵢ = 1``; a bootstrap resample is a
vector of item counts, so a thousand resamples of any metric are one matrix product ``W @ S``. A sub-group (one
skill) is the same statistics with the other items' rows set to zero.

Reductions are looked up by name, so a metric saved as JSON (``to_dict``) is recomputed exactly later, by
``tuneforge compare``, from the file alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Reducer = Callable[[np.ndarray, dict[str, Any]], np.ndarray]


def _mean(s: np.ndarray, _: dict[str, Any]) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s[:, 1] > 0, s[:, 0] / np.where(s[:, 1] > 0, s[:, 1], 1), np.nan)


def _macro_f1(s: np.ndarray, _: dict[str, Any]) -> np.ndarray:
    """Columns ``[tp_1..C, fp_1..C, fn_1..C]``; classes absent from a resample (denominator 0) are skipped."""
    c = s.shape[1] // 3
    tp, fp, fn = s[:, :c], s[:, c : 2 * c], s[:, 2 * c :]
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), np.nan)
    present = (denom > 0).sum(axis=1)
    total = np.nansum(f1, axis=1)
    return np.where(present > 0, total / np.maximum(present, 1), np.nan)


def _bleu(s: np.ndarray, options: dict[str, Any]) -> np.ndarray:
    """Columns ``[correct_1..N, total_1..N, sys_len, ref_len]``: sacreBLEU's corpus BLEU (0-100) per row."""
    from sacrebleu.metrics import BLEU

    n = (s.shape[1] - 2) // 2
    out = np.empty(len(s))
    for i, row in enumerate(s):
        if row[-2] == 0:  # no output at all in this resample
            out[i] = 0.0
            continue
        score = BLEU.compute_bleu(
            correct=[int(x) for x in row[:n]],
            total=[int(x) for x in row[n : 2 * n]],
            sys_len=int(row[-2]),
            ref_len=int(row[-1]),
            smooth_method=options.get("smooth_method", "exp"),
            max_ngram_order=n,
        )
        out[i] = score.score
    return out


def _perplexity(s: np.ndarray, _: dict[str, Any]) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return np.where(s[:, 1] > 0, np.exp(s[:, 0] / np.where(s[:, 1] > 0, s[:, 1], 1)), np.nan)


def _bits_per_byte(s: np.ndarray, _: dict[str, Any]) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s[:, 1] > 0, s[:, 0] / (np.where(s[:, 1] > 0, s[:, 1], 1) * math.log(2)), np.nan)


REDUCERS: dict[str, Reducer] = {
    "mean": _mean,
    "macro_f1": _macro_f1,
    "bleu": _bleu,
    "perplexity": _perplexity,
    "bits_per_byte": _bits_per_byte,
}


@dataclass
class MetricStats:
    """One metric of one task for one model: ``stats`` has a row per item, ``reduce`` names the reduction."""

    reduce: str
    stats: np.ndarray  # (items, k) float64
    higher_is_better: bool = True
    options: dict[str, Any] = field(default_factory=dict)  # e.g. macro-F1's class names, for reading the file

    def __post_init__(self) -> None:
        if self.reduce not in REDUCERS:
            raise ValueError(f"unknown reduction {self.reduce!r} (expected one of {sorted(REDUCERS)})")
        self.stats = np.asarray(self.stats, dtype=np.float64).reshape(len(self.stats), -1)

    @property
    def n(self) -> int:
        return len(self.stats)

    def reduce_sums(self, sums: np.ndarray) -> np.ndarray:
        """The metric for each row of summed statistics ``(B, k)``."""
        return REDUCERS[self.reduce](np.atleast_2d(sums), self.options)

    def value(self) -> float:
        return float(self.reduce_sums(self.stats.sum(axis=0, keepdims=True))[0])

    def resampled(self, counts: np.ndarray) -> np.ndarray:
        """The metric under each resample: ``counts`` is ``(B, items)``, how often each item was drawn."""
        return self.reduce_sums(counts @ self.stats)

    def restrict(self, mask: np.ndarray) -> MetricStats:
        """The same metric over the items where ``mask`` holds (others count zero; the item axis is kept)."""
        return MetricStats(
            self.reduce, self.stats * np.asarray(mask, dtype=np.float64)[:, None], self.higher_is_better, self.options
        )

    def item_scores(self) -> list[float | None]:
        """Each item's own value (its score, for means; None where one item has no value on its own)."""
        return [None if math.isnan(v) else float(v) for v in self.reduce_sums(self.stats)]

    def to_dict(self) -> dict[str, Any]:
        """JSON form; rows stored sparsely (``[[column, value], …]``) when most entries are zero (macro-F1)."""
        out: dict[str, Any] = {
            "reduce": self.reduce,
            "higher_is_better": self.higher_is_better,
            "width": self.stats.shape[1],
        }
        if self.options:
            out["options"] = self.options
        nonzero = np.count_nonzero(self.stats)
        if self.stats.size and nonzero < 0.3 * self.stats.size:
            out["sparse_rows"] = [[[int(j), _num(row[j])] for j in np.flatnonzero(row)] for row in self.stats]
        else:
            out["rows"] = [[_num(v) for v in row] for row in self.stats]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MetricStats:
        width = int(d["width"])
        if "sparse_rows" in d:
            stats = np.zeros((len(d["sparse_rows"]), width))
            for i, row in enumerate(d["sparse_rows"]):
                for j, v in row:
                    stats[i, int(j)] = v
        else:
            stats = np.asarray(d["rows"], dtype=np.float64).reshape(len(d["rows"]), width)
        return cls(d["reduce"], stats, bool(d.get("higher_is_better", True)), dict(d.get("options") or {}))


def _num(v: float) -> float | int:
    return int(v) if float(v).is_integer() else float(v)


# ---------------------------------------------------------------------------------------------- builders


def mean_of(scores: Sequence[float], higher_is_better: bool = True) -> MetricStats:
    """A per-item score averaged over items (accuracy, ROUGE, a grader's reward)."""
    values = np.asarray(scores, dtype=np.float64)
    return MetricStats("mean", np.stack([values, np.ones_like(values)], axis=1), higher_is_better)


def macro_f1_of(preds: Sequence[str], refs: Sequence[str], labels: Sequence[str] | None = None) -> MetricStats:
    """Macro-F1 as per-class counts; the classes follow :func:`tuneforge.eval.metrics.macro_f1`'s rule.

    Without ``labels`` every string seen (reference or prediction) is a class; with them, only the labels, and a
    prediction outside them is a miss for the true class, never a class of its own.
    """
    if labels is None:
        classes = sorted(set(refs) | set(preds))
    else:
        classes = list(dict.fromkeys(labels))
        unknown = sorted(set(refs) - set(classes))
        if unknown:
            raise ValueError(f"references not in the label set: {unknown[:5]}")
    index = {c: i for i, c in enumerate(classes)}
    c = len(classes)
    stats = np.zeros((len(refs), 3 * c))
    for row, (p, r) in enumerate(zip(preds, refs)):
        if p == r:
            stats[row, index[r]] = 1
        else:
            stats[row, 2 * c + index[r]] = 1  # a miss for the true class
            if p in index:
                stats[row, c + index[p]] = 1  # a false alarm for the predicted one
    return MetricStats("macro_f1", stats, True, {"classes": classes})


def perplexity_of(nll: Sequence[float], tokens: Sequence[int]) -> MetricStats:
    return MetricStats("perplexity", np.stack([np.asarray(nll, float), np.asarray(tokens, float)], axis=1), False)


def bits_per_byte_of(nll: Sequence[float], n_bytes: Sequence[int]) -> MetricStats:
    return MetricStats("bits_per_byte", np.stack([np.asarray(nll, float), np.asarray(n_bytes, float)], axis=1), False)
