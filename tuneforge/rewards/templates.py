"""``{{item.x}}`` / ``{{sample.output_text}}`` templates, as OpenAI graders write them.

Two namespaces exist: ``item`` (the dataset row) and ``sample`` (the model's completion:
``output_text``, ``output_json``, ``output_tools``, ``choices``). Paths go through mappings by key and
through lists by index (``item.choices.0`` or ``item.choices[0]``). A missing key is an error that names
the template and the keys that do exist, so a typo in a grader config is found on the first sample
instead of silently scoring zero for a whole run.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tuneforge.errors import TuneforgeError, suggest

ROOTS = ("item", "sample")
SAMPLE_FIELDS = ("output_text", "output_json", "output_tools", "choices")

_PLACEHOLDER = re.compile(r"\{\{\s*(.*?)\s*\}\}")
_TOKEN = re.compile(r"(\.)?([^.\[\]\s]+)|\[\s*(-?\d+)\s*\]")
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n(.*?)\n?```\s*$", re.DOTALL)


class TemplateError(TuneforgeError):
    """A template names a value that the sample or item does not have."""


def placeholders(template: str) -> list[str]:
    """The expressions inside ``{{ }}`` in order, e.g. ``["item.answer"]``."""
    return [m.group(1) for m in _PLACEHOLDER.finditer(template)]


def parse_path(expr: str) -> tuple[str, list[str | int]]:
    """``"item.a[0].b"`` -> ``("item", ["a", 0, "b"])``; raises for an unknown root or empty segment."""
    text = expr.strip()
    parts: list[str | int] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        dotted_ok = m is not None and (m.group(3) is not None or bool(m.group(1)) == (pos > 0))
        if m is None or not dotted_ok or (pos == 0 and m.group(3) is not None):
            raise TemplateError(
                f"template '{{{{{expr}}}}}': cannot parse the path at {text[pos:]!r} (expected e.g. item.answer)"
            )
        seg = m.group(2)
        parts.append(int(m.group(3)) if seg is None else (int(seg) if seg.isdigit() else seg))
        pos = m.end()
    if not parts:
        raise TemplateError("template '{{}}': empty placeholder (expected e.g. {{item.answer}})")
    root = parts[0]
    if root not in ROOTS:
        raise TemplateError(
            f"template '{{{{{expr}}}}}': unknown namespace {root!r} (expected one of: {', '.join(ROOTS)})"
        )
    return str(root), parts[1:]


def check_template(template: str) -> None:
    """Check every placeholder's syntax and namespace without data, so configs fail at load time."""
    for expr in placeholders(template):
        root, path = parse_path(expr)
        if root == "sample" and path and path[0] not in SAMPLE_FIELDS:
            raise TemplateError(
                f"template '{{{{{expr}}}}}': sample has no field {path[0]!r} "
                f"(expected one of: {', '.join(SAMPLE_FIELDS)})"
            )


def sample_output_json(sample: dict[str, Any]) -> Any:
    """``sample.output_json``, parsed from ``output_text`` (optionally inside a ```json fence) when absent."""
    if "output_json" in sample:
        return sample["output_json"]
    text = str(sample.get("output_text", "")).strip()
    fenced = _FENCE.match(text)
    try:
        return json.loads(fenced.group(1) if fenced else text)
    except json.JSONDecodeError as e:
        raise TemplateError(f"sample.output_json: the output text is not JSON ({e.msg} at char {e.pos})") from None


def lookup(expr: str, sample: dict[str, Any], item: dict[str, Any]) -> Any:
    """The value ``expr`` (``item.a.b``, ``sample.output_json.x``) names."""
    root, path = parse_path(expr)
    if root == "item":
        value: Any = item
    elif path and path[0] == "output_json":
        value = sample_output_json(sample)
        path = path[1:]
        root = "sample.output_json"
    else:
        value = sample
    where = root
    for key in path:
        if isinstance(value, dict):
            if str(key) not in value:
                keys = [str(k) for k in value]
                hint = suggest(str(key), keys)
                shown = ", ".join(keys[:20]) or "none"
                raise TemplateError(f"template '{{{{{expr}}}}}': {where} has no key {str(key)!r}{hint} (keys: {shown})")
            value = value[str(key)]
        elif isinstance(value, list):
            if not isinstance(key, int) or not -len(value) <= key < len(value):
                raise TemplateError(
                    f"template '{{{{{expr}}}}}': {where} is a list of {len(value)}; {key!r} is not an index in it"
                )
            value = value[key]
        else:
            raise TemplateError(
                f"template '{{{{{expr}}}}}': {where} is a {type(value).__name__}, it has no field {key!r}"
            )
        where = f"{where}.{key}"
    return value


def to_text(value: Any) -> str:
    """Strings stay as they are; anything else becomes compact JSON (numbers, lists, objects)."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render(template: str, sample: dict[str, Any], item: dict[str, Any]) -> str:
    """Fill every ``{{ }}`` in ``template``; text outside placeholders is kept verbatim."""
    return _PLACEHOLDER.sub(lambda m: to_text(lookup(m.group(1), sample, item)), template)


def render_messages(
    messages: list[dict[str, Any]], sample: dict[str, Any], item: dict[str, Any]
) -> list[dict[str, Any]]:
    """Render chat messages whose ``content`` is a string or a list of text parts (``input_text``/``text``)."""
    out = []
    for message in messages:
        content = message.get("content", "")
        if isinstance(content, str):
            text = render(content, sample, item)
        else:
            text = "".join(render(str(part.get("text", "")), sample, item) for part in content)
        out.append({"role": message.get("role", "user"), "content": text})
    return out
