"""The benchmarks' shared statistics: interleaved order, paired ratios, median and spread."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"
_spec = importlib.util.spec_from_file_location("benchmarks_common", _path)
assert _spec is not None and _spec.loader is not None
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def test_schedule_alternates_which_side_goes_first() -> None:
    order = common.schedule(("a", "b"), 4)
    assert order == [(0, "a"), (0, "b"), (1, "b"), (1, "a"), (2, "a"), (2, "b"), (3, "b"), (3, "a")]
    three = [side for _, side in common.schedule(("x", "y", "z"), 2)]
    assert three == ["x", "y", "z", "z", "y", "x"]


def test_schedule_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="repeats"):
        common.schedule(("a", "b"), 0)
    with pytest.raises(ValueError, match="distinct"):
        common.schedule(("a", "a"), 2)


def test_interleaved_runs_in_schedule_order_and_groups_by_side() -> None:
    calls: list[tuple[str, int]] = []

    def run(side: str, rep: int) -> str:
        calls.append((side, rep))
        return f"{side}{rep}"

    out = common.interleaved(("tf", "trl"), 3, run)
    assert calls == [("tf", 0), ("trl", 0), ("trl", 1), ("tf", 1), ("tf", 2), ("trl", 2)]
    assert out == {"tf": ["tf0", "tf1", "tf2"], "trl": ["trl0", "trl1", "trl2"]}


def test_quantile_matches_the_statistics_module() -> None:
    xs = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    assert common.quantile(xs, 0.25) == pytest.approx(q1)
    assert common.quantile(xs, 0.5) == pytest.approx(q2) == pytest.approx(statistics.median(xs))
    assert common.quantile(xs, 0.75) == pytest.approx(q3)
    assert common.quantile([5.0], 0.9) == 5.0
    with pytest.raises(ValueError):
        common.quantile([], 0.5)


def test_paired_summary_is_the_median_of_per_pair_ratios() -> None:
    # A slow stretch (pair 2) slows both sides: its ratio stays in line and the median ignores the outlier pair 4.
    trl = [2.0, 4.0, 2.2, 2.0, 2.1]
    tuneforge = [1.0, 2.0, 1.0, 4.0, 1.0]
    s = common.paired_summary(trl, tuneforge)
    assert s["ratios"] == [2.0, 2.0, 2.2, 0.5, 2.1]
    assert s["ratio"] == 2.0
    assert s["spread"] == {"n": 5, "min": 0.5, "q1": 2.0, "median": 2.0, "q3": 2.1, "max": 2.2, "iqr": 0.1}
    assert json.loads(json.dumps(s)) == s  # plain JSON
    assert common.describe(s) == "2.00x (pairs 5: min 0.50, IQR 2.00-2.10, max 2.20)"


def test_paired_ratios_need_pairs_and_positive_denominators() -> None:
    with pytest.raises(ValueError, match="equally many"):
        common.paired_ratios([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="positive"):
        common.paired_ratios([1.0], [0.0])
