"""Terminal progress for runs whose steps happen in other processes (elastic replicas, service jobs).

A background thread follows the run directory: each new ``metrics.jsonl`` row moves the same progress bar (or
log line) a local run shows, and each failure, recovery and resize in the replicas' event logs becomes one line.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from tuneforge.training.progress import Progress

POLL_S = 0.5


def describe_event(event: dict[str, Any]) -> str | None:
    """One line for the events a person watching a run cares about; None for routine ones."""
    kind = event.get("kind")
    if kind == "fault":
        return f"fault: {event.get('desc', event.get('action'))} (replica {event.get('target')})"
    if kind == "replica_exit" and event.get("returncode") not in (0, None):
        return f"replica {event.get('replica')} exited with status {event.get('returncode')}"
    if kind == "healed" and event.get("source") is not None:
        return f"replica healed from a live peer at step {event.get('step')} in {event.get('seconds', 0):.2f} s"
    if kind == "spawn" and event.get("inc", 0):
        return f"replica {event.get('replica')} restarted ({event.get('mode', 'replacement')})"
    if kind == "scale":
        return f"resize: {event.get('previous')} → {event.get('target')} replicas"
    if kind == "cold_restart":
        return "every replica died: restarting from the last disk checkpoint"
    return None


class LineTail:
    """Complete lines appended to files since the last read, one offset per file (the service's job follower
    uses it too). A partial last line waits for the next read; the line number of each line is kept, so a
    reader started afresh on the same files numbers every line the same way."""

    def __init__(self) -> None:
        self._offsets: dict[Path, int] = {}
        self._lines: dict[Path, int] = {}

    def new_lines(self, path: Path) -> list[str]:
        return [text for _, text in self.numbered(path)]

    def numbered(self, path: Path) -> list[tuple[int, str]]:
        """``(1-based line number, text)`` of each new complete line of `path`."""
        try:
            with path.open("rb") as f:
                f.seek(self._offsets.get(path, 0))
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self._offsets[path] = self._offsets.get(path, 0) + end
        first = self._lines.get(path, 0)
        lines = data[:end].decode(errors="replace").splitlines()
        self._lines[path] = first + len(lines)
        return [(first + i + 1, text) for i, text in enumerate(lines)]


class RunWatcher:
    """Follows `run_dir` until stopped; use as a context manager around the blocking run."""

    def __init__(self, run_dir: Path, progress: Progress, *, log_every: int = 1) -> None:
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.log_every = max(1, log_every)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="tuneforge-watch", daemon=True)
        self._tail = LineTail()

    def __enter__(self) -> RunWatcher:
        self.progress.__enter__()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()  # whatever arrived after the last poll
        self.progress.__exit__(*exc)

    def poll(self) -> None:
        for line in self._tail.new_lines(self.run_dir / "metrics.jsonl"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = int(row.get("step", 0))
            if step % self.log_every and step != self.progress.total:
                continue
            step_s = row.get("step_s") or 0.0
            self.progress.update(
                int(row["step"]), {**row, "tokens_per_s": row.get("tokens", 0) / step_s if step_s else 0.0}
            )
        events = self.run_dir / "events"
        for path in sorted(events.glob("*.jsonl")) if events.is_dir() else []:
            for line in self._tail.new_lines(path):
                try:
                    text = describe_event(json.loads(line))
                except json.JSONDecodeError:
                    continue
                if text:
                    self.progress.note(text)

    def _follow(self) -> None:
        while not self._stop.wait(POLL_S):
            self.poll()
