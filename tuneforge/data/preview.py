"""``tuneforge data preview``: every record as training will see it, supervised tokens marked.

Each record goes through the same steps as in training — validation, the model's chat template (with the
served-view handling of ``data/templates.py``), the cut to ``data.max_length`` under ``data.on_overlong`` —
so a masking bug costs a glance instead of a run. One row per training sequence (a record is one, unless
its template splits it; the rows then share a line): coloured on a terminal, ``⟦marked⟧`` otherwise, or JSON
lines with ``--json``::

    {"line": N, "sequence": k, "text": "…", "supervised": [[start, end], …], "tokens": T, "error": null | "…"}

``supervised`` holds character ranges of ``text`` whose tokens carry loss; ``error`` says why a record is
not trained as shown (a bad record, a turn the template cannot train, too long, nothing to learn).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from tuneforge.data.formats import FORMATS

MARK_OPEN, MARK_CLOSE = "⟦", "⟧"


@dataclass
class PreviewRow:
    line: int
    text: str = ""
    supervised: list[list[int]] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None
    sequence: int = 0


@dataclass(frozen=True)
class PreviewSettings:
    """The recipe settings that change what a record trains as (defaults: the recipe schema's)."""

    fmt: str = "auto"
    max_length: int = 512
    on_overlong: str = "error"
    loss_on: str = "assistant"
    allow_extra: tuple[str, ...] = ()


def preview_rows(path: str, tokenizer: Any, template: str | None, settings: PreviewSettings) -> Iterator[PreviewRow]:
    """Rows for every line of `path`, in line order: bad records as errors, good ones as training renders them."""
    from tuneforge.data.validate import validate_file

    report = validate_file(path, settings.fmt, allow_extra=settings.allow_extra)
    bad: dict[int, list[str]] = {}
    for issue in report.issues:
        where = f"{issue.field}: " if issue.field else ""
        expected = f" (expected {issue.expected})" if issue.expected else ""
        bad.setdefault(issue.line, []).append(f"{where}{issue.problem}{expected}")
    good = dict(report.examples)
    for line in sorted(bad.keys() | good.keys()):
        if line in bad:
            yield PreviewRow(line, error="; ".join(bad[line]))
        else:
            yield from _record_rows(line, good[line], report.format or "", tokenizer, template, settings)


def _record_rows(
    line: int, record: dict, fmt: str, tokenizer: Any, template: str | None, settings: PreviewSettings
) -> Iterator[PreviewRow]:
    from tuneforge.data.templates import ChatTemplateError, encode_chat_views, encode_texts, render_chat

    if fmt == "prompt":  # online RL: the model writes the answer, nothing is supervised
        text = render_chat(tokenizer, record["messages"], template, add_generation_prompt=True)
        yield PreviewRow(line, text, [], len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    elif fmt == "text":
        for k, (ids, _) in enumerate(encode_texts(tokenizer, [record["text"]], settings.max_length)):
            text = tokenizer.decode(ids)
            yield PreviewRow(line, text, [[0, len(text)]], len(ids), sequence=k)
    elif "messages" in record:  # chats and prompt/completion pairs (canonical form: messages)
        try:
            (seqs,) = encode_chat_views(tokenizer, [record["messages"]], template, settings.loss_on)
        except ChatTemplateError as e:
            yield PreviewRow(line, error="; ".join(map(str, e.problems)))
            return
        for k, seq in enumerate(seqs):
            yield _fit(line, k, seq, settings)
    else:
        yield PreviewRow(
            line, error=f"preview shows chat, prompt/completion, prompt and text records, not {fmt} records"
        )


def _fit(line: int, k: int, seq: Any, s: PreviewSettings) -> PreviewRow:
    """The sequence after the length policy, as the data pipeline applies it."""
    ids, mask, text, offsets, error = seq.ids, seq.mask, seq.text, seq.offsets, None
    if len(ids) > s.max_length and s.on_overlong == "truncate":
        ids, mask, offsets = ids[: s.max_length], mask[: s.max_length], offsets[: s.max_length]
        text = text[: int(offsets[-1][1])]
    elif len(ids) > s.max_length:
        error = f"too long after tokenization: {len(ids)} tokens (expected at most data.max_length={s.max_length})"
        if s.on_overlong == "drop":
            error = f"not trained (data.on_overlong: drop): {len(ids)} tokens > data.max_length={s.max_length}"
    if error is None and int(mask[1:].sum()) == 0:
        error = "not trained: no supervised token" + (" left after truncation" if len(ids) < len(seq.ids) else "")
    return PreviewRow(line, text, _spans(offsets, mask), len(ids), error, k)


def _spans(offsets: Any, mask: Any) -> list[list[int]]:
    """Character ranges covered by supervised tokens, adjacent tokens merged."""
    spans: list[list[int]] = []
    for a, b in offsets[mask.astype(bool)].tolist():
        if spans and a <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], b)
        else:
            spans.append([a, b])
    return spans


# ---------------------------------------------------------------------------------------------------- command


def add_preview_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="data file (JSONL, JSON, Parquet, CSV or a datasets directory)")
    p.add_argument("--model", required=True, help="model directory or hub id whose tokenizer and template to use")
    p.add_argument("--recipe", default=None, help="take the template, max_length, on_overlong, loss_on from a recipe")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS])
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def preview_from_args(args: argparse.Namespace) -> int:
    """Print every row; exit 1 when any record is not trained as shown."""
    from tuneforge.models.loading import load_tokenizer

    settings, chat_template = _settings(args.recipe, args.format)
    tokenizer = load_tokenizer(args.model, chat_template)
    show = _print_json if args.json else _printer()
    failed = False
    for row in preview_rows(args.file, tokenizer, tokenizer.chat_template, settings):
        failed |= row.error is not None
        show(args.file, row)
    return 1 if failed else 0


def _settings(recipe_path: str | None, fmt: str) -> tuple[PreviewSettings, str | None]:
    if recipe_path is None:
        return PreviewSettings(fmt=fmt), None
    from tuneforge.config import load_recipe
    from tuneforge.methods import method_spec

    recipe = load_recipe(recipe_path)
    spec = method_spec(recipe.method)
    d = recipe.data
    settings = PreviewSettings(
        fmt=fmt if fmt != "auto" else spec.default_format or "auto",
        max_length=d.max_length,
        on_overlong=d.on_overlong,
        loss_on=d.loss_on,
        allow_extra=("*",) if spec.allow_extra_keys else (),
    )
    return settings, recipe.model.chat_template


def _print_json(path: str, row: PreviewRow) -> None:
    print(json.dumps(asdict(row), ensure_ascii=False))


def _printer() -> Any:
    from rich.console import Console
    from rich.text import Text

    console = Console(highlight=False, soft_wrap=True)
    tty = console.is_terminal

    def show(path: str, row: PreviewRow) -> None:
        head = f"── {path}:{row.line}" + (f" · sequence {row.sequence + 1}" if row.sequence else "")
        head += f" · {row.tokens} tokens"
        if not row.text:
            pass  # a record that never rendered: only its error
        elif tty:
            text = Text()
            text.append(head + "\n", style="bold")
            at = 0
            for a, b in row.supervised:
                text.append(row.text[at:a], style="dim")
                text.append(row.text[a:b], style="bold green")
                at = b
            text.append(row.text[at:], style="dim")
            console.print(text)
        else:
            parts, at = [head, "\n"], 0
            for a, b in row.supervised:
                parts += [row.text[at:a], MARK_OPEN, row.text[a:b], MARK_CLOSE]
                at = b
            print("".join([*parts, row.text[at:]]))
        if row.error:
            print(f"{path}:{row.line}: {row.error}", file=sys.stderr)

    return show
