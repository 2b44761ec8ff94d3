"""What every head-to-head benchmark shares: interleaved repeats, paired ratios, their median and spread.

A shared machine's load drifts over minutes, so two systems timed one after the other compare the load as much
as the systems. The remedy here is pairing: repeat ``i`` of side A and repeat ``i`` of side B run back to back
(A B, then B A, then A B … so neither side always goes first), each pair gives one ratio, and the reported ratio
is the median of the pairs' ratios — a slow minute slows both halves of one pair and moves one ratio, not the
median. The spread (min, quartiles, max) says how much to trust it.

    from common import interleaved, paired_summary

    runs = interleaved(("tuneforge", "trl"), repeats=5, run=lambda side, i: time_one(side))
    print(paired_summary(runs["trl"], runs["tuneforge"]))   # ratio = trl / tuneforge, per pair

Scripts in ``benchmarks/`` import it as ``common`` (Python puts a script's own folder on ``sys.path``).
Everything returned is plain floats, lists and dicts, ready for ``json.dumps``. :func:`run_child` runs one
side's worker process and stops it when the benchmark itself is stopped.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def schedule(sides: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, side) in run order: every repeat runs each side once, the order reversed on every other repeat."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if len(set(sides)) != len(sides) or not sides:
        raise ValueError(f"sides must be distinct and not empty, got {list(sides)}")
    order = list(sides)
    return [(i, side) for i in range(repeats) for side in (order if i % 2 == 0 else order[::-1])]


def interleaved(sides: Sequence[str], repeats: int, run: Callable[[str, int], T]) -> dict[str, list[T]]:
    """Call ``run(side, repeat)`` in :func:`schedule` order; each side's results in repeat order."""
    out: dict[str, list[T]] = {side: [] for side in sides}
    for i, side in schedule(sides, repeats):
        out[side].append(run(side, i))
    return out


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("quantile of no values")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def spread(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """``{"n", "min", "q1", "median", "q3", "max", "iqr"}`` of the values, rounded to ``digits``."""
    if not values:
        raise ValueError("spread of no values")
    q1, q3 = quantile(values, 0.25), quantile(values, 0.75)
    return {
        "n": len(values),
        "min": round(min(values), digits),
        "q1": round(q1, digits),
        "median": round(statistics.median(values), digits),
        "q3": round(q3, digits),
        "max": round(max(values), digits),
        "iqr": round(q3 - q1, digits),
    }


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """``numerators[i] / denominators[i]`` for every pair (both lists in repeat order, as :func:`interleaved` gives)."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(f"need equally many values on both sides, got {len(numerators)} and {len(denominators)}")
    if any(d <= 0 for d in denominators):
        raise ValueError("denominators must be positive")
    return [n / d for n, d in zip(numerators, denominators)]


def paired_summary(numerators: Sequence[float], denominators: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """The median of the paired ratios, its spread, and every pair's ratio.

    ``{"ratio": median, "spread": {n, min, q1, median, q3, max, iqr}, "ratios": [...]}``. Name the direction at
    the call site: pass the slower-is-bigger side as numerator for a speedup (TRL seconds / tuneforge seconds).
    """
    ratios = paired_ratios(numerators, denominators)
    return {
        "ratio": round(statistics.median(ratios), digits),
        "spread": spread(ratios, digits),
        "ratios": [round(r, digits) for r in ratios],
    }


def describe(summary: dict[str, Any], unit: str = "x") -> str:
    """One line for a human: ``1.42x (pairs 5: min 1.31, IQR 1.38-1.47, max 1.55)``."""
    s = summary["spread"]
    return (
        f"{summary['ratio']:.2f}{unit} (pairs {s['n']}: min {s['min']:.2f}, IQR {s['q1']:.2f}-{s['q3']:.2f}, "
        f"max {s['max']:.2f})"
    )


def worker_env(home: Path, work: Path, threads: int) -> dict[str, str]:
    """The environment of a benchmark worker: offline, ``threads`` threads, every cache and state dir under `work`
    (``home`` is its ``TUNEFORGE_HOME``), quiet."""
    return dict(
        os.environ,
        TUNEFORGE_HOME=str(home),
        HF_HOME=str(work / "hf"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(work / "hf-datasets"),
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONWARNINGS="ignore",
    )


def run_child(cmd: Sequence[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a worker process to its end (output captured); stopping this process (SIGTERM, Ctrl-C) stops it too.

    SIGTERM is turned into ``SystemExit`` in the main thread, so the ``finally`` below runs as it does for Ctrl-C.
    """
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    proc = subprocess.Popen(list(cmd), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:  # we are being stopped: the worker goes with us
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
