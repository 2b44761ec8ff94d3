"""Where tuneforge keeps its state: one directory, ``$TUNEFORGE_HOME`` (default ``~/.tuneforge``).

Caches, the embedded MLflow database, runs and the demo's base model all live below it, so a user can
inspect, move or delete everything tuneforge wrote in one place, and tests can use a temporary one.
"""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """The state directory, created on first use."""
    root = Path(os.environ.get("TUNEFORGE_HOME") or Path.home() / ".tuneforge").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir(kind: str) -> Path:
    """A cache sub-directory (``tokens``, ``models``…), created on first use."""
    path = state_dir() / "cache" / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir() -> Path:
    path = state_dir() / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_tracking_uri() -> str:
    """MLflow on an embedded SQLite file (MLflow refuses plain ``./mlruns`` file stores by default)."""
    return f"sqlite:///{state_dir() / 'mlflow.db'}"


def default_artifact_root() -> Path:
    path = state_dir() / "mlartifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path
