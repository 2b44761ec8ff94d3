"""The hardware a plan is made for: this machine's device, or a named one (``cpu:16GB``, ``cuda:80GB``, ``cuda:80GBx8``).

A named spec plans for hardware you don't have (the time forecast then comes from the FLOP model alone); the local
device is measured: a GPU's free memory from the driver, a CPU's from ``MemAvailable`` (and the cgroup's limit,
when a container sets one — the OOM killer enforces that one, not the machine's total).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from tuneforge.errors import RecipeError

GB = 1024**3
MB = 1024**2

# Dense fp32 / bf16 FLOP/s for hardware we have not calibrated on: the FLOP model's fallback (peak × a typical
# 40 % model-FLOP utilisation for training, per Chowdhery et al. 2022 / PaLM's MFU accounting).
PEAK_FLOPS = {
    ("cpu", "fp32"): 100e9,  # per core: two AVX-512 FMA units at ~3 GHz is ~190 GFLOP/s; AVX2 half that
    ("cpu", "bf16"): 400e9,  # per core with AMX
    ("cuda", "fp32"): 60e12,  # H100 TF32
    ("cuda", "bf16"): 990e12,  # H100 SXM dense bf16
    ("cuda", "fp16"): 990e12,
    ("mps", "fp32"): 10e12,
}
MFU = 0.4


@dataclass(frozen=True)
class Hardware:
    """A device kind and how much memory a run may use on it; ``local`` when it is this machine's."""

    kind: str  # cpu, cuda, mps
    memory_bytes: int
    threads: int = 1
    replicas: int = 1  # data-parallel replicas of this device (a cluster spec)
    local: bool = False
    name: str = ""

    @property
    def label(self) -> str:
        head = self.name or self.kind
        more = f" ×{self.replicas}" if self.replicas > 1 else ""
        return f"{head} ({self.memory_bytes / GB:.1f} GiB{more})"

    def peak_flops(self, precision: str) -> float:
        """The FLOP model's rate for hardware without a calibration (already discounted by :data:`MFU`)."""
        rate = PEAK_FLOPS.get((self.kind, precision)) or PEAK_FLOPS.get((self.kind, "fp32"), 100e9)
        return rate * (self.threads if self.kind == "cpu" else 1) * MFU


SPEC = re.compile(r"^(?P<kind>cpu|cuda|mps)(?::(?P<mem>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]i?B)?)?(?:x(?P<n>\d+))?$", re.I)


def parse_size(text: str, field: str = "memory") -> int:
    """``16GB`` / ``512MiB`` / ``1.5G`` / a plain number of bytes → bytes (binary units: a GB is 2**30 here)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])?i?B?\s*", str(text), re.I)
    if not m:
        raise RecipeError(f"{field}: {text!r} is not a size (expected e.g. 16GB, 512MB)")
    scale = {"K": 1024, "M": MB, "G": GB, "T": 1024 * GB}.get((m.group(2) or "").upper(), 1)
    return int(float(m.group(1)) * scale)


def parse_hardware(spec: str | None, device: str = "auto") -> Hardware:
    """``None``: this machine (the recipe's device). Otherwise ``KIND[:MEMORY][xREPLICAS]``, e.g. ``cuda:80GBx8``."""
    if spec is None:
        return local_hardware(device)
    m = SPEC.match(spec.strip())
    if not m:
        raise RecipeError(
            f"--hardware {spec!r}: expected cpu, cuda or mps, optionally :MEMORY and xREPLICAS (cuda:80GBx8)"
        )
    kind = m.group("kind").lower()
    here = local_hardware(kind) if kind == _local_kind() or kind == "cpu" else None
    memory = parse_size(m.group("mem") + (m.group("unit") or "GB"), "--hardware") if m.group("mem") else None
    if memory is None and here is None:
        raise RecipeError(f"--hardware {spec!r}: say how much memory the {kind} device has, e.g. {kind}:80GB")
    if memory is None:
        assert here is not None
        memory = here.memory_bytes
    replicas = int(m.group("n") or 1)
    local = here is not None and m.group("mem") is None and replicas == 1
    return Hardware(kind, memory, here.threads if here is not None else 1, replicas, local, spec)


def _local_kind() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def local_hardware(device: str = "auto") -> Hardware:
    """This machine: the device the recipe would train on and the memory free on it now."""
    import torch

    kind = _local_kind() if device == "auto" else device
    threads = len(os.sched_getaffinity(0))
    if kind == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return Hardware("cuda", int(free), threads, 1, True, torch.cuda.get_device_name())
    return Hardware(kind, cpu_available_bytes(), threads, 1, True, "cpu")


def cpu_available_bytes() -> int:
    """Memory a new allocation can get without swapping or the OOM killer: MemAvailable, capped by the cgroup."""
    available = _meminfo("MemAvailable") or _meminfo("MemTotal") or 8 * GB
    limit = _cgroup_limit()
    if limit is not None:
        used = _cgroup_usage() or 0
        available = min(available, max(limit - used, 0))
    return available


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        v = _read_int(path)
        if v is not None and v < 1 << 60:  # "max" or the v1 sentinel mean no limit
            return v
    return None


def _cgroup_usage() -> int | None:
    for path in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
        v = _read_int(path)
        if v is not None:
            return v
    return None
