"""``tuneforge.train(recipe, **overrides)`` — the whole run, from recipe to registered model.

The CLI is a thin layer over this function. Order matters and is deliberate: the recipe and every data
record are checked first (cheap, and an error there loses nothing), then the tokenizer and token cache,
then the plan, and only then is the model loaded.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tuneforge.config import Recipe, load_recipe, recipe_yaml
from tuneforge.errors import TuneforgeError
from tuneforge.files import atomic_write
from tuneforge.methods import METHODS, PROMPT_LEARNING, method_spec
from tuneforge.paths import runs_dir


@dataclass
class TrainResult:
    """What a run produced: where things are and what was measured."""

    run_dir: Path
    output_dir: Path  # adapter or full model, loadable with plain transformers / peft
    merged_dir: Path | None
    metrics: dict[str, float]
    history: list[dict[str, float]]
    evals: list[dict[str, float]]
    mix: dict[str, Any]
    resolved: dict[str, Any]
    data: dict[str, Any]
    tracking_run_id: str | None = None
    model_version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Keyword overrides: ``train__lr=1e-4`` or ``**{"train.lr": 1e-4}``."""
    return {k.replace("__", "."): v for k, v in overrides.items()}


def _run_dir(recipe: Recipe) -> Path:
    if recipe.output.dir:
        return Path(recipe.output.dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = runs_dir() / f"{recipe.name}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = runs_dir() / f"{recipe.name}-{stamp}-{n}"
    return path


def train(
    recipe: str | Path | dict[str, Any] | Recipe,
    *,
    resume: str | Path | None = None,
    progress: bool | None = None,
    set: list[str] | None = None,
    replicas: str | None = None,
    fault_plan: str | None = None,
    force: bool = False,
    **overrides: Any,
) -> TrainResult:
    """Train a recipe (path, dict or :class:`Recipe`); returns paths and measured metrics.

    ``resume`` continues from a checkpoint (or the newest in a run directory) exactly where it stopped.
    ``progress`` shows terminal progress (default: only when stderr is a terminal). ``replicas="2:8"``
    (or a ``resilience:`` section with ``max_replicas > 1``) trains on elastic, fault-tolerant replicas;
    ``fault_plan`` injects failures (``"kill:1@10"``) for tests and demos. A run whose memory forecast exceeds
    what the device has is refused before the model loads; ``force`` trains anyway.
    """
    from tuneforge.models.refs import resolve_recipe_model

    if isinstance(recipe, Recipe):
        recipe = load_recipe(recipe.to_dict(), _overrides(overrides))
    else:
        recipe = load_recipe(recipe, set)
        if overrides:
            recipe = load_recipe(recipe.to_dict(), _overrides(overrides))
    recipe = resolve_recipe_model(recipe)  # model.path may be models:/NAME@ALIAS or ft:…: the directory it names
    from tuneforge.eval.training import check_recipe

    check_recipe(recipe)  # eval: tasks and their records, before any training
    show = progress if progress is not None else os.isatty(2)
    if (
        replicas
        or fault_plan
        or int(recipe.resilience.get("max_replicas", 1)) > 1
        or recipe.resilience.get("lighthouse")
    ):
        spec = method_spec(recipe.method)
        if not spec.elastic:
            elastic = ", ".join(m.name for m in METHODS.values() if m.elastic)
            raise TuneforgeError(
                f"method {recipe.method}: elastic replicas (--replicas, resilience) run {elastic}; "
                f"{recipe.method} trains in one process for now"
            )
        if resume is not None:
            raise TuneforgeError(
                "--resume applies to single-process runs; an elastic run restarts from its "
                "own disk checkpoints automatically when every replica has died"
            )
        return _train_elastic(recipe, replicas=replicas, fault_plan=fault_plan, show=show, force=force)
    return _train(recipe, resume=resume, show=show, force=force)


def _train_elastic(
    recipe: Recipe, *, replicas: str | None, fault_plan: str | None, show: bool, force: bool = False
) -> TrainResult:
    """Validate and tokenize once here (so replicas find the token cache warm), then supervise replicas."""
    from tuneforge.planner import resolve
    from tuneforge.planning.record import check_run
    from tuneforge.training.build import prepare
    from tuneforge.training.elastic import run_elastic
    from tuneforge.training.progress import Progress
    from tuneforge.training.watch import RunWatcher

    wall0 = time.perf_counter()
    prepared = prepare(recipe)
    res = resolve(recipe, prepared.num_steps, prepared=prepared)
    recipe = res.apply(recipe)  # replicas train with the resolved lr and checkpointing
    planned = check_run(recipe, res, prepared, force=force)  # per replica: each holds the whole model
    run_dir = _run_dir(recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(recipe_yaml(recipe))
    tracker = _start_tracker(recipe, res, prepared.data_hashes, run_dir)
    bar = Progress(prepared.num_steps, enabled=show)
    with tracker:
        tracker.log_metrics(prepared.mix_metrics(), step=0)
        bar.note(_describe(recipe, res, prepared, run_dir))
        with RunWatcher(run_dir, bar, log_every=recipe.train.log_every):
            report, out_dir, final_eval = run_elastic(
                recipe,
                run_dir,
                replicas=replicas,
                fault_plan=fault_plan,
                micro_batch_size=res.micro_batch_size,
                num_steps=prepared.num_steps,
            )
        history = (
            [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            if (run_dir / "metrics.jsonl").exists()
            else []
        )
        for row in history:  # the same train/* series a local run logs while it trains
            tracker.log_metrics({f"train/{k}": float(v) for k, v in row.items() if k != "step"}, step=row["step"])
        for i, event in enumerate(report.failures):  # one point per failure, in order
            tracker.log_metrics(
                {
                    f"recovery/{k}": float(v)
                    for k, v in vars(event).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "t_fault"
                },
                step=i,
            )
        evals = [{"step": prepared.num_steps, **final_eval}] if final_eval else []
        if final_eval:
            tracker.log_metrics(final_eval, step=prepared.num_steps)
        train_seconds = sum(float(r.get("step_s", 0.0)) for r in history)
        tokens = sum(int(r.get("tokens", 0)) for r in history)
        metrics = {
            **report.summary(),
            **_final_metrics(history, evals, train_seconds, tokens, prepared.num_steps, wall0),
        }
        result = _finish(
            recipe,
            prepared,
            res,
            run_dir,
            out_dir,
            tracker,
            metrics,
            history,
            evals,
            extra={"report": report.to_dict(), "planner": planned.finish(history, tracker)},
        )
    bar.note(prepared.mix_summary())
    result.extra["report"] = report
    return result


def _train(recipe: Recipe, *, resume: str | Path | None, show: bool, force: bool = False) -> TrainResult:
    from tuneforge.training.build import prepare

    wall0 = time.perf_counter()
    prepared = prepare(recipe)  # all data checked, tokenized and planned before the model loads

    import torch

    from tuneforge.eval.training import periodic as periodic_eval
    from tuneforge.models.adapters import is_peft
    from tuneforge.models.export import save_result
    from tuneforge.planner import resolve
    from tuneforge.planning.record import check_run
    from tuneforge.training.build import build_model
    from tuneforge.training.checkpoint import find_checkpoint, load_checkpoint
    from tuneforge.training.loop import LoopSettings, make_optimizer, train_loop
    from tuneforge.training.progress import Progress
    from tuneforge.training.schedule import lr_multiplier

    res = resolve(recipe, prepared.num_steps, prepared=prepared)
    recipe = res.apply(recipe)  # every auto the model and optimizer read, made concrete
    planned = check_run(recipe, res, prepared, force=force)  # refuses, with the numbers, what cannot fit
    torch.set_num_threads(res.num_threads)
    torch.set_flush_denormal(True)  # denormal gradients/optimizer states slow CPU kernels by 10× or more
    device = torch.device(res.device)
    planned.start_measuring()
    model = build_model(recipe, device)
    optimizer = make_optimizer(model, recipe.train.lr, recipe.train.weight_decay, recipe.train.betas, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(recipe.train.schedule, res.total_steps, res.warmup_steps, recipe.train.min_lr_ratio)
    )

    run_dir = _run_dir(recipe)
    start_step = 0
    if resume is not None:
        ckpt = find_checkpoint(resume)
        meta = load_checkpoint(ckpt, model, optimizer, scheduler)
        if meta.get("recipe_hash") not in (None, _train_hash(recipe)):
            raise TuneforgeError(
                f"--resume {resume}: the checkpoint was made with a different recipe "
                "(data, model or training settings changed); resume needs the same recipe"
            )
        start_step = int(meta["step"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(recipe_yaml(recipe))

    tracker = _start_tracker(recipe, res, prepared.data_hashes, run_dir)
    task = prepared.make_task(model, res.micro_batch_size, res.precision, device)
    settings = LoopSettings(
        total_steps=res.total_steps,
        global_batch_size=recipe.train.global_batch_size,
        grad_clip=recipe.train.grad_clip,
        log_every=recipe.train.log_every,
        eval_every=res.eval_every,
        checkpoint_every=res.checkpoint_every,
        keep_checkpoints=recipe.train.keep_checkpoints,
        eval_hook=periodic_eval(recipe, prepared.tokenizer),  # the recipe's eval.tasks every eval.every steps
        eval_hook_every=recipe.eval.every if recipe.eval else None,
    )
    bar = Progress(res.total_steps, start_step, enabled=show)
    bar.note(_describe(recipe, res, prepared, run_dir))
    with tracker:
        tracker.log_metrics(prepared.mix_metrics(), step=0)
        loop = train_loop(
            model,
            optimizer,
            scheduler,
            task,
            settings,
            start_step=start_step,
            run_dir=run_dir,
            progress=bar,
            log_fn=tracker.log_metrics,
            checkpoint_meta={"recipe_hash": _train_hash(recipe)},
        )
        planner = planned.finish(loop.history, tracker)  # the training phase's peak, before saving copies anything
        prepared.finish(model, run_dir)  # e.g. PPO's value head: kept next to the result, not in it
        out_dir = save_result(model, prepared.tokenizer, run_dir / ("adapter" if is_peft(model) else "model"))
        metrics = _final_metrics(loop.history, loop.evals, loop.train_seconds, loop.tokens, prepared.num_steps, wall0)
        # What follows (merge, end-of-run evaluation) loads the saved result from disk: free the trained copy, its
        # optimizer states and the task's models (reference, teacher) first, so peak memory does not double.
        del model, optimizer, scheduler, task
        gc.collect()
        result = _finish(
            recipe, prepared, res, run_dir, out_dir, tracker, metrics, loop.history, loop.evals, {"planner": planner}
        )
    bar.note(prepared.mix_summary())
    bar.note(f"saved {result.output_dir}" + (f" and {result.merged_dir}" if result.merged_dir else ""))
    return result


def _finish(
    recipe: Recipe,
    prepared: Any,
    res: Any,
    run_dir: Path,
    out_dir: Path,
    tracker: Any,
    metrics: dict[str, float],
    history: list[dict[str, float]],
    evals: list[dict[str, float]],
    extra: dict[str, Any] | None = None,
) -> TrainResult:
    """What every run does at the end, local or elastic: merge, result.json, final metrics, artifacts, registry."""
    from tuneforge.lineage import register_result, registered_name
    from tuneforge.models.adapters import is_peft_dir
    from tuneforge.models.export import merge_adapter

    merged = None
    if recipe.output.merge and is_peft_dir(out_dir) and recipe.adapter.kind not in PROMPT_LEARNING:
        merged = merge_adapter(out_dir, run_dir / "merged", base=recipe.model.path)
    evaluation = None
    if recipe.eval is not None:  # the result and its base on the recipe's tasks: RUN_DIR/eval/ and MLflow
        from tuneforge.eval.training import evaluate_run

        evaluation = evaluate_run(recipe, run_dir, out_dir, tracker, step=res.total_steps, device=res.device)
    atomic_write(
        run_dir / "result.json",
        json.dumps(
            {
                "metrics": metrics,
                "mix": prepared.mix_dict(),
                "resolved": res.as_dict(),
                "data": prepared.data_info,
                **(extra or {}),
                **({"eval": evaluation} if evaluation is not None else {}),
            },
            indent=2,
            default=str,
        ),
    )
    tracker.log_metrics({f"final/{k}": v for k, v in metrics.items()}, step=res.total_steps)
    for name in ("recipe.yaml", "result.json", "metrics.jsonl"):
        if (run_dir / name).exists():
            tracker.log_artifact(run_dir / name)
    version = None
    if registered_name(recipe) is None:  # a registered version uploads the weights itself
        tracker.log_artifact(out_dir, out_dir.name)
    else:  # with its lineage and the prompt versions it was trained with (tuneforge.lineage)
        version = register_result(recipe, prepared, run_dir, merged or out_dir, tracker)
    return TrainResult(
        run_dir=run_dir,
        output_dir=out_dir,
        merged_dir=merged,
        metrics=metrics,
        history=history,
        evals=evals,
        mix=prepared.mix_dict(),
        resolved=res.as_dict(),
        data=prepared.data_info,
        tracking_run_id=getattr(tracker, "run_id", None),
        model_version=version,
        extra={"eval": evaluation} if evaluation is not None else {},
    )


def _train_hash(recipe: Recipe) -> str:
    """Hash of what determines the trajectory (not output/tracking settings)."""
    d = recipe.to_dict()
    d.pop("output", None)
    d.pop("tracking", None)
    d.pop("eval", None)
    d["train"].pop("checkpoint_every", None)
    d["train"].pop("log_every", None)
    d["train"].pop("eval_every", None)
    return _hash_dict(d)


def _hash_dict(d: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _final_metrics(
    history: list[dict[str, float]],
    evals: list[dict[str, float]],
    train_seconds: float,
    tokens: int,
    num_steps: int,
    wall0: float,
) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if history:
        tail = history[-max(1, min(10, len(history))) :]
        metrics["train_loss"] = sum(h["loss"] for h in tail) / len(tail)
        metrics["first_loss"] = history[0]["loss"]
    if evals:
        metrics.update({k.replace("val/", "val_"): v for k, v in evals[-1].items() if k != "step"})
        if evals[0]["step"] == 0:  # a baseline taken before training (online RL)
            metrics.update({"initial_" + k.replace("val/", "val_"): v for k, v in evals[0].items() if k != "step"})
    if train_seconds:
        metrics["tokens_per_s"] = tokens / train_seconds
    metrics["train_seconds"] = train_seconds
    metrics["wall_seconds"] = time.perf_counter() - wall0
    metrics["steps"] = float(num_steps)
    return metrics


def _describe(recipe: Recipe, res: Any, prepared: Any, run_dir: Path) -> str:
    src = ", ".join(
        f"{name} ({st['train']} ex{', cached' if st['cache_hit'] else ''})" for name, st in prepared.data_info.items()
    )
    return (
        f"tuneforge {recipe.method} · {recipe.adapter.kind} · {res.device}/{res.precision} · "
        f"{res.total_steps} steps × {recipe.train.global_batch_size} rows "
        f"(micro {res.micro_batch_size} × accum {res.grad_accumulation}) · data: {src}\nrun dir: {run_dir}"
    )


def _start_tracker(recipe: Recipe, res: Any, data_hashes: dict[str, str], run_dir: Path) -> Any:
    from tuneforge.tracking.mlflow_tracker import NullTracker, Tracker

    if not recipe.tracking.enabled:
        return NullTracker()
    params = {"recipe": recipe.to_dict(), "resolved": res.as_dict()}
    tags = {
        "tuneforge.method": recipe.method,
        "tuneforge.base_model": recipe.model.path,
        "tuneforge.recipe_hash": recipe.hash(),
        "tuneforge.run_dir": str(run_dir),
        **{f"tuneforge.data_hash.{k}": v for k, v in data_hashes.items()},
    }
    return Tracker.start(
        experiment=recipe.tracking.experiment,
        run_name=recipe.tracking.run_name or run_dir.name,
        params=params,
        tags=tags,
        tracking_uri=recipe.tracking.uri,
    )


def export(run_or_adapter: str | Path, out_dir: str | Path, *, merge: bool = True, base: str | None = None) -> Path:
    """Export a run's result; with ``merge`` the adapter is folded into full weights."""
    from tuneforge.models.export import merge_adapter

    src = Path(run_or_adapter)
    adapter = src / "adapter" if (src / "adapter").is_dir() else src
    if (src / "model").is_dir() and not (src / "adapter").is_dir():
        shutil.copytree(src / "model", out_dir, dirs_exist_ok=True)
        return Path(out_dir)
    if not merge:
        shutil.copytree(adapter, out_dir, dirs_exist_ok=True)
        return Path(out_dir)
    return merge_adapter(adapter, out_dir, base=base)
