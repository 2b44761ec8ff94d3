"""Calibration: a few timed optimizer steps of the real model on the real data, through the real loop.

Three measurements (medians, first step excluded: it pays for lazy initialisation), from which
:mod:`tuneforge.planning.timing`'s step model takes its three numbers:

* the recipe's steps as it splits its batch into micro-batches;
* the same steps one sample per micro-batch (or two, when the recipe already takes one) — the same samples, the
  same FLOPs — so the difference is the fixed cost of the extra passes (``pass_s``);
* an optimizer step on the model's trainable parameters — fresh gradients, clipping, AdamW — (``param_s``).

The FLOP rate is the first measurement's FLOPs over its time less those fixed costs. All three are cached per
hardware, model and adapter family, so later forecasts for this machine and model are calibrated. With
``profile_memory`` the steps also run under PyTorch's profiler, whose allocation log gives the peak of live tensor
bytes on the CPU — the same quantity ``torch.cuda.max_memory_allocated`` reports on a GPU (it slows the steps, so
those are not timed).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tuneforge.config import Recipe
from tuneforge.models.loading import model_fingerprint
from tuneforge.planning.measure import MemoryMeter
from tuneforge.planning.resolve import Resolved
from tuneforge.planning.timing import Rate, family, fixed_seconds, hardware_key, rate_entry, record_rate, step_flops
from tuneforge.planning.workload import policy_shape, step_work
from tuneforge.training.progress import Progress


class StepClock(Progress):
    """Silent progress that notes the process's CPU time at each step (the loop reports every step here).

    On a machine shared with other work, wall time measures the neighbours; the CPU time of a single-threaded run
    measures the step itself (``clock="cpu"``, what ``benchmarks/planner_accuracy.py`` uses on shared boxes)."""

    def __init__(self, total: int) -> None:
        super().__init__(total, enabled=False)
        self.cpu = [time.process_time()]

    def update(self, step: int, metrics: dict[str, float]) -> None:
        self.cpu.append(time.process_time())


@dataclass
class Measured:
    step_s: list[float] = field(default_factory=list)
    peak_bytes: int = 0  # tensors (profiler / CUDA allocator) or resident memory, see `memory_kind`
    memory_kind: str = "process"
    decode_step_s: float = 0.0
    optimizer_s: float = 0.0  # one optimizer step over the trainable parameters (when probed)
    trainable: int = 0
    pass_s: float = 0.0

    @property
    def median_step_s(self) -> float:
        tail = self.step_s[1:] or self.step_s
        return statistics.median(tail) if tail else 0.0


def shape_key(recipe: Recipe, res: Resolved) -> str:
    t = recipe.data.max_length
    return f"{recipe.method}-{recipe.adapter.kind}-m{res.micro_batch_size}x{res.grad_accumulation}-L{t}-ckpt{int(res.gradient_checkpointing)}"


def run_steps(
    recipe: Recipe,
    res: Resolved,
    prepared: Any,
    steps: int = 3,
    *,
    profile_memory: bool = False,
    clock: str = "wall",
    probe_optimizer: bool = False,
) -> Measured:
    """Train `steps` optimizer steps from a fresh model, through :func:`tuneforge.training.loop.train_loop`.

    ``clock="cpu"`` times steps by the process's CPU time instead of the wall clock (see :class:`StepClock`);
    ``probe_optimizer`` then times optimizer steps alone (:func:`optimizer_seconds`)."""
    from tuneforge.training.build import build_model
    from tuneforge.training.loop import LoopSettings, make_optimizer, train_loop

    recipe = res.apply(recipe)
    torch.set_num_threads(res.num_threads)
    torch.set_flush_denormal(True)
    device = torch.device(res.device)
    meter = MemoryMeter(device).start()
    profiler = None
    if profile_memory and device.type == "cpu":
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        profiler.__enter__()
    model = build_model(recipe, device)
    t = recipe.train
    optimizer = make_optimizer(model, res.lr, t.weight_decay, t.betas, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    task = prepared.make_task(model, res.micro_batch_size, res.precision, device)
    settings = LoopSettings(steps, t.global_batch_size, t.grad_clip, 1, None, None, 1)
    progress = StepClock(steps)
    with tempfile.TemporaryDirectory() as tmp:
        loop = train_loop(model, optimizer, scheduler, task, settings, run_dir=Path(tmp), progress=progress)
    wall = [float(r["step_s"]) for r in loop.history]
    out = Measured(wall if clock == "wall" else [b - a for a, b in zip(progress.cpu, progress.cpu[1:])])
    out.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if probe_optimizer:
        out.optimizer_s = optimizer_seconds(model, optimizer, t.grad_clip, clock=clock)
    if profiler is not None:
        profiler.__exit__(None, None, None)
        out.peak_bytes, out.memory_kind = tensor_peak(profiler), "tensors"
    else:
        out.peak_bytes = meter.peak_bytes()
        out.memory_kind = "tensors" if device.type == "cuda" else "process"
    return out


def tensor_peak(profiler: Any) -> int:
    """Peak of live CPU tensor bytes from the profiler's allocation log (allocations +, frees −, in time order)."""
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            live += e.nbytes()
            peak = max(peak, live)
    return peak


def optimizer_seconds(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None,
    reps: int = 5,
    clock: str = "wall",
) -> float:
    """Median seconds of what a step does once per trainable parameter besides the passes: fresh gradients (the
    backward allocates them), clipping, AdamW, and letting the gradients go (the weights it moves are thrown away)."""
    params = [p for p in model.parameters() if p.requires_grad]
    now = time.perf_counter if clock == "wall" else time.process_time
    times = []
    for _ in range(reps + 1):
        t0 = now()
        for p in params:
            p.grad = torch.zeros_like(p)
        torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(now() - t0)
    return statistics.median(times[1:])  # the first allocates AdamW's moments


def decode_step_seconds(
    recipe: Recipe, device: torch.device, rows: int, steps: int = 8, clock: str = "wall", blocks: int = 5
) -> float:
    """Seconds of one batched decode step with a KV cache (the fixed cost sampling pays per generated token): the
    median of `blocks` runs of `steps` steps, each from a fresh 8-token prefill (one short run is at the mercy of
    whatever else the machine does in those milliseconds)."""
    from tuneforge.models.adapters import prepare_qlora, qlora_quantization
    from tuneforge.models.loading import load_model
    from tuneforge.training.precision import pick_precision

    qlora = recipe.adapter.kind == "qlora"  # QLoRA samples from its 4-bit base: time that
    quantization = qlora_quantization(pick_precision(recipe.train.precision, device)) if qlora else None
    model = load_model(recipe.model.path, dtype=torch.float32, device=device, quantization=quantization)
    model = (prepare_qlora(model) if qlora else model).eval()
    ids = torch.ones((rows, 8), dtype=torch.long, device=device)
    now = time.perf_counter if clock == "wall" else time.process_time
    per_step = []
    with torch.no_grad():
        for _ in range(blocks + 1):  # the first warms up
            out = model(input_ids=ids, use_cache=True)
            cache, nxt = out.past_key_values, ids[:, -1:]
            t0 = now()
            for _ in range(steps):
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
            per_step.append((now() - t0) / steps)
    return statistics.median(per_step[1:])


def calibrate(recipe: Recipe, res: Resolved, prepared: Any, steps: int = 4, clock: str = "wall") -> Measured:
    """Time `steps` real steps as the recipe splits its batch and one sample per micro-batch, an optimizer step and
    a decode step; cache the rate and fixed costs this hardware reached (see the module)."""
    from tuneforge.methods import method_spec

    spec = method_spec(recipe.method)
    shape = policy_shape(recipe, spec)
    per_replica = recipe.train.global_batch_size // res.data_parallel
    measured = run_steps(recipe, res, prepared, steps, clock=clock, probe_optimizer=True)
    rate = Rate(0.0, param_s=measured.optimizer_s / max(measured.trainable, 1))

    def work(r: Resolved):
        return step_work(
            recipe,
            shape,
            per_replica=per_replica,
            gradient_checkpointing=r.gradient_checkpointing,
            prepared=prepared,
            micro=r.micro_batch_size,
        )

    m = res.micro_batch_size
    other = 1 if m > 1 else 2 if per_replica % 2 == 0 else None  # the most passes more (or fewer) it can have
    if other is not None:  # the same samples in other micro-batches: the same FLOPs, other passes
        alt = replace(res, micro_batch_size=other, grad_accumulation=per_replica // other)
        again = run_steps(recipe, alt, prepared, steps, clock=clock)
        a, b = work(res), work(alt)
        per_pass = (b.passes - a.passes) * (1 + (a.extra_forwards + int(a.gradient_checkpointing)) / 3)
        rate.pass_s = max((again.median_step_s - measured.median_step_s) / per_pass, 0.0)
    measured.pass_s = rate.pass_s
    rows = min(recipe.generation.batch_size, 16)  # sampling's fixed cost per decode step barely depends on rows
    measured.decode_step_s = rate.decode_step_s = decode_step_seconds(
        recipe, torch.device(res.device), rows, clock=clock
    )
    w = work(res)
    entry = rate_entry(
        shape_key(recipe, res),
        step_flops(shape, w),
        measured.median_step_s - fixed_seconds(w, rate),
        family(recipe.adapter.kind),
        rate,
    )
    if entry is not None:
        record_rate(
            hardware_key(torch.device(res.device).type, res.num_threads, res.precision),
            model_fingerprint(recipe.model.path),
            entry,
        )
    return measured
