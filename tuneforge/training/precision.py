"""Device and precision policy: fast by default, never the slow path.

bf16 autocast is chosen where the hardware runs it natively — CUDA GPUs with bf16, CPUs with AMX tiles —
and fp32 elsewhere. AVX512-BF16 alone is not enough on a CPU: per-op casts cost more than they save for
the small matrices such CPUs train (see benchmarks/precision_cpu.py).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch


def pick_device(preference: str = "auto") -> torch.device:
    if preference != "auto":
        if preference == "cuda" and not torch.cuda.is_available():
            from tuneforge.errors import RecipeError

            raise RecipeError("train.device: cuda was asked for but no CUDA GPU is visible (use auto or cpu)")
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    return "amx_bf16" in cpu_flags()


def pick_precision(preference: str, device: torch.device) -> str:
    """Resolve ``auto`` to ``bf16`` or ``fp32`` for this device."""
    if preference != "auto":
        return preference
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed-precision context for the forward pass; weights and optimizer state stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
