"""Any method whose registry entry says ``elastic`` as a task for the elastic engine (:mod:`tuneforge.distributed`).

Each replica process builds this from the recipe. ``prepare`` finds the token cache warm (the launcher wrote it),
so a replacement skips tokenisation entirely; the model, optimizer and schedule are built exactly as in a
single-process run, and the step itself is the same :class:`~tuneforge.training.task.Task` code — which is what
makes an elastic run equal a fixed one. The method's per-step metrics travel as additive (total, weight) pairs
(:meth:`StepOutput.flat`), so a DPO run on replicas logs the same metric names and values as a local one.

Factory string for a JobSpec: ``"tuneforge.training.elastic:make_task"``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tuneforge.config import Recipe, load_recipe
from tuneforge.files import atomic_write
from tuneforge.models.adapters import is_peft
from tuneforge.models.export import save_result
from tuneforge.planner import resolve
from tuneforge.planning.measure import MemoryMeter
from tuneforge.training.build import build_model, prepare
from tuneforge.training.loop import make_optimizer
from tuneforge.training.schedule import lr_multiplier
from tuneforge.training.task import Task, unflatten_metrics

EVALS_FILE = "evals.json"  # the final held-out evaluation, written by rank 0 next to the result
PEAK_KEY = "peak_mb.max"  # this replica's peak memory so far; the engine keeps the maximum over replicas
MB = 2**20


class ElasticTask:
    """The engine's ``ReplicaTask`` protocol over one method's :class:`Task`."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.recipe: Recipe = load_recipe(dict(config["recipe"]))
        self.micro_batch_size = int(config["micro_batch_size"])
        self.threads = int(config.get("threads") or 1)
        self.prepared = prepare(self.recipe)
        self.metrics_path = Path(config["metrics_path"]) if config.get("metrics_path") else None
        self.task: Task | None = None
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.meter: MemoryMeter | None = None
        self._lr = 0.0
        self._t_last = time.perf_counter()

    def build(self, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
        torch.set_num_threads(self.threads)
        torch.set_flush_denormal(True)
        res = resolve(self.recipe, self.prepared.num_steps)
        device = torch.device(res.device)
        self.meter = MemoryMeter(device).start()  # as a local run: the peak from right before the model is built
        self._t_last = time.perf_counter()  # the first step's time counts from here too, as a local run's wall time
        model = build_model(self.recipe, device)
        t = self.recipe.train
        optimizer = make_optimizer(model, t.lr, t.weight_decay, t.betas, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_multiplier(t.schedule, res.total_steps, res.warmup_steps, t.min_lr_ratio)
        )
        self.task = self.prepared.make_task(model, self.micro_batch_size, res.precision, device)
        self.model, self.optimizer = model, optimizer
        return model, optimizer, scheduler

    def _task(self) -> Task:
        if self.task is None:
            raise RuntimeError("ElasticTask.build() must run before training")
        return self.task

    def num_samples(self) -> int:
        return self.prepared.plan.num_steps * self.prepared.plan.global_batch_size

    def rows_for_step(self, step: int) -> Sequence[int]:
        """The step's samples by global index (online methods reuse a batch of rollouts for several steps)."""
        return self._task().rows_for_step(step)

    def prepare_step(
        self,
        model: torch.nn.Module,
        step: int,
        rows: Sequence[int],
        share: Sequence[int],
        reduce: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        """Before the step's gradients: the task prepares the whole step, working on this replica's `share` and
        combining shares with `reduce` (a sum over the participants; it raises if the step must be retried)."""
        assert self.optimizer is not None
        self._task().begin_step(model, step, list(rows), share=list(share), reduce=reduce)
        self._lr = float(self.optimizer.param_groups[0]["lr"])

    def loss_tokens(self, indices: Sequence[int]) -> int:
        return self._task().loss_tokens(indices)

    def state_dict(self, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any]:
        """What live recovery and disk checkpoints carry: model, optimizer, schedule, and the task's own state
        (online RL: the current batch of rollouts, which a replacement joining mid-batch cannot resample)."""
        state: dict[str, Any] = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        task_state = getattr(self._task(), "state_dict", None)
        if callable(task_state):
            state["task"] = task_state()
        return state

    def load_state_dict(self, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: Mapping[str, Any]) -> None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and "scheduler" in state:
            scheduler.load_state_dict(state["scheduler"])
        load = getattr(self._task(), "load_state_dict", None)
        if callable(load) and "task" in state:
            load(state["task"])

    def forward_backward(self, model: torch.nn.Module, indices: Sequence[int], scale: float) -> Mapping[str, float]:
        """The step's metric shares, and this replica's peak memory after the backward pass (maximised, not summed,
        by the engine: each replica holds the whole model, so the run's peak is the largest replica's)."""
        out = self._task().forward_backward(model, indices, scale).flat(scale)
        if self.meter is not None:
            out[PEAK_KEY] = self.meter.peak_bytes() / MB
        return out

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        """Called on the rank-0 replica after each committed step: the same metrics.jsonl rows as a local run."""
        if self.metrics_path is None:
            return
        now = time.perf_counter()
        values = unflatten_metrics(metrics)
        peak = values.pop(PEAK_KEY, None)
        row = {
            "step": step + 1,
            "loss": values.pop("loss", float("nan")),
            "grad_norm": values.pop("grad_norm", 0.0),
            "lr": self._lr,
            "tokens": int(values.pop("tokens_fed", 0)),
            "step_s": now - self._t_last,
            **values,
            **({"peak_mb": peak} if peak is not None else {}),  # max over replicas, read by the planner check
        }
        self._t_last = now
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def save_final(self, model: torch.nn.Module, folder: Path) -> None:
        """The result in standard form (PEFT adapter or full model + tokenizer), like a single-process run, and
        the final held-out evaluation under the same metric names."""
        folder = Path(folder)
        self.prepared.finish(model, folder)
        atomic_write(folder / EVALS_FILE, json.dumps(self._task().evaluate(model)))
        save_result(model, self.prepared.tokenizer, folder / ("adapter" if is_peft(model) else "model"))


def make_task(config: Mapping[str, Any]) -> ElasticTask:
    return ElasticTask(config)


def run_elastic(
    recipe: Recipe,
    run_dir: Path,
    *,
    replicas: str | None,
    fault_plan: str | None,
    micro_batch_size: int,
    num_steps: int,
) -> tuple[Any, Path, dict[str, float]]:
    """Run `recipe` on elastic replicas under a supervisor; returns the report, the result dir and the final eval."""
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
        task_config={
            "recipe": recipe.to_dict(),
            "micro_batch_size": micro_batch_size,
            "threads": threads,
            "metrics_path": str(run_dir / "metrics.jsonl"),
        },
        steps=num_steps,
        global_batch_size=recipe.train.global_batch_size,
        micro_batch_size=micro_batch_size,
        seed=recipe.train.seed,
        shuffle=False,  # the plan is already shuffled and mixed, by global index
        max_grad_norm=recipe.train.grad_clip,
        resilience=res,
    )
    report = run_job(spec, run_dir)
    final = run_dir / "final"
    out = final / "adapter" if (final / "adapter").is_dir() else final / "model"
    evals = json.loads((final / EVALS_FILE).read_text()) if (final / EVALS_FILE).exists() else {}
    return report, out, evals
