"""Evaluate models by reference and compare them: what ``tuneforge eval``, ``tuneforge compare``, training runs
and the demo call.

A reference is anything :func:`tuneforge.models.refs.resolve_model` understands — a model, adapter or run
directory, ``models:/NAME/3``, ``models:/NAME@production``, an ``ft:…`` name, a hub id — and it is evaluated with
the chat template it was trained with (the registry's prompt version, or the tokenizer saved with the result).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tuneforge.eval import bootstrap
from tuneforge.eval.report import Report, table_columns
from tuneforge.eval.results import ModelResults
from tuneforge.eval.tasks import Task

Say = Callable[[str], None]


def pick_device(device: str = "auto") -> str:
    """``auto``: the GPU when there is one, else the CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_model(
    ref: Any,
    tasks: Sequence[Task],
    *,
    batch_size: int = 32,
    device: str = "auto",
    label: str | None = None,
    tracking_uri: str | None = None,
    say: Say | None = None,
) -> ModelResults:
    """Load ``ref`` (a string or a resolved ``ModelRef``), evaluate it on every task, and free it again."""
    import torch

    from tuneforge.eval.runner import evaluate
    from tuneforge.models.refs import load_model, resolve_model

    torch.set_flush_denormal(True)  # denormal activations of small models slow CPU kernels several times over
    resolved = resolve_model(ref, tracking_uri=tracking_uri) if isinstance(ref, (str, Path)) else ref
    if say:
        say(f"loading {resolved.label} ({resolved.base}{' + ' + resolved.adapter if resolved.adapter else ''})")
    model, tokenizer = load_model(resolved, device=pick_device(device))
    info = {
        "base": resolved.base,
        "adapter": resolved.adapter,
        "tokenizer": resolved.tokenizer,
        "version": resolved.version,
    }
    try:
        return evaluate(
            model,
            tokenizer,
            tasks,
            template=resolved.chat_template or tokenizer.chat_template,
            batch_size=batch_size,
            label=label or resolved.label,
            ref=resolved.ref,
            info=info,
            say=say,
        )
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def build_report(
    candidates: Sequence[ModelResults],
    baseline: ModelResults | None = None,
    *,
    title: str = "tuneforge eval",
    resamples: int = bootstrap.RESAMPLES,
    seed: int = 0,
) -> Report:
    """Compare every candidate with the baseline (paired bootstrap), or give each value its interval."""
    candidates = _unique_labels(list(candidates))
    if baseline is not None and any(c.label == baseline.label for c in candidates):
        baseline = replace(baseline, label=f"{baseline.label} (baseline)")
    report = Report(title, candidates, baseline)
    for c in candidates:
        if baseline is not None:
            rows, notes = bootstrap.compare(c, baseline, resamples=resamples, seed=seed)
            report.comparisons[c.label] = rows
            report.notes += [f"{c.label}: {n}" for n in notes]
        else:
            report.intervals[c.label] = {
                (t, m): bootstrap.interval(stats, resamples=resamples, seed=seed)
                for t, result in c.tasks.items()
                for m, stats in result.metrics.items()
            }
        report.notes += [f"{c.label}: {t}: {n}" for t, r in c.tasks.items() for n in r.notes]
    if baseline is not None:
        report.notes += [f"{baseline.label}: {t}: {n}" for t, r in baseline.tasks.items() for n in r.notes]
    return report


def _unique_labels(results: list[ModelResults]) -> list[ModelResults]:
    """Two runs of one recipe share a name; the report keys models by label, so the second becomes ``name (2)``."""
    seen: dict[str, int] = {}
    out = []
    for r in results:
        seen[r.label] = seen.get(r.label, 0) + 1
        out.append(r if seen[r.label] == 1 else replace(r, label=f"{r.label} ({seen[r.label]})"))
    return out


def log_report(tracker: Any, report: Report, paths: dict[str, Path], *, step: int, prefix: str = "eval") -> None:
    """Metrics under the same keys in every run — ``eval/TASK/METRIC`` (the candidate), ``eval_baseline/…``,
    ``eval_delta/…`` with ``eval_delta_low/…`` and ``eval_delta_high/…`` — so MLflow's run comparison lines runs
    up; the report files and a table artifact (MLflow's evaluation view) under ``eval/``."""
    metrics: dict[str, float] = {}
    candidate = report.candidates[0]
    for key, value in candidate.flat_values().items():
        metrics[f"{prefix}/{key}"] = value
    if report.baseline is not None:
        for key, value in report.baseline.flat_values().items():
            metrics[f"{prefix}_baseline/{key}"] = value
        for r in report.comparisons.get(candidate.label, []):
            for name, v in (("delta", r.delta), ("delta_low", r.low), ("delta_high", r.high)):
                metrics[f"{prefix}_{name}/{r.task}/{r.metric}"] = v
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)}, step=step)
    for path in paths.values():
        tracker.log_artifact(path, prefix)
    client = getattr(tracker, "client", None)
    if client is not None and getattr(tracker, "run_id", None):
        client.log_table(tracker.run_id, data=table_columns(report), artifact_file=f"{prefix}/comparison.json")
