"""Learning-rate schedules: linear warmup, then cosine, linear or constant, down to ``min_lr_ratio``."""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_multiplier(schedule: str, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """The factor on the peak learning rate at optimizer step `step` (0-based)."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        decay = max(total_steps - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / decay, 1.0)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * shape

    return factor


def warmup_steps_for(total_steps: int, warmup_steps: int | None, warmup_ratio: float) -> int:
    if warmup_steps is not None:
        return min(warmup_steps, total_steps)
    return round(total_steps * warmup_ratio)
