"""Recipe → validated, cleaned, split, tokenized sources → the training plan.

Split in two on purpose: :func:`load_sources` reads and checks every record of every source before anything
heavy happens (training refuses bad data before a model is loaded), and :func:`tokenize_sources` turns
the clean examples into memory-mapped token arrays through the cache.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.config import Recipe, SourceConfig
from tuneforge.data import token_cache
from tuneforge.data.sanitize import content_hash, sanitize, split
from tuneforge.data.templates import encode_chats, encode_texts
from tuneforge.data.token_cache import TokenizedSource
from tuneforge.data.validate import validate_file
from tuneforge.errors import DataError, DataIssue
from tuneforge.paths import cache_dir


@dataclass
class SourceExamples:
    """One source after validation, sanitising and the train/validation split."""

    name: str
    path: str
    weight: float
    format: str
    train: list[dict]
    val: list[dict]
    lines: dict[str, int]  # canonical JSON → first line, to name records in later errors
    data_hash: str
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceTokens:
    name: str
    weight: float
    train: TokenizedSource
    val: TokenizedSource | None
    stats: dict[str, Any]


def record_key(example: dict) -> str:
    """A record's identity (canonical JSON): finds the line a record came from for later error messages."""
    return json.dumps(example, sort_keys=True, ensure_ascii=False)


def load_sources(
    recipe: Recipe, *, default_format: str | None = None, allow_extra: Collection[str] = ()
) -> list[SourceExamples]:
    """Validate every source (all errors of all files at once), then sanitise and split each.

    ``default_format`` replaces ``auto`` (online RL reads prompts, which look like chats); ``allow_extra``
    names top-level keys records may carry beyond their format's (``"*"``: any — grader data).
    """
    loaded: list[SourceExamples] = []
    issues: list[DataIssue] = []
    summaries = []
    names: set[str] = set()
    for cfg in recipe.data.sources:
        fmt = default_format if cfg.format == "auto" and default_format else cfg.format
        report = validate_file(cfg.path, fmt, allow_extra=allow_extra)
        issues.extend(report.issues)
        summaries.append(report.summary())
        if report.n_bad:
            continue
        loaded.append(_clean_and_split(cfg, report, recipe, names))
    if issues:
        raise DataError(issues, "training data has bad records — nothing was trained:\n" + "\n".join(summaries))
    if recipe.data.validation:
        fmt = loaded[0].format if loaded else (default_format or "auto")
        report = validate_file(recipe.data.validation, fmt, allow_extra=allow_extra)  # the training data's format
        if report.n_bad:
            raise DataError(report.issues, report.summary())
        for src in loaded:  # an explicit validation file replaces the split for the first source
            src.train = src.train + src.val
            src.val = []
        loaded[0].val = [ex for _, ex in report.examples]
    return loaded


def _clean_and_split(cfg: SourceConfig, report: Any, recipe: Recipe, names: set[str]) -> SourceExamples:
    name = cfg.name or Path(cfg.path).stem
    base, n = name, 2
    while name in names:
        name, n = f"{base}{n}", n + 1
    names.add(name)
    lines: dict[str, int] = {}
    for line, ex in report.examples:
        lines.setdefault(record_key(ex), line)
    s = recipe.data.sanitize
    examples, stats = sanitize(
        [ex for _, ex in report.examples], dedup=s.dedup, drop_empty=s.drop_empty, max_chars=s.max_chars
    )
    if not examples:
        raise DataError([DataIssue(cfg.path, 0, "", "no usable records after sanitising", "at least one")])
    val_fraction = 0.0 if recipe.data.validation else recipe.data.val_fraction
    train, val = split(examples, val_fraction, recipe.train.seed)
    fmt = report.format
    return SourceExamples(
        name=name,
        path=cfg.path,
        weight=cfg.weight,
        format=fmt,
        train=train,
        val=val,
        lines=lines,
        data_hash=content_hash(examples),
        stats={"records": report.n_records, **_stats_dict(stats), "train": len(train), "val": len(val)},
    )


def _stats_dict(stats: Any) -> dict[str, Any]:
    if hasattr(stats, "__dataclass_fields__"):
        return {k: getattr(stats, k) for k in stats.__dataclass_fields__}
    return dict(stats)


def _encode(examples: list[dict], fmt: str, tokenizer: Any, template: str | None, recipe: Recipe):
    max_len = recipe.data.max_length
    if fmt == "text":
        return encode_texts(tokenizer, [ex["text"] for ex in examples], max_len), []
    encoded = encode_chats(tokenizer, [ex["messages"] for ex in examples], template, recipe.data.loss_on)
    too_long = [(i, len(ids)) for i, (ids, _) in enumerate(encoded) if len(ids) > max_len]
    if too_long and recipe.data.on_overlong == "truncate":
        for i, _ in too_long:
            ids, mask = encoded[i]
            encoded[i] = (ids[:max_len], mask[:max_len])
    elif too_long and recipe.data.on_overlong == "drop":
        drop = {i for i, _ in too_long}
        encoded = [e for i, e in enumerate(encoded) if i not in drop]
    encoded = [e for e in encoded if int(e[1][1:].sum()) > 0]  # nothing to learn from (all weights 0)
    return encoded, too_long


def _tokenize_split(
    name: str,
    examples: list[dict],
    src: SourceExamples,
    tokenizer: Any,
    template: str | None,
    recipe: Recipe,
    split_name: str,
) -> TokenizedSource:
    key = token_cache.cache_key(
        data_hash=content_hash(examples) if examples else "empty",
        tokenizer_hash=token_cache.tokenizer_fingerprint(tokenizer),
        template=template if src.format != "text" else None,
        max_length=recipe.data.max_length,
        kind=src.format,
        loss_on=recipe.data.loss_on,
        on_overlong=recipe.data.on_overlong,  # the schema sets `all` for cpt
    )
    root = cache_dir("tokens")
    if recipe.data.cache:
        hit = token_cache.load(root, name, key)
        if hit is not None:
            return hit
    encoded, too_long = _encode(examples, src.format, tokenizer, template, recipe)
    if too_long and recipe.data.on_overlong == "error":
        issues = [
            DataIssue(
                src.path,
                src.lines.get(record_key(examples[i]), 0),
                "messages",
                f"too long after tokenization: {n} tokens",
                f"at most data.max_length={recipe.data.max_length}, or set data.on_overlong: truncate|drop",
            )
            for i, n in too_long
        ]
        raise DataError(sorted(issues, key=lambda x: x.line), f"{src.path}: {len(issues)} record(s) too long")
    if not encoded:
        raise DataError(
            [
                DataIssue(
                    src.path,
                    0,
                    "",
                    f"no {split_name} examples with supervised tokens",
                    "at least one assistant message with weight 1",
                )
            ]
        )
    source = token_cache.pack_arrays(name, encoded)
    source.cache_key = key
    return token_cache.store(root, key, source) if recipe.data.cache else source


def tokenize_sources(
    loaded: list[SourceExamples], tokenizer: Any, template: str | None, recipe: Recipe
) -> list[SourceTokens]:
    out = []
    for src in loaded:
        train = _tokenize_split(src.name, src.train, src, tokenizer, template, recipe, "training")
        val = _tokenize_split(src.name, src.val, src, tokenizer, template, recipe, "validation") if src.val else None
        stats = dict(
            src.stats,
            cache_hit=train.cache_hit,
            train_tokens=len(train.ids),
            supervised_tokens=int(train.supervised_counts().sum()),
        )
        out.append(SourceTokens(src.name, src.weight, train, val, stats))
    return out
