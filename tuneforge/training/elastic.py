"""SFT / CPT as a task for the elastic engine (:mod:`tuneforge.distributed`).

Each replica process builds this from the recipe. ``prepare`` finds the token cache warm (the first
replica or the launcher wrote it), so a replacement skips tokenisation entirely; the model, optimizer and
schedule are built exactly as in a single-process run, and the step itself is the same
:class:`~tuneforge.training.sft_task.SFTTask` code — which is what makes an elastic run equal a fixed one.

Factory string for a JobSpec: ``"tuneforge.training.elastic:make_task"``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tuneforge.config import load_recipe


class ElasticSFTTask:
    def __init__(self, config: Mapping[str, Any]) -> None:
        from tuneforge.training.build import prepare

        self.recipe = load_recipe(dict(config["recipe"]))
        self.micro_batch_size = int(config["micro_batch_size"])
        self.threads = int(config.get("threads") or 1)
        self.prepared = prepare(self.recipe)
        self.metrics_path = Path(config["metrics_path"]) if config.get("metrics_path") else None
        self.task: Any = None

    def build(self, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
        from tuneforge.planner import resolve
        from tuneforge.training.build import build_model
        from tuneforge.training.loop import make_optimizer
        from tuneforge.training.schedule import lr_multiplier

        torch.set_num_threads(self.threads)
        torch.set_flush_denormal(True)
        res = resolve(self.recipe, self.prepared.num_steps)
        device = torch.device(res.device)
        model = build_model(self.recipe, device)
        t = self.recipe.train
        optimizer = make_optimizer(model, t.lr, t.weight_decay, t.betas, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_multiplier(t.schedule, res.total_steps, res.warmup_steps, t.min_lr_ratio))
        self.task = self.prepared.make_task(model, self.micro_batch_size, res.precision, device)
        return model, optimizer, scheduler

    def num_samples(self) -> int:
        return self.prepared.plan.num_steps * self.prepared.plan.global_batch_size

    def loss_tokens(self, indices: Sequence[int]) -> int:
        return self.task.loss_tokens(indices)

    def forward_backward(self, model: torch.nn.Module, indices: Sequence[int], scale: float) -> Mapping[str, float]:
        out = self.task.forward_backward(model, indices, scale)
        return {"loss": float(out["loss_sum"]) * scale, "tokens_fed": float(out["tokens_fed"])}

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        """Called on the rank-0 replica after each committed step: the same metrics.jsonl as a local run."""
        if self.metrics_path is None:
            return
        tokens = self.task.loss_tokens(range(step * self.prepared.plan.global_batch_size,
                                             (step + 1) * self.prepared.plan.global_batch_size))
        row = {"step": step + 1, "loss": float(metrics.get("loss", float("nan"))),
               "tokens": int(metrics.get("tokens_fed", 0)), "supervised_tokens": tokens}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def save_final(self, model: torch.nn.Module, folder: Path) -> None:
        """The result in standard form (PEFT adapter or full model + tokenizer), like a single-process run."""
        from tuneforge.models.adapters import is_peft
        from tuneforge.models.export import save_result

        save_result(model, self.prepared.tokenizer, Path(folder) / ("adapter" if is_peft(model) else "model"))


def make_task(config: Mapping[str, Any]) -> ElasticSFTTask:
    return ElasticSFTTask(config)


def run_elastic(recipe: Any, run_dir: Path, *, replicas: str | None, fault_plan: str | None,
                micro_batch_size: int, num_steps: int) -> tuple[Any, Path]:
    """Run `recipe` on elastic replicas under a supervisor; returns the run report and the result dir."""
    import os

    from tuneforge.distributed import JobSpec, ResilienceConfig, parse_replicas
    from tuneforge.distributed import run as run_job

    resilience = dict(recipe.resilience)
    if replicas:
        lo, hi = parse_replicas(replicas)
        resilience.update(min_replicas=lo, max_replicas=hi)
        resilience.setdefault("replicas", hi)
    if fault_plan:
        resilience["fault_plan"] = fault_plan
    res = ResilienceConfig.from_dict(resilience)
    cores = len(os.sched_getaffinity(0))
    threads = recipe.train.num_threads or max(1, cores // max(1, res.initial_replicas))
    spec = JobSpec(
        task="tuneforge.training.elastic:make_task",
        task_config={"recipe": recipe.to_dict(), "micro_batch_size": micro_batch_size, "threads": threads,
                     "metrics_path": str(run_dir / "metrics.jsonl")},
        steps=num_steps, global_batch_size=recipe.train.global_batch_size, micro_batch_size=micro_batch_size,
        seed=recipe.train.seed, shuffle=False,  # the plan is already shuffled and mixed, by global index
        max_grad_norm=recipe.train.grad_clip, resilience=res,
    )
    report = run_job(spec, run_dir)
    final = run_dir / "final"
    out = final / "adapter" if (final / "adapter").is_dir() else final / "model"
    return report, out
