"""``tuneforge eval`` and ``tuneforge compare``.

    tuneforge eval MODEL [--tasks FILE|NAME …] [--against BASELINE] [--harness lm-eval] [--out DIR] [--json]
    tuneforge compare RUN_OR_MODEL … [--against BASELINE] [--tasks …]

Everything cheap is checked before any weights load: the tasks (files, names, records) and every model reference.
A problem with either is one line, ``error: …``, and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from tuneforge.errors import TuneforgeError

DEFAULT_TASKS = ("general",)


def add_commands(sub: Any) -> None:
    """Register ``eval`` and ``compare`` on the top-level CLI's subparsers."""
    p = sub.add_parser(
        "eval", help="evaluate a model on tasks, optionally against a baseline with confidence intervals"
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="model/adapter/run directory, models:/NAME/VERSION, models:/NAME@ALIAS, ft:…, hub id",
    )
    p.add_argument(
        "--against", metavar="BASELINE", default=None, help="compare with this model (paired bootstrap 95%% CI)"
    )
    _common(p)
    p.add_argument(
        "--harness",
        choices=["lm-eval"],
        default=None,
        help="run the tasks with lm-evaluation-harness (0.4, HF backend) instead: its task YAMLs or tuneforge "
        "multiple-choice tasks, offline",
    )
    p.set_defaults(fn=_exit_one(cmd_eval))

    p = sub.add_parser("compare", help="compare saved evaluations (run dirs, eval dirs) or models, with intervals")
    p.add_argument("models", nargs="+", metavar="RUN_OR_MODEL", help="run or eval directory, report.json, or a model")
    p.add_argument(
        "--against", metavar="BASELINE", default=None, help="reference (default: the first, or a run's base)"
    )
    _common(p)
    p.set_defaults(fn=_exit_one(cmd_compare))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        metavar="FILE|NAME",
        help="task/suite YAML files or bundled names (default: general)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass (default 32)")
    p.add_argument("--limit", type=int, default=None, help="only the first N records of each task")
    p.add_argument("--device", default="auto", help="cpu, cuda, … (default: the GPU if there is one)")
    p.add_argument("--out", default=None, metavar="DIR", help="where report.md/.png/.json go")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store for models:/ references (default: embedded)")


def _exit_one(fn: Any) -> Any:
    """Evaluation problems exit with status 1 (not the CLI's usual 2) and one ``error:`` line, no traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args) or 0)
        except TuneforgeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    return run


def _say(text: str) -> None:
    print(f"eval: {text}", file=sys.stderr, flush=True)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("batch_size", "resamples"):
        if getattr(args, name) < 1:
            raise TuneforgeError(f"--{name.replace('_', '-')} must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise TuneforgeError("--limit must be at least 1")


def cmd_eval(args: argparse.Namespace) -> int:
    from tuneforge.eval.api import build_report, evaluate_model
    from tuneforge.models.refs import resolve_model

    _check_args(args)
    specs = args.tasks or list(DEFAULT_TASKS)
    refs = [resolve_model(r, tracking_uri=args.tracking_uri) for r in (args.model, args.against) if r is not None]
    if args.harness == "lm-eval":
        from tuneforge.eval.harness import prepare_tasks, run_lm_eval

        prepared = prepare_tasks(specs, limit=args.limit)
        results = [run_lm_eval(r, prepared, batch_size=args.batch_size, device=args.device, say=_say) for r in refs]
    else:
        from tuneforge.eval.tasks import load_tasks

        tasks = load_tasks(specs, limit=args.limit)
        results = [evaluate_model(r, tasks, batch_size=args.batch_size, device=args.device, say=_say) for r in refs]
    baseline = results[1] if len(results) > 1 else None
    report = build_report(
        results[:1], baseline, title=_title(results[0], baseline), resamples=args.resamples, seed=args.seed
    )
    out = Path(args.out) if args.out else _default_out(results[0].label)
    return _emit(report, out, args.json)


def cmd_compare(args: argparse.Namespace) -> int:
    from tuneforge.eval.api import build_report

    _check_args(args)
    loaded = [_saved(m) for m in args.models]
    reference = _saved(args.against) if args.against else None
    specs = args.tasks or _task_specs([*loaded, reference])
    need_tasks = any(x is None for x in [*loaded, *([reference] if args.against else [])])
    tasks = None
    if need_tasks:  # some arguments are models to evaluate now: on the saved reports' tasks, or --tasks
        from tuneforge.eval.tasks import load_tasks

        tasks = load_tasks(specs or list(DEFAULT_TASKS), limit=args.limit)
    models = [x if x is not None else _evaluate_now(m, tasks, args) for m, x in zip(args.models, loaded)]
    if args.against and reference is None:
        reference = _evaluate_now(args.against, tasks, args)
    candidates = [c for c, _ in models]
    if reference is not None:
        baseline = reference[0]
    elif len(models) == 1:
        baseline = models[0][1]  # a run's own report: the result against its base
        if baseline is None:
            raise TuneforgeError("compare needs two models, or a run whose evaluation has a baseline (or --against)")
    else:
        baseline, candidates = candidates[0], candidates[1:]
    title = _title(candidates[0], baseline) if len(candidates) == 1 else f"{len(candidates)} models vs {baseline.label}"
    report = build_report(candidates, baseline, title=title, resamples=args.resamples, seed=args.seed)
    return _emit(report, Path(args.out) if args.out else None, args.json)


def _saved(arg: str) -> tuple[Any, Any] | None:
    """``(candidate, baseline)`` results saved at ``arg`` (a run dir, an eval dir, a report.json), or None."""
    from tuneforge.eval.report import load_report

    path = Path(arg).expanduser()
    for candidate in (path, path / "report.json", path / "eval" / "report.json"):
        if candidate.is_file() and candidate.suffix == ".json":
            report = load_report(candidate)
            if not report.candidates:
                raise TuneforgeError(f"{candidate}: the report holds no results")
            result = report.candidates[0]
            if candidate.parent.name == "eval" and candidate.parent.parent == path:  # a run: named by its directory
                result = replace(result, label=path.name)
            return result, report.baseline
    return None


def _task_specs(saved: list[Any]) -> list[str]:
    specs: list[str] = []
    for entry in saved:
        if entry is not None:
            for result in [entry[0], entry[1]]:
                for t in result.tasks.values() if result is not None else []:
                    if t.spec and t.spec not in specs and t.engine == "tuneforge":
                        specs.append(t.spec)
    return specs


def _evaluate_now(ref: str, tasks: Any, args: argparse.Namespace) -> tuple[Any, None]:
    from tuneforge.eval.api import evaluate_model

    return evaluate_model(
        ref, tasks, batch_size=args.batch_size, device=args.device, tracking_uri=args.tracking_uri, say=_say
    ), None


def _title(candidate: Any, baseline: Any) -> str:
    return f"{candidate.label} vs {baseline.label}" if baseline is not None else f"{candidate.label}"


def _default_out(label: str) -> Path:
    from tuneforge.paths import state_dir

    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in label)[:60]
    return state_dir() / "evals" / f"{safe}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _emit(report: Any, out: Path | None, as_json: bool) -> int:
    from tuneforge.eval.report import text, write_report

    paths = write_report(report, out) if out is not None else {}
    if as_json:
        summary = {
            "title": report.title,
            "models": {
                c.label: c.flat_values() for c in [*report.candidates, *([report.baseline] if report.baseline else [])]
            },
            "comparisons": {k: [r.to_dict() for r in rows] for k, rows in report.comparisons.items()},
            "notes": report.notes,
            "report": str(paths["json"]) if paths else None,
        }
        print(json.dumps(_jsonable(summary), indent=2, default=str))
    else:
        print(text(report))
        if paths:
            print(f"\nreport: {paths['markdown']}")
    return 0


def _jsonable(obj: Any) -> Any:
    """NaN and infinities (a metric with no items in a group) as null: the output stays valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return obj
