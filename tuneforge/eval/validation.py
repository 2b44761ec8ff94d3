"""Task files as YAML, checked: every validation error as ``FILE:LINE: field.path: problem``.

pydantic says *which* field is wrong; the YAML node tree says *where* it is, so each error is reported at its line
(a missing field at its parent's). Discriminated unions add their tag to an error's location (``generation``,
``regex``); it is not a key in the file and is left out of the path.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tuneforge.errors import TuneforgeError, suggest


class TaskError(TuneforgeError):
    """A task file, suite or name that cannot be used; the message names the file, line and field."""

    exit_code = 1


def read_yaml(path: Path) -> tuple[Any, str]:
    """The parsed file and its name for messages; a syntax error is reported at its line."""
    if path.is_dir():
        raise TaskError(f"{path}: is a directory; expected a task or suite YAML file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")), str(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise TaskError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None


def validate(
    model: type[BaseModel],
    raw: Any,
    origin: str,
    yaml_path: Path | None,
    *,
    strip: int = 0,
    kinds: dict[str, tuple[str, Sequence[str]]] | None = None,
) -> Any:
    """``model.model_validate(raw)``, or a :class:`TaskError` with one ``origin:LINE: field: problem`` per error.

    ``strip`` drops leading location parts (a wrapper model's field); ``kinds`` names what a discriminated union's
    tag is under a key (``{"metrics": ("metric", names)}``; ``""`` for anywhere else) for "unknown …" messages.
    """
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        root = yaml.compose(yaml_path.read_text(encoding="utf-8")) if yaml_path else None
        lines = [_problem(err, raw, origin, root, strip, kinds or {}) for err in e.errors()]
        raise TaskError("\n".join(dict.fromkeys(lines))) from None


def _field_path(loc: list[Any], raw: Any) -> list[str | int]:
    """The error's location as it is in the file: a union's tag (``generation``, ``regex``) is not a key there."""
    parts: list[str | int] = []
    node = raw
    for i, part in enumerate(loc):
        if (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and part < len(node)
        ):
            node = node[part]
        elif i < len(loc) - 1:
            continue  # a tag
        parts.append(part)
    return parts


def _line(root: Any, parts: list[str | int]) -> int | None:
    """The YAML line of the deepest node of ``parts`` found in the file (a missing key: its parent's line)."""
    if root is None:
        return None
    node, line = root, root.start_mark.line + 1
    for part in parts:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if k.value == part), None)
            if hit is None:
                break
            line, node = hit[0].start_mark.line + 1, hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _problem(
    err: Any, raw: Any, origin: str, root: Any, strip: int, kinds: dict[str, tuple[str, Sequence[str]]]
) -> str:
    """``origin:LINE: field.path: problem`` for one pydantic error."""
    parts = _field_path(list(err["loc"]), raw)[strip:]
    line = _line(root, parts)
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
    where = f"{origin}:{line}" if line is not None else origin
    kind, ctx = err["type"], err.get("ctx") or {}
    what, names = next((v for k, v in kinds.items() if k and k in parts), kinds.get("", ("kind", ())))
    if kind == "union_tag_invalid":
        tags = [t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(",")]
        hint = suggest(str(ctx.get("tag")), tags, cutoff=0.5, list_all=True)
        return f"{where}: {(path + '.type').lstrip('.')}: unknown {what} {ctx.get('tag')!r}{hint}"
    if kind == "union_tag_not_found":
        return f"{where}: {(path + '.type').lstrip('.')}: required field is missing (one of {', '.join(names)})"
    if kind == "extra_forbidden":
        return f"{where}: {path}: unknown field"
    if kind == "missing":
        return f"{where}: {path}: required field is missing"
    msg = str(err["msg"]).removeprefix("Value error, ")
    given = err.get("input")
    shown = (
        ""
        if isinstance(given, (dict, list)) or kind == "value_error"
        else f" (got {json.dumps(given, default=str)[:60]})"
    )
    return f"{where}: {path}: {msg}{shown}"
