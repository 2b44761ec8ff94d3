"""Recipe + hardware + data → the resolved plan: every ``auto`` becomes a concrete value with a one-line reason.

The rules, and what they follow:

* **micro-batch** — the most samples that fit the device's token budget (``MICRO_TOKENS``: throughput), then
  fewer while the memory forecast exceeds the memory limit less a safety margin, always a divisor of the
  per-replica batch so every step accumulates whole micro-batches; **gradient accumulation** is what is left.
* **gradient checkpointing** (``auto``) — off when the plan fits without it (recomputation costs a forward pass),
  on when only it makes one sample fit.
* **precision** — bf16 autocast where the hardware runs it natively (:func:`tuneforge.training.precision.pick_precision`).
* **learning rate** (``auto``) — Thinking Machines' fit over model widths ("LoRA Without Regret", Schulman et al.
  2025; tinker-cookbook ``get_lr``): ``5e-5 · (2000 / hidden)^0.781`` for full fine-tuning, ×10 for LoRA/DoRA,
  whose optimum they find independent of the rank under the α/r scaling PEFT uses (so no rank term); a method
  factor from the registry (preference and RL methods ~10× lower, as Tülu 3's recipes); the square-root rule for
  Adam's batch size (Malladi et al. 2022) relative to a batch of 32; 3e-2 for prompt-learning adapters (PEFT's
  prompt-tuning examples; Lester et al. 2021 train soft prompts at 0.3 with Adafactor).
* **epochs** (``auto``) — OpenAI's ``n_epochs: auto`` rule (:func:`tuneforge.data.sampler.auto_epochs`).
* **warmup** — ``warmup_ratio`` of the steps unless ``warmup_steps`` is set; **evaluation** 10 times a run;
  **threads** — every core this process may run on.
* **checkpoint cadence** (``auto``) — Young's optimal interval √(2 × write time × MTBF) (Young 1974; Daly 2006),
  in steps of the forecast step time (:mod:`tuneforge.planning.cadence`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tuneforge.config import Recipe
from tuneforge.data.sampler import auto_epochs
from tuneforge.errors import ModelError, RecipeError
from tuneforge.methods import PROMPT_LEARNING, method_spec
from tuneforge.planning.cadence import auto_checkpoint_every, run_disk
from tuneforge.planning.hardware import Hardware, local_hardware, parse_size
from tuneforge.planning.shape import ModelShape
from tuneforge.planning.timing import rate_for, step_seconds
from tuneforge.planning.workload import memory, policy_shape, step_work, trainable_params
from tuneforge.training.precision import pick_device, pick_precision
from tuneforge.training.schedule import warmup_steps_for

# Tokens per micro-batch that keep activations cache-friendly on CPU / comfortably in GPU memory for
# the small-to-medium models tuneforge trains by default.
MICRO_TOKENS = {"cpu": 8192, "cuda": 32768, "mps": 16384}
SAFETY = 0.10  # the forecast must stay this far below the memory limit
# What the process really makes resident per forecast tensor byte: the CUDA caching allocator's blocks; glibc keeps
# freed blocks for reuse, so a CPU run's peak RSS exceeds its tensors' (measured 1.45–1.55× by planner_accuracy.py).
ALLOCATOR_OVERHEAD = {"cpu": 1.5, "cuda": 1.05, "mps": 1.1}


@dataclass
class Resolved:
    device: str
    precision: str
    micro_batch_size: int
    grad_accumulation: int
    data_parallel: int
    total_steps: int
    warmup_steps: int
    eval_every: int | None
    checkpoint_every: int | None
    num_threads: int
    lr: float = 0.0
    gradient_checkpointing: bool = False
    epochs: float | None = None
    memory_limit_bytes: int | None = None
    explain: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "explain"}

    def apply(self, recipe: Recipe) -> Recipe:
        """The recipe with this plan's learning rate, gradient checkpointing and checkpoint cadence in place of
        ``auto`` (what the run trains with, what ``recipe.yaml`` records, what elastic replicas receive)."""
        d = recipe.to_dict()
        d["train"]["lr"] = self.lr
        d["train"]["gradient_checkpointing"] = self.gradient_checkpointing
        if d["train"]["checkpoint_every"] == "auto":
            d["train"]["checkpoint_every"] = self.checkpoint_every
        return Recipe.model_validate(d)


def sequences_per_sample(recipe: Recipe) -> int:
    """How many sequences of up to ``data.max_length`` tokens one sample puts through the model.

    Declared by the method's registry entry: a preference pair (``dpo``, ``reward``) is a chosen and a rejected
    answer to one prompt — two sequences, or one row of up to twice the length when the prompt is shared — so a
    micro-batch of ``m`` pairs holds about as many tokens as ``2 m`` SFT examples; a KTO example also scores its
    mismatched (KL) completion; a GRPO prompt is trained with its whole group of ``group_size`` completions.
    """
    return method_spec(recipe.method).sequences_per_sample(recipe)


def per_replica_batch(recipe: Recipe, data_parallel: int) -> int:
    g = recipe.train.global_batch_size
    if g % data_parallel:
        raise RecipeError(
            f"train.global_batch_size={g} must be divisible by the {data_parallel} data-parallel replicas"
        )
    return g // data_parallel


def resolve_micro_batch(recipe: Recipe, device: torch.device, data_parallel: int = 1) -> int:
    """Samples per forward pass: the recipe's number, or for ``auto`` the most that fit the device's token budget.

    ``auto`` divides ``MICRO_TOKENS`` by the tokens one sample can take (``max_length`` times the sequences per
    sample, see :func:`sequences_per_sample`) and then steps down until it divides the per-replica batch, so
    every step accumulates whole micro-batches.
    """
    per_replica = per_replica_batch(recipe, data_parallel)
    m = recipe.train.micro_batch_size
    if m == "auto":
        budget = MICRO_TOKENS.get(device.type, 8192)
        sample_tokens = recipe.data.max_length * sequences_per_sample(recipe)
        m = max(1, min(per_replica, budget // sample_tokens))
        while per_replica % m:
            m -= 1
    elif per_replica % m:
        raise RecipeError(
            f"train.micro_batch_size={m} must divide the per-replica batch {per_replica} "
            f"(train.global_batch_size={recipe.train.global_batch_size} / {data_parallel} replicas)"
        )
    return m


def auto_lr(recipe: Recipe, shape: ModelShape) -> tuple[float, str]:
    """``train.lr: auto`` and why (see the module docstring for the sources)."""
    a = recipe.adapter
    spec = method_spec(recipe.method)
    if a.kind in PROMPT_LEARNING:
        return 3e-2, f"lr 3e-2: {a.kind} trains virtual tokens only (PEFT's prompt-tuning rate)"
    base = 5e-5 * (2000 / shape.hidden) ** 0.781
    lora = 1.0 if a.kind == "full" else 10.0
    batch = (recipe.train.global_batch_size / 32) ** 0.5
    lr = base * lora * spec.lr_scale * batch
    parts = [f"5e-5·(2000/{shape.hidden})^0.781 = {base:.2g}"]
    if lora != 1:
        parts.append(f"×10 for {a.kind} (rank-independent under α/r)")
    if spec.lr_scale != 1:
        parts.append(f"×{spec.lr_scale:g} for {recipe.method}")
    if batch != 1:
        parts.append(f"×√({recipe.train.global_batch_size}/32) for the batch")
    return lr, f"lr {lr:.3g}: " + " ".join(parts)


def memory_limit(recipe: Recipe, hardware: Hardware) -> tuple[int, str]:
    if recipe.train.memory_limit:
        return parse_size(recipe.train.memory_limit, "train.memory_limit"), "train.memory_limit"
    return hardware.memory_bytes, f"{'free on ' if hardware.local else ''}{hardware.label}"


def resolve(
    recipe: Recipe,
    total_steps: int,
    data_parallel: int = 1,
    *,
    hardware: Hardware | None = None,
    prepared: Any = None,
) -> Resolved:
    """Every ``auto`` of `recipe` made concrete for `hardware` (default: this machine), each with its reason."""
    t = recipe.train
    hardware = hardware or local_hardware(t.device)
    device = pick_device(t.device) if hardware.local else torch.device(hardware.kind)
    data_parallel = max(data_parallel, hardware.replicas)
    explain: dict[str, str] = {}
    precision = pick_precision(t.precision, device) if hardware.local or t.precision != "auto" else _named(hardware)
    if t.precision == "auto":
        explain["precision"] = f"precision {precision}: " + (
            "bf16 autocast runs natively here" if precision == "bf16" else "no native bf16 matmul on this device"
        )
    per_replica = per_replica_batch(recipe, data_parallel)
    micro = resolve_micro_batch(recipe, device, data_parallel)
    sample_tokens = recipe.data.max_length * sequences_per_sample(recipe)
    if t.micro_batch_size == "auto":
        explain["micro_batch_size"] = (
            f"micro-batch {micro}: {micro} × {sample_tokens} tokens fit the "
            f"{MICRO_TOKENS.get(device.type, 8192) // 1024}k-token budget and divide the batch of {per_replica}"
        )
    ckpt = t.gradient_checkpointing is True
    limit, limit_src = memory_limit(recipe, hardware)
    try:
        shape: ModelShape | None = policy_shape(recipe)
    except (ModelError, OSError, ValueError):
        shape = None  # a hub id not downloaded yet: no memory fit, say so
    lr = t.lr if t.lr != "auto" else 2e-4
    if shape is not None:
        overhead = ALLOCATOR_OVERHEAD.get(device.type, 1.0)
        budget = limit * (1 - SAFETY)

        def need(m: int, c: bool) -> int:
            mem = memory(
                recipe,
                shape,
                micro=m,
                grad_accumulation=per_replica // m,
                gradient_checkpointing=c,
                precision=precision,
                prepared=prepared,
                data_parallel=data_parallel,
                device=device.type,
            )
            return int(mem.peak * overhead)

        # Checkpointing off before on (it costs a forward pass), then the largest micro-batch that fits.
        options = [ckpt] if t.gradient_checkpointing != "auto" else [False, True]
        sizes = [d for d in range(micro, 0, -1) if per_replica % d == 0] if t.micro_batch_size == "auto" else [micro]
        fitting = [(m, c) for c in options for m in sizes if need(m, c) <= budget]
        chosen = fitting[0] if fitting else (sizes[-1], options[-1])
        if t.micro_batch_size == "auto" and chosen[0] < micro:
            explain["micro_batch_size"] = (
                f"micro-batch {chosen[0]}: the largest divisor of {per_replica} whose forecast "
                f"({need(chosen[0], chosen[1]) / 2**20:.0f} MB) stays {SAFETY:.0%} under the {limit / 2**20:.0f} MB "
                f"limit ({limit_src}); {micro} would need {need(micro, chosen[1]) / 2**20:.0f} MB"
            )
        micro, ckpt = chosen
        if t.gradient_checkpointing == "auto":
            explain["gradient_checkpointing"] = (
                "grad-ckpt off: fits without"
                if not ckpt
                else f"grad-ckpt on: without it one micro-batch needs {need(micro, False) / 2**20:.0f} MB of "
                f"{limit / 2**20:.0f} MB"
            )
        if t.lr == "auto":
            lr, explain["lr"] = auto_lr(recipe, shape)
    elif t.gradient_checkpointing == "auto" or t.lr == "auto":
        explain["model"] = f"{recipe.model.path}: no local config.json, so no memory fit; auto lr falls back to 2e-4"
    epochs = None
    if t.max_steps is None:
        epochs = float(t.epochs) if t.epochs != "auto" else None
        if t.epochs == "auto" and prepared is not None:
            n = int(next(iter(prepared.data_info.values()), {}).get("train", 0))
            epochs = float(auto_epochs(n))
            explain["epochs"] = f"epochs {epochs:g}: {n} training examples (OpenAI's rule: ~3 passes, ≥100, ≤25k seen)"
    warmup = warmup_steps_for(total_steps, t.warmup_steps, t.warmup_ratio)
    if t.warmup_steps is None:
        explain["warmup_steps"] = f"warmup {warmup}: {t.warmup_ratio:.0%} of {total_steps} steps"
    eval_every = t.eval_every or max(1, total_steps // 10)
    if not t.eval_every:
        explain["eval_every"] = f"eval every {eval_every}: 10 evaluations over {total_steps} steps"
    threads = t.num_threads or len(os.sched_getaffinity(0))
    if not t.num_threads:
        explain["num_threads"] = f"threads {threads}: every core this process may use"
    checkpoint_every = t.checkpoint_every
    if checkpoint_every == "auto":
        multiple = int(getattr(prepared, "updates_per_batch", 1))  # online methods: steps per batch of rollouts
        if shape is None:
            checkpoint_every = max(multiple, round(max(1, total_steps // 10) / multiple) * multiple)
            explain["checkpoint_every"] = (
                f"checkpoint every {checkpoint_every}: no model config to forecast the step time from, so 10 a run"
            )
        else:
            work = step_work(
                recipe, shape, per_replica=per_replica, gradient_checkpointing=ckpt, prepared=prepared, micro=micro
            )
            checkpoint_every, explain["checkpoint_every"] = auto_checkpoint_every(
                trainable=trainable_params(recipe, method_spec(recipe.method), shape),
                step_s=step_seconds(shape, work, rate_for(recipe, hardware, threads, precision)),
                mtbf_hours=t.mtbf_hours,
                total_steps=total_steps,
                disk=run_disk(recipe.output.dir, hardware.local),
                multiple=multiple,
            )
    return Resolved(
        device=str(device),
        precision=precision,
        micro_batch_size=micro,
        grad_accumulation=per_replica // micro,
        data_parallel=data_parallel,
        total_steps=total_steps,
        warmup_steps=warmup,
        eval_every=eval_every,
        checkpoint_every=checkpoint_every,
        num_threads=threads,
        lr=float(lr),
        gradient_checkpointing=bool(ckpt),
        epochs=epochs,
        memory_limit_bytes=limit,
        explain=explain,
    )


def _named(hardware: Hardware) -> str:
    """Precision on hardware we don't have: bf16 on CUDA (every GPU since Ampere), fp32 on CPU."""
    return "bf16" if hardware.kind == "cuda" else "fp32"
