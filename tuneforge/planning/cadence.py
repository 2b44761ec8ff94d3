"""``train.checkpoint_every: auto``: how often a run saves a resumable checkpoint.

A checkpoint costs the time to write it; a failure costs the work done since the last one. With failures arriving
at random, ``M`` seconds apart on average, and a checkpoint taking ``δ`` seconds to write, the expected time lost is
least for checkpoints every

    τ = √(2 · δ · M)

seconds of work: Young's first-order optimum (J. W. Young, "A first order approximation to the optimum checkpoint
interval", Communications of the ACM 17(9), 1974). Daly's higher-order estimate (J. T. Daly, "A higher order
estimate of the optimum checkpoint interval for restart dumps", Future Generation Computer Systems 22(3), 2006)
multiplies it by ``1 + √(δ/2M)/3 + δ/18M`` and subtracts ``δ``: under 2 % for any ``δ`` below ``M / 1000`` — a
checkpoint that writes in a minute against a day between failures — so Young's form is used as it stands.

* ``δ`` — the checkpoint's size (trainable weights and AdamW's two moments in fp32: what
  :func:`tuneforge.training.checkpoint.save_checkpoint` writes) over the write bandwidth of the file system the run
  writes to, plus the fixed cost of writing a file there; both measured once per file system (a small and a 32 MiB
  file, each written and ``fsync``'d) and cached. For hardware that is not this machine, 1 GB/s and 10 ms are assumed.
* ``M`` — ``train.mtbf_hours``: the mean time between failures that stop the run (a preempted or crashed machine,
  an out-of-memory kill, a lost node), 24 h by default — a spot or shared machine; a dedicated one fails less often.
* ``τ`` becomes steps with the forecast step time, rounded to a multiple of the optimizer steps online methods take
  on each batch of rollouts (a resumed run must start on a fresh batch).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tuneforge.files import atomic_write
from tuneforge.paths import cache_dir, runs_dir

ASSUMED_BANDWIDTH = 1e9  # bytes/s: a local NVMe or a good network file system, for hardware we cannot measure
ASSUMED_LATENCY = 0.01  # seconds to create, write and close a small file
PROBE_BYTES = 32 * 2**20
CHECKPOINT_FLOATS = 3  # per trainable parameter: the weight, AdamW's exp_avg and exp_avg_sq (fp32 each)


@dataclass(frozen=True)
class Disk:
    bandwidth: float  # bytes/s written and flushed
    latency: float  # seconds of fixed cost per file
    source: str  # "measured" or "assumed"


def checkpoint_bytes(trainable: int) -> int:
    """What a checkpoint writes: the trainable parameters and their two AdamW moments, fp32 (RNG and scheduler
    states are a few kB)."""
    return CHECKPOINT_FLOATS * 4 * trainable


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _timed_write(path: Path, data: bytes) -> float:
    t0 = time.perf_counter()
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def measure_disk(directory: Path) -> Disk:
    """Write bandwidth and per-file cost of the file system holding `directory`, cached per file system."""
    directory = _existing(directory)
    key = str(directory.stat().st_dev)
    cache = cache_dir("disk") / "write.json"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    if key in known:
        return Disk(known[key]["bandwidth"], known[key]["latency"], "measured")
    probe = directory / f".tuneforge-disk-probe-{os.getpid()}"
    try:
        small = min(_timed_write(probe, b"\0" * 4096) for _ in range(3))
        big = _timed_write(probe, os.urandom(2**20) * (PROBE_BYTES // 2**20))  # not all zeros: no FS compresses it
    except OSError:
        return Disk(ASSUMED_BANDWIDTH, ASSUMED_LATENCY, "assumed")
    finally:
        probe.unlink(missing_ok=True)
    disk = Disk(PROBE_BYTES / max(big - small, 1e-6), small, "measured")
    known[key] = {"bandwidth": disk.bandwidth, "latency": disk.latency, "directory": str(directory)}
    atomic_write(cache, json.dumps(known, indent=1))
    return disk


def run_disk(output_dir: str | None, local: bool) -> Disk:
    """The disk a run's checkpoints go to: measured on this machine, assumed for hardware we don't have."""
    if not local:
        return Disk(ASSUMED_BANDWIDTH, ASSUMED_LATENCY, "assumed")
    return measure_disk(Path(output_dir).expanduser() if output_dir else runs_dir())


def young_interval(write_s: float, mtbf_s: float) -> float:
    """Young's optimal seconds of work between checkpoints, √(2 δ M)."""
    return math.sqrt(2 * write_s * mtbf_s)


def auto_checkpoint_every(
    *,
    trainable: int,
    step_s: float,
    mtbf_hours: float,
    total_steps: int,
    disk: Disk,
    multiple: int = 1,
) -> tuple[int, str]:
    """Steps between checkpoints and the one line that explains them."""
    size = checkpoint_bytes(trainable)
    write_s = disk.latency + size / disk.bandwidth
    tau = young_interval(write_s, mtbf_hours * 3600)
    steps = tau / max(step_s, 1e-9)
    multiple = max(multiple, 1)
    every = max(multiple, round(steps / multiple) * multiple)
    line = (
        f"checkpoint every {every}: Young's √(2 × {write_s:.2g} s write × {mtbf_hours:g} h MTBF) = {tau:.3g} s "
        f"÷ {step_s:.3g} s/step ({size / 2**20:.1f} MB at {disk.bandwidth / 2**20:.0f} MB/s, {disk.source})"
    )
    if multiple > 1:
        line += f", a multiple of the {multiple} updates per batch of rollouts"
    if every >= total_steps:
        line += f"; the {total_steps}-step run is shorter, so it saves none"
    return every, line
