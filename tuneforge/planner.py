"""Recipe + hardware + data → the resolved plan: every ``auto`` becomes a concrete, explained value."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from tuneforge.config import Recipe
from tuneforge.errors import RecipeError
from tuneforge.methods import method_spec
from tuneforge.training.precision import pick_device, pick_precision
from tuneforge.training.schedule import warmup_steps_for

# Tokens per micro-batch that keep activations cache-friendly on CPU / comfortably in GPU memory for
# the small-to-medium models tuneforge trains by default.
MICRO_TOKENS = {"cpu": 8192, "cuda": 32768, "mps": 16384}


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

    def as_dict(self) -> dict:
        return asdict(self)


def sequences_per_sample(recipe: Recipe) -> int:
    """How many sequences of up to ``data.max_length`` tokens one sample puts through the model.

    Declared by the method's registry entry: a preference pair (``dpo``, ``reward``) is a chosen and a rejected
    answer to one prompt — two sequences, or one row of up to twice the length when the prompt is shared — so a
    micro-batch of ``m`` pairs holds about as many tokens as ``2 m`` SFT examples; a KTO example also scores its
    mismatched (KL) completion; a GRPO prompt is trained with its whole group of ``group_size`` completions.
    """
    return method_spec(recipe.method).sequences_per_sample(recipe)


def resolve_micro_batch(recipe: Recipe, device: torch.device, data_parallel: int = 1) -> int:
    """Samples per forward pass: the recipe's number, or for ``auto`` the most that fit the device's token budget.

    ``auto`` divides ``MICRO_TOKENS`` by the tokens one sample can take (``max_length`` times the sequences per
    sample, see :func:`sequences_per_sample`) and then steps down until it divides the per-replica batch, so
    every step accumulates whole micro-batches.
    """
    g = recipe.train.global_batch_size
    if g % data_parallel:
        raise RecipeError(
            f"train.global_batch_size={g} must be divisible by the {data_parallel} data-parallel replicas"
        )
    per_replica = g // data_parallel
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
            f"(train.global_batch_size={g} / {data_parallel} replicas)"
        )
    return m


def resolve(recipe: Recipe, total_steps: int, data_parallel: int = 1) -> Resolved:
    device = pick_device(recipe.train.device)
    micro = resolve_micro_batch(recipe, device, data_parallel)
    t = recipe.train
    eval_every = t.eval_every or max(1, total_steps // 10)
    return Resolved(
        device=str(device),
        precision=pick_precision(t.precision, device),
        micro_batch_size=micro,
        grad_accumulation=t.global_batch_size // data_parallel // micro,
        data_parallel=data_parallel,
        total_steps=total_steps,
        warmup_steps=warmup_steps_for(total_steps, t.warmup_steps, t.warmup_ratio),
        eval_every=eval_every,
        checkpoint_every=t.checkpoint_every,
        num_threads=t.num_threads or len(os.sched_getaffinity(0)),
    )
