"""The jobs service's fine-tuned model names (``ft:BASE:PROJECT:SUFFIX:JOBID[:ckpt-step-N]``) → where they are.

The service's database knows these names, but model references resolve below the service (eval, serve and train
must not import it), so the scheduler also records each name here when a job succeeds or a checkpoint appears:
one small JSON file, ``$TUNEFORGE_HOME/fine_tuned.json``, replaced atomically under a lock, so any process on the
machine — ``tuneforge eval ft:…``, ``tuneforge serve`` — finds them without the server running.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tuneforge.errors import ModelError, UnknownModelError
from tuneforge.files import atomic_write
from tuneforge.paths import state_dir

PREFIX = "ft:"
INDEX_FILE = "fine_tuned.json"


@dataclass(frozen=True)
class FineTuned:
    """One name the service handed out: a job's final model or one of its checkpoints."""

    name: str
    path: str  # the result directory (adapter/ or model/) or a training checkpoint (checkpoints/step-N)
    job: str
    base: str  # the model the job trained from, as the job named it
    step: int | None = None  # for checkpoints
    created: float = 0.0


def index_path() -> Path:
    return state_dir() / INDEX_FILE


def _read(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: not valid JSON ({e}); it is tuneforge's index of fine-tuned model names") from None
    return dict(data.get("models", {}))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock around read-modify-write: two servers on one state directory must not lose names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def record(name: str, path: str | Path, *, job: str, base: str, step: int | None = None) -> FineTuned:
    """Add (or update) ``name``; called by the scheduler, idempotent."""
    if not name.startswith(PREFIX):
        raise ValueError(f"fine-tuned model names start with {PREFIX!r}: {name!r}")
    entry = FineTuned(name, str(Path(path).resolve()), job, base, step, time.time())
    index = index_path()
    with _locked(index):
        models = _read(index)
        if models.get(name, {}).get("path") == entry.path:
            return FineTuned(**models[name])
        models[name] = asdict(entry)
        atomic_write(index, json.dumps({"models": models}, indent=2, sort_keys=True))
    return entry


def lookup(name: str) -> FineTuned:
    """The entry for ``name``; a clear error (with the nearest known name) when there is none."""
    from tuneforge.errors import suggest

    models = _read(index_path())
    if name in models:
        return FineTuned(**models[name])
    known = sorted(models)
    hint = suggest(name, known) if known else ""
    where = f"{len(known)} known in {index_path()}" if known else f"none recorded yet in {index_path()}"
    raise UnknownModelError(
        f"model {name}: no fine-tuned model of that name{hint} ({where}; a name is recorded when a job of "
        "`tuneforge server` succeeds or saves a checkpoint — GET /v1/models lists them)"
    )


def names() -> list[str]:
    return sorted(_read(index_path()))
