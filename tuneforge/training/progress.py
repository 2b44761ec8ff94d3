"""Terminal progress: a rich bar on a TTY, one clean log line per N steps elsewhere (CI, files)."""

from __future__ import annotations

import sys
import time
from typing import Any


def _fmt_eta(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Progress:
    """Shows step, loss, lr, tokens/s and ETA; ``enabled=False`` keeps it silent (library use, tests)."""

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        *,
        enabled: bool = True,
        tty: bool | None = None,
        stream: Any = None,
    ) -> None:
        self.total = total_steps
        self.start = start_step
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._bar: Any = None
        self._task: Any = None
        self._t0 = time.perf_counter()

    def __enter__(self) -> Progress:
        if self.enabled and self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=self.start, stats="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        """`step` is the number of completed steps."""
        if not self.enabled:
            return
        stats = (
            f"loss {metrics.get('loss', float('nan')):.4f}  lr {metrics.get('lr', 0):.2e}  "
            f"{metrics.get('tokens_per_s', 0):,.0f} tok/s"
        )
        if self._bar is not None:
            self._bar.update(self._task, completed=step, stats=stats)
            return
        done = step - self.start
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / done * (self.total - step) if done else 0.0
        print(
            f"step {step}/{self.total}  {stats}  grad {metrics.get('grad_norm', 0):.3f}  eta {_fmt_eta(eta)}",
            file=self.stream,
            flush=True,
        )

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, file=self.stream, flush=True)
