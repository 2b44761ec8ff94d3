"""Which samples a replica works on at a step: a pure function of (step, participants).

Every sample has a *global index* in ``[0, num_samples)``. The data stream is the concatenation of
per-epoch permutations (seeded), and a *position* counts samples consumed from that stream. With the
default ``fixed`` batch policy step ``s`` always covers positions ``[s*B, (s+1)*B)`` — the same global
batch whoever is alive — and only the split over the ``world`` participating replicas (and into
micro-batches on each) depends on membership. A failed step is simply recomputed with the same indices
by the new membership, so no sample is ever skipped or seen twice.

The ``per_replica`` policy (opt-in) lets the global batch follow the membership
(``world * per_replica_batch_size``); the learning rate is then scaled by an explicit rule.

Nothing here touches processes or the network, so it is tested exhaustively and fast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from tuneforge.errors import RecipeError

BatchMode = Literal["fixed", "per_replica"]
LRScaling = Literal["none", "linear", "sqrt"]


@dataclass(frozen=True)
class BatchPolicy:
    """How big each step's global batch is and how the LR reacts when it varies.

    ``fixed`` (default): every step has exactly ``global_batch_size`` samples; LR is never touched.
    ``per_replica``: each participating replica contributes ``per_replica_batch_size`` samples, so the
    global batch varies with membership; the LR multiplier is ``(world / base_replicas)`` (``linear``),
    its square root (``sqrt``) or 1 (``none``).
    """

    global_batch_size: int
    micro_batch_size: int
    mode: BatchMode = "fixed"
    per_replica_batch_size: int = 0
    lr_scaling: LRScaling = "none"
    base_replicas: int = 1

    def __post_init__(self) -> None:
        if self.mode not in ("fixed", "per_replica"):
            raise RecipeError(
                f"resilience.batch_policy: unknown mode {self.mode!r} (expected 'fixed' or 'per_replica')"
            )
        if self.lr_scaling not in ("none", "linear", "sqrt"):
            raise RecipeError(
                f"resilience.lr_scaling: unknown rule {self.lr_scaling!r} (expected none, linear or sqrt)"
            )
        if self.micro_batch_size < 1:
            raise RecipeError(f"micro_batch_size: must be >= 1, got {self.micro_batch_size}")
        if self.mode == "fixed":
            if self.global_batch_size < 1:
                raise RecipeError(f"global_batch_size: must be >= 1, got {self.global_batch_size}")
            if self.lr_scaling != "none":
                raise RecipeError(
                    "resilience.lr_scaling: LR scaling only applies when the batch may vary "
                    "(set resilience.batch_policy: per_replica), the fixed policy keeps batch and LR"
                )
        else:
            if self.per_replica_batch_size < 1:
                raise RecipeError(
                    "resilience.per_replica_batch_size: must be >= 1 with batch_policy per_replica, "
                    f"got {self.per_replica_batch_size}"
                )
            if self.base_replicas < 1:
                raise RecipeError(f"resilience.base_replicas: must be >= 1, got {self.base_replicas}")

    def batch_size(self, world: int) -> int:
        """Global batch size of a step run by ``world`` replicas."""
        if self.mode == "fixed":
            return self.global_batch_size
        return self.per_replica_batch_size * world

    def lr_multiplier(self, world: int) -> float:
        """Factor applied to every param group's LR for a step run by ``world`` replicas."""
        if self.mode == "fixed" or self.lr_scaling == "none":
            return 1.0
        ratio = world / self.base_replicas
        return ratio if self.lr_scaling == "linear" else math.sqrt(ratio)


@lru_cache(maxsize=4)
def epoch_order(num_samples: int, epoch: int, seed: int, shuffle: bool = True) -> tuple[int, ...]:
    """The order of global indices in one epoch: a seeded permutation (same in every process)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not shuffle:
        return tuple(range(num_samples))
    import torch

    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return tuple(torch.randperm(num_samples, generator=gen).tolist())


def indices_at(position: int, count: int, num_samples: int, seed: int, shuffle: bool = True) -> list[int]:
    """Global indices at stream positions ``[position, position + count)`` (may cross epochs)."""
    out: list[int] = []
    pos = position
    end = position + count
    while pos < end:
        epoch, offset = divmod(pos, num_samples)
        take = min(end - pos, num_samples - offset)
        out.extend(epoch_order(num_samples, epoch, seed, shuffle)[offset : offset + take])
        pos += take
    return out


def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """Contiguous, balanced share of ``indices`` for ``rank`` of ``world`` (sizes differ by <= 1)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid rank {rank} for world {world}")
    base, extra = divmod(len(indices), world)
    start = rank * base + min(rank, extra)
    size = base + (1 if rank < extra else 0)
    return list(indices[start : start + size])


def micro_batches(indices: Sequence[int], micro_batch_size: int) -> list[list[int]]:
    """Split a replica's share into micro-batches of at most ``micro_batch_size`` (gradient accumulation)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    return [list(indices[i : i + micro_batch_size]) for i in range(0, len(indices), micro_batch_size)]


@dataclass(frozen=True)
class StepPlan:
    """Everything one replica needs to run its part of one step."""

    step: int
    position: int  # stream position of the first sample of this step's global batch
    world: int
    rank: int
    global_indices: tuple[int, ...]
    local_indices: tuple[int, ...]
    micro_batches: tuple[tuple[int, ...], ...]
    lr_multiplier: float

    @property
    def next_position(self) -> int:
        return self.position + len(self.global_indices)


def start_position(policy: BatchPolicy, step: int, carried_position: int) -> int:
    """Stream position where ``step`` starts: ``step * B`` for the fixed policy, else the carried cursor."""
    if policy.mode == "fixed":
        return step * policy.global_batch_size
    return carried_position


def plan_step(
    policy: BatchPolicy,
    step: int,
    position: int,
    rank: int,
    world: int,
    num_samples: int,
    seed: int,
    shuffle: bool = True,
) -> StepPlan:
    """The plan for ``rank`` of ``world`` at ``step`` starting at stream ``position``."""
    size = policy.batch_size(world)
    global_indices = indices_at(position, size, num_samples, seed, shuffle)
    local = shard(global_indices, rank, world)
    return StepPlan(
        step=step,
        position=position,
        world=world,
        rank=rank,
        global_indices=tuple(global_indices),
        local_indices=tuple(local),
        micro_batches=tuple(tuple(mb) for mb in micro_batches(local, policy.micro_batch_size)),
        lr_multiplier=policy.lr_multiplier(world),
    )
