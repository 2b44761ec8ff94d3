"""The executor seam: what a job attempt is (:class:`Launch`), what an executor reports, what it must do."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

State = Literal["running", "exited", "lost"]


@dataclass(frozen=True)
class Launch:
    """What to run for one attempt of a job: its ``tuneforge train`` arguments and where its files go."""

    job_id: str
    recipe: Path
    run_dir: Path
    workdir: Path
    replicas: str | None = None  # "MIN:MAX" for an elastic job
    resume: bool = False
    env: dict[str, str] = field(default_factory=dict)

    def train_args(self) -> list[str]:
        args = ["train", str(self.recipe), "--quiet"]
        if self.replicas:
            args += ["--replicas", self.replicas]
        if self.resume:
            args += ["--resume", str(self.run_dir)]
        return args


@dataclass(frozen=True)
class Status:
    state: State
    returncode: int | None = None


class Executor(Protocol):
    """Starts, watches, stops and resizes job processes; everything it needs to re-attach is in the handle."""

    def start(self, launch: Launch) -> dict[str, Any]: ...

    def status(self, handle: dict[str, Any]) -> Status: ...

    def stop(self, handle: dict[str, Any], *, force: bool = False) -> None: ...

    def scale(self, handle: dict[str, Any], run_dir: Path, replicas: int) -> bool: ...

    def log_tail(self, handle: dict[str, Any], n_bytes: int = 8192) -> str: ...
