"""Measuring what a run really used, to hold the forecast against: peak memory of the training phase.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` — every byte the caching allocator
handed to a tensor, at its highest point, minus what was allocated before the model was built.

CPU: the kernel's own high-water mark of the process's resident memory (``VmHWM``), reset through
``/proc/self/clear_refs`` just before the model is built, minus the resident memory at that moment. The kernel
updates it on every page fault, so unlike sampling it cannot miss a short spike; and it counts everything the
training phase made resident — tensors, allocator slack and fragmentation, kernels' scratch buffers, libraries
loaded on first use — which is what the OOM killer sees. It can only over-state the tensors' own peak, never hide
memory, which is why the planner is checked against it. Where ``clear_refs`` is not writable (not Linux, or a
locked-down container) the lifetime peak ``ru_maxrss`` is used, and the result says so.
"""

from __future__ import annotations

import re
import resource
from dataclasses import dataclass
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")


def _status_kb(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", STATUS.read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def _reset_cpu_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS (Linux ≥ 4.0)
    except OSError:
        return False
    return True


@dataclass
class MemoryMeter:
    """``start()`` before the model is built, ``peak_bytes()`` after training: the training phase's peak."""

    device: torch.device
    method: str = ""
    baseline: int = 0

    def start(self) -> MemoryMeter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        else:
            exact = _reset_cpu_peak()
            self.baseline = _status_kb("VmRSS") or 0
            self.method = "VmHWM (peak RSS, reset before the model)" if exact else "ru_maxrss (lifetime peak RSS)"
        return self

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return max(torch.cuda.max_memory_allocated(self.device) - self.baseline, 0)
        peak = _status_kb("VmHWM")
        if peak is None or self.method.startswith("ru_maxrss"):
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(peak - self.baseline, 0)
