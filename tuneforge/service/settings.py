"""What a server runs with; ``tuneforge server`` flags map one to one onto these fields."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.paths import state_dir


def _default_slots() -> int:
    return len(os.sched_getaffinity(0))


@dataclass
class Settings:
    database_url: str | None = None  # default: SQLite under $TUNEFORGE_HOME/service
    root: Path = field(default_factory=lambda: state_dir() / "service")  # file store and job directories
    slots: int = field(default_factory=_default_slots)  # capacity: CPU cores (or GPUs) one job replica takes each
    max_upload_bytes: int = 512 * 1024 * 1024
    tracking: bool = True  # jobs log to MLflow
    tracking_uri: str | None = None  # default: the embedded store under $TUNEFORGE_HOME
    executor: str = "local"  # local | kubernetes
    poll_s: float = 0.25  # how often the scheduler looks at jobs
    python: str | None = None  # interpreter for job processes (default: this one)
    engine_factory: Callable[[Path], Any] | None = None  # base path → inference engine (default: tuneforge's)

    @property
    def url(self) -> str:
        return self.database_url or f"sqlite:///{self.root / 'service.db'}"

    @property
    def files_dir(self) -> Path:
        return self.root / "files"

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"
