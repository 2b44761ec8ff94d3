"""Evaluation inside a training run: the recipe's ``eval:`` section.

At the end of a successful run (local or elastic) the result and the base are evaluated on the ``eval.tasks``; the
report — table with deltas and paired 95 % intervals, chart, JSON with every per-item statistic — is written to
``RUN_DIR/eval/`` and logged to the run's MLflow run (metrics under ``eval/…`` and a table artifact), so MLflow's
run comparison and ``tuneforge compare RUN …`` line runs up. The base is evaluated with the *training* chat
template (the one saved with the result), so both models see the same prompts.

With ``eval.every``, the model being trained is also evaluated every N steps (single-process runs: an elastic run's
replicas each hold a share of a step, and evaluating there would stall all of them), logged as the same
``eval/…`` metrics at that step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from tuneforge.config import Recipe
from tuneforge.errors import RecipeError, TuneforgeError
from tuneforge.eval.tasks import Task, load_tasks
from tuneforge.methods import method_spec

log = logging.getLogger(__name__)

REPORT_DIR = "eval"


def check_recipe(recipe: Recipe) -> list[Task]:
    """Load the recipe's evaluation tasks (files, names, every record) before training starts; [] without any."""
    if recipe.eval is None:
        return []
    spec = method_spec(recipe.method)
    if spec.model != "causal_lm":
        raise RecipeError(
            f"eval: method {recipe.method} trains a {spec.model.replace('_', ' ')}, and evaluation tasks measure "
            "language models; remove the eval: section"
        )
    try:
        return load_tasks(recipe.eval.tasks, limit=recipe.eval.limit)
    except TuneforgeError as e:
        raise RecipeError(f"eval.tasks: {e}") from None


def evaluate_run(
    recipe: Recipe, run_dir: Path, out_dir: Path, tracker: Any, *, step: int, device: str
) -> dict[str, Any]:
    """Evaluate the result (and the base) and write and log the report; returns a summary for the run's result.

    A user-fixable problem here (a result that cannot be loaded as a language model) is logged and reported in the
    summary instead of raised: the run itself succeeded and its result is saved.
    """
    from tuneforge.eval.api import build_report, evaluate_model, log_report
    from tuneforge.eval.report import write_report
    from tuneforge.models.refs import resolve_model

    assert recipe.eval is not None
    try:
        tasks = check_recipe(recipe)
        result = resolve_model(str(out_dir), tracking_uri=recipe.tracking.uri)
        result = replace(result, label=recipe.name)
        kw = {"batch_size": recipe.eval.batch_size, "device": device}
        candidate = evaluate_model(result, tasks, **kw)
        baseline = None
        if recipe.eval.baseline:
            base = resolve_model(recipe.model.path, tracking_uri=recipe.tracking.uri)
            # The training template, not whatever the base shipped with: both models answer the same prompts.
            base = replace(base, tokenizer=result.tokenizer, chat_template=result.chat_template, label="base")
            baseline = evaluate_model(base, tasks, **kw)
    except TuneforgeError as e:
        log.warning("evaluation skipped: %s", e)
        return {"error": str(e)}
    report = build_report([candidate], baseline, title=f"{recipe.name}: result vs base" if baseline else recipe.name)
    paths = write_report(report, run_dir / REPORT_DIR)
    log_report(tracker, report, paths, step=step)
    rows = report.comparisons.get(candidate.label)
    return {
        "report": str(paths["markdown"]),
        "values": candidate.flat_values(),
        "comparisons": [r.to_dict() for r in rows] if rows is not None else None,
        "notes": report.notes,
    }


def periodic(recipe: Recipe, tokenizer: Any) -> Callable[[Any, int], dict[str, float]] | None:
    """The loop's every-N-steps hook: the live model on the recipe's tasks, as ``eval/TASK/METRIC`` values."""
    if recipe.eval is None or recipe.eval.every is None:
        return None
    tasks = check_recipe(recipe)
    batch_size = recipe.eval.batch_size

    def run(model: Any, step: int) -> dict[str, float]:
        from tuneforge.eval.runner import evaluate

        results = evaluate(model, tokenizer, tasks, batch_size=batch_size, label=recipe.name)
        return {f"eval/{k}": v for k, v in results.flat_values().items() if math.isfinite(v)}

    return run
