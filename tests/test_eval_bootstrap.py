"""The paired bootstrap against closed-form cases, and the exactness of resampling per-item statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tuneforge.eval import bootstrap, metrics
from tuneforge.eval.bootstrap import BETTER, NO_CHANGE, WORSE, compare, interval, paired, verdict
from tuneforge.eval.results import ModelResults, TaskResult
from tuneforge.eval.scores import MetricStats, macro_f1_of, mean_of, perplexity_of


def hits(n: int, p: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def test_identical_models_give_an_interval_of_zero_and_no_change() -> None:
    base = mean_of(hits(300, 0.6, 0))
    c = paired(base, mean_of(base.stats[:, 0].copy()))
    assert (c.delta, c.low, c.high) == (0.0, 0.0, 0.0)
    assert c.low <= 0 <= c.high and c.verdict == NO_CHANGE


def test_a_known_shift_is_detected_in_the_right_direction() -> None:
    base = hits(400, 0.5, 1)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:40]] = 1  # 40 of 400 items go from wrong to right: +0.10
    up = paired(mean_of(better), mean_of(base))
    assert up.delta == pytest.approx(0.10) and up.low > 0 and up.verdict == BETTER
    down = paired(mean_of(base), mean_of(better))
    assert down.high < 0 and down.verdict == WORSE
    # For a lower-is-better metric the same sign means the opposite verdict.
    nll = np.random.default_rng(2).random(400) + 2.0
    tokens = np.full(400, 10)
    assert paired(perplexity_of(nll - 0.5, tokens), perplexity_of(nll, tokens)).verdict == BETTER


def test_a_tiny_shift_on_few_items_is_no_detectable_change() -> None:
    base = hits(30, 0.5, 3)
    cand = base.copy()
    cand[np.flatnonzero(base == 0)[0]] = 1  # one item of 30
    c = paired(mean_of(cand), mean_of(base))
    assert c.delta > 0 and c.low <= 0 <= c.high and c.verdict == NO_CHANGE


def test_the_interval_matches_the_normal_approximation() -> None:
    """For a mean, the paired difference's bootstrap distribution has sd ≈ sd(d) / √n (the closed form)."""
    n = 2000
    rng = np.random.default_rng(4)
    base = (rng.random(n) < 0.55).astype(float)
    cand = np.where(rng.random(n) < 0.2, 1 - base, base)  # 20 % of items flip, either way
    d = cand - base
    c = paired(mean_of(cand), mean_of(base), resamples=4000, seed=1)
    half = 1.959964 * d.std() / math.sqrt(n)
    assert c.delta == pytest.approx(d.mean())
    assert (c.high - c.low) / 2 == pytest.approx(half, rel=0.08)
    assert (c.low + c.high) / 2 == pytest.approx(d.mean(), abs=0.15 * half)


def test_the_bootstrap_is_seeded() -> None:
    a, b = mean_of(hits(200, 0.6, 5)), mean_of(hits(200, 0.5, 6))
    assert paired(a, b, seed=3) == paired(a, b, seed=3)
    assert paired(a, b, seed=3).low != paired(a, b, seed=4).low
    one = interval(a, seed=0)
    assert one.low < one.value < one.high


def _resample(values: list[str], counts: np.ndarray) -> list[str]:
    return [v for v, k in zip(values, counts) for _ in range(int(k))]


def test_resampled_statistics_equal_recomputing_the_metric() -> None:
    """counts @ stats is exactly the metric on the resampled items: macro-F1 and corpus BLEU, not only means."""
    from sacrebleu.metrics import BLEU

    rng = np.random.default_rng(7)
    labels = ["a", "b", "c", "d"]
    refs = [labels[i] for i in rng.integers(0, 4, 60)]
    preds = [r if rng.random() < 0.6 else str(rng.choice([*labels, "junk"])) for r in refs]
    f1 = macro_f1_of(preds, refs, labels)
    words = ["the", "cat", "sat", "on", "a", "mat", "with", "one", "dog"]
    hyp = [" ".join(rng.choice(words, rng.integers(2, 7))) for _ in range(40)]
    ref = [" ".join(rng.choice(words, rng.integers(2, 7))) for _ in range(40)]
    bleu = MetricStats("bleu", np.asarray(metrics.bleu_statistics(hyp, ref), dtype=float))
    assert bleu.value() == pytest.approx(BLEU().corpus_score(hyp, [ref]).score)
    for counts in next(bootstrap.resample_counts(60, 5, seed=0)):
        got = f1.resampled(counts[None])[0]
        assert got == pytest.approx(metrics.macro_f1(_resample(preds, counts), _resample(refs, counts), labels))
    for counts in next(bootstrap.resample_counts(40, 5, seed=1)):
        want = BLEU().corpus_score(_resample(hyp, counts), [_resample(ref, counts)]).score
        assert bleu.resampled(counts[None])[0] == pytest.approx(want)


def test_verdicts_follow_from_the_interval() -> None:
    assert verdict(0.01, 0.2) == BETTER
    assert verdict(-0.2, -0.01) == WORSE
    assert verdict(-0.01, 0.2) == NO_CHANGE
    assert verdict(0.01, 0.2, higher_is_better=False) == WORSE
    assert verdict(math.nan, math.nan) == NO_CHANGE


def _results(label: str, values: np.ndarray, fingerprint: str = "f") -> ModelResults:
    task = TaskResult("t", "generation", fingerprint, {"exact_match": mean_of(values)})
    return ModelResults(label, label, {"t": task})


def test_compare_pairs_tasks_by_name_and_refuses_different_items() -> None:
    base = hits(100, 0.5, 8)
    rows, notes = compare(_results("cand", 1 - base), _results("base", base))
    assert [(r.task, r.metric) for r in rows] == [("t", "exact_match")] and notes == []
    rows, notes = compare(_results("cand", base, "other"), _results("base", base))
    assert rows == [] and "different items" in notes[0]
    with pytest.raises(ValueError, match="same items"):
        paired(mean_of(base), mean_of(base[:50]))
