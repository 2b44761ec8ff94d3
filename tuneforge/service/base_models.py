"""Base model names: ``tuneforge models add NAME PATH`` keeps a small registry in ``$TUNEFORGE_HOME/models.json``.

A job's ``model`` is a registered name, a local model directory, or a Hugging Face hub id (downloaded by the
job only because the user named it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tuneforge.errors import TuneforgeError
from tuneforge.files import atomic_write
from tuneforge.paths import state_dir

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def registry_path() -> Path:
    return state_dir() / "models.json"


def registered() -> dict[str, str]:
    path = registry_path()
    return json.loads(path.read_text()) if path.exists() else {}


def add_model(name: str, path: str | Path) -> Path:
    """Register `path` (a model directory) under the short name `name`."""
    if not NAME.match(name) or name.startswith("ft:"):
        raise TuneforgeError(f"models add {name!r}: use 1–64 letters, digits, '.', '_' or '-'")
    target = Path(path).expanduser().resolve()
    if not (target / "config.json").is_file():
        raise TuneforgeError(f"models add {name}: {target} is not a model directory (no config.json)")
    atomic_write(registry_path(), json.dumps({**registered(), name: str(target)}, indent=2))
    return target


def resolve_base(model: str) -> str:
    """The path (or hub id) a job trains from; a clear error for a name that is none of the three."""
    names = registered()
    if model in names:
        return names[model]
    if Path(model).is_absolute() or model.startswith("."):
        if (Path(model) / "config.json").is_file():
            return str(Path(model).resolve())
        raise TuneforgeError(f"model: {model} is not a model directory (no config.json)")
    if HUB_ID.match(model):
        return model
    from tuneforge.errors import suggest

    raise TuneforgeError(
        f"model: unknown model {model!r}{suggest(model, list(names), list_all=bool(names))}; register one with "
        "`tuneforge models add NAME PATH`, or give a model directory or a hub id"
    )


def display_name(model: str) -> str:
    """The BASE part of ``ft:BASE:PROJECT:SUFFIX:JOBID``: a name as given, a directory's last component.

    A job that continues a fine-tuned model keeps its root base's name, as OpenAI's names do.
    """
    if model.startswith("ft:"):
        return model.split(":")[1]
    return Path(model).name if "/" in model and not HUB_ID.match(model) else model.replace("/", "-")
