"""The run directory, the only thing the supervisor and the replica processes share.

    job.json          the JobSpec every replica builds        control.json   target replica count
    lighthouse.addr   where the lighthouse listens             status/        one small JSON per replica
    events/           JSON-lines logs (metrics)                ckpt/          async disk checkpoints
    logs/             stdout/stderr of every child             final/         final parameters
    faults/           once-only tokens of fired faults

Kept free of heavy imports: both sides import it at start-up.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tuneforge.files import atomic_write

EXIT_DONE = 0  # committed the job's last step
EXIT_ORPHANED = 3  # joined to heal but no peer held live state
EXIT_LEFT = 10  # left on request (scale down) or an unused hot spare


def write_status(run_dir: Path, slot: int | str, **data: Any) -> None:
    """Atomically publish a replica's state (phase, step, pid) for the supervisor."""
    payload = json.dumps({"t": time.time(), "pid": os.getpid(), **data})
    atomic_write(run_dir / "status" / f"replica_{slot}.json", payload, fsync=False)  # read at once, never kept


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """Complete disk checkpoints, oldest first (partial writes never get the final name)."""
    folder = run_dir / "ckpt"
    return sorted(folder.glob("step_*.pt")) if folder.exists() else []


def wait_for_lighthouse(run_dir: Path, timeout_s: float = 120.0) -> str:
    """The lighthouse address; the supervisor writes it once the lighthouse listens."""
    path = run_dir / "lighthouse.addr"
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if path.exists() and (addr := path.read_text().strip()):
            return addr
        time.sleep(0.02)
    raise TimeoutError(f"no lighthouse address in {path} after {timeout_s:.0f}s")
