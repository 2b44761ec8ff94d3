"""Paired bootstrap over items: how sure a before/after difference is, and the verdict that follows from it.

Both models answered the same items, so what varies between evaluation sets is *which items* were drawn. A
resample draws ``n`` items with replacement; the difference between the models' metrics on it is one draw of the
difference's sampling distribution, and the 2.5th and 97.5th percentiles of many draws are a 95 % interval
(Efron & Tibshirani's percentile interval; Koehn 2004 for its use on paired system outputs). Pairing matters: the
same resample is applied to both models, so item difficulty cancels and small, consistent improvements show.

The verdict is read off the interval and nothing else: **better** when it lies entirely on the improving side of
zero, **worse** when entirely on the other, **no detectable change** when it contains zero. Resampling uses item
counts on per-item statistics (:mod:`tuneforge.eval.scores`), so every metric — macro-F1 and corpus BLEU included
— is recomputed exactly on each resample, and a seed makes the whole thing reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from tuneforge.eval.results import ModelResults
from tuneforge.eval.scores import MetricStats

BETTER, WORSE, NO_CHANGE = "better", "worse", "no detectable change"
UNTESTED = "no interval"  # a metric saved without per-item statistics (an lm-eval aggregate)
RESAMPLES = 2000
CONFIDENCE = 0.95
_BLOCK = 500  # resamples per matrix product: bounds memory at 500 × n counts


@dataclass(frozen=True)
class Comparison:
    """One metric of one task: candidate vs baseline, the paired difference and its interval."""

    task: str
    metric: str
    candidate: float
    baseline: float
    delta: float
    low: float
    high: float
    verdict: str
    n: int
    higher_is_better: bool = True

    def to_dict(self) -> dict[str, object]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Interval:
    """A metric's value on one model with its bootstrap interval (no baseline)."""

    value: float
    low: float
    high: float


def resample_counts(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of ``(B, n)`` item counts, each row a multinomial draw of ``n`` items with replacement."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < resamples:
        b = min(_BLOCK, resamples - done)
        yield rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)
        done += b


def verdict(low: float, high: float, higher_is_better: bool = True) -> str:
    """better / worse / no detectable change, from where the interval of (candidate − baseline) lies."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return NO_CHANGE
    if low > 0:
        return BETTER if higher_is_better else WORSE
    if high < 0:
        return WORSE if higher_is_better else BETTER
    return NO_CHANGE


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def paired(
    candidate: MetricStats,
    baseline: MetricStats,
    *,
    task: str = "",
    metric: str = "",
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Comparison:
    """Compare two models' statistics on the same items (row ``i`` of each is item ``i``)."""
    if candidate.n != baseline.n:
        raise ValueError(
            f"{task}/{metric}: {candidate.n} items against {baseline.n}; a paired comparison needs the same items"
        )
    if candidate.reduce != baseline.reduce:
        raise ValueError(f"{task}/{metric}: {candidate.reduce} against {baseline.reduce}; not the same metric")
    n = candidate.n
    deltas = []
    for counts in resample_counts(n, resamples, seed):
        deltas.append(candidate.resampled(counts) - baseline.resampled(counts))
    low, high = _percentiles(np.concatenate(deltas), confidence)
    c, b = candidate.value(), baseline.value()
    return Comparison(
        task,
        metric,
        c,
        b,
        c - b,
        low,
        high,
        verdict(low, high, candidate.higher_is_better),
        n,
        candidate.higher_is_better,
    )


def interval(
    stats: MetricStats, *, resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0
) -> Interval:
    """One model's metric with its percentile bootstrap interval over items."""
    draws = np.concatenate([stats.resampled(counts) for counts in resample_counts(stats.n, resamples, seed)])
    low, high = _percentiles(draws, confidence)
    return Interval(stats.value(), low, high)


def compare(
    candidate: ModelResults,
    baseline: ModelResults,
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[list[Comparison], list[str]]:
    """Every metric of every task both evaluated on the same items, and notes on what could not be paired.

    Tasks pair by name and must have the same fingerprint (config and records): a paired bootstrap over two
    different item sets would measure the sets, not the models. Every metric of a task uses the same resamples.
    """
    rows: list[Comparison] = []
    notes: list[str] = []
    for name, cand in candidate.tasks.items():
        base = baseline.tasks.get(name)
        if base is None:
            notes.append(f"{name}: {baseline.label} has no result for this task")
            continue
        if cand.fingerprint != base.fingerprint:
            notes.append(
                f"{name}: evaluated on different items or settings ({cand.fingerprint} vs {base.fingerprint}); not compared"
            )
            continue
        for metric, stats in cand.metrics.items():
            if metric in base.metrics:
                rows.append(
                    paired(
                        stats,
                        base.metrics[metric],
                        task=name,
                        metric=metric,
                        resamples=resamples,
                        confidence=confidence,
                        seed=seed,
                    )
                )
        for metric in cand.values_only.keys() & base.values_only.keys():  # no per-item statistics: no interval
            c, b = cand.values_only[metric], base.values_only[metric]
            rows.append(Comparison(name, metric, c, b, c - b, math.nan, math.nan, UNTESTED, cand.n))
    return rows, notes
