"""Recipe → validated, cleaned, split, tokenized sources → the training plan.

Split in two on purpose: first every record of every source is read and checked before anything heavy
happens (training refuses bad data before a model is loaded), then :func:`tokenize_sources` turns the clean
examples into memory-mapped token arrays through the cache. The first half comes in two forms:
:func:`load_sources` holds the records in memory (the small-data API of the preference, unpaired and prompt
formats), ``data.stream.scan_sources`` spools them to disk in bounded memory (SFT / CPT, any size).
:func:`tokenize_sources` takes either, streams batches through ``data.encode`` (worker processes for large
splits) into a ``token_cache.CacheWriter``, so no stage holds a whole source.

For large chat sources the halves overlap: with :func:`ahead_factory`, ``scan_sources`` hands each batch it keeps
to the workers as it reads (``data.ahead``), and :func:`tokenize_sources` only commits those tokens — still
nothing is *trained* before every record is checked, and a scan that finds a bad record throws them away.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tuneforge.config import Recipe, SourceConfig
from tuneforge.data import token_cache
from tuneforge.data.ahead import AheadFactory, AheadSpec, PendingTokens
from tuneforge.data.encode import (
    ENCODE_BATCH,
    PARALLEL_MIN_EXAMPLES,
    Encoded,
    EncodeJob,
    default_workers,
    encode_stream,
)
from tuneforge.data.fingerprint import verify_in_background
from tuneforge.data.sanitize import canonical_json, content_hash, sanitize, split
from tuneforge.data.stream import MAX_ISSUES, ScannedSource, release, rescan, source_name
from tuneforge.data.token_cache import CacheWriter, TokenizedSource
from tuneforge.data.validate import ValidationReport, validate_file
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


LoadedSource = SourceExamples | ScannedSource  # records in memory (small data) or spooled on disk (any size)


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
    name = source_name(cfg, names)
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


def _job(fmt: str, template: str | None, recipe: Recipe) -> EncodeJob:
    d = recipe.data
    return EncodeJob(fmt, template if fmt != "text" else None, d.loss_on, d.max_length, d.on_overlong)


def ahead_factory(
    recipe: Recipe, formats: Collection[str], load: Callable[[], tuple[Any, str | None]]
) -> AheadFactory | None:
    """What ``stream.scan_sources`` needs to tokenize chats while it scans them (``data.ahead``), or None when it
    should not: no token cache (nothing to write ahead into) or a single worker (nothing to overlap with).

    `load` gives the tokenizer and template, as ``load_inputs`` will; it is called once, when a scan first needs
    it, and if it fails nothing is tokenized ahead — the ordinary path reports the failure after the data's own
    errors, in the usual order.
    """
    workers = recipe.data.num_workers or default_workers()
    if not recipe.data.cache or workers <= 1:
        return None
    loaded: list[tuple[Any, str, str] | None] = []

    def make(fmt: str) -> AheadSpec | None:
        if fmt == "text" or fmt not in formats:
            return None
        if not loaded:
            try:
                tokenizer, template = load()
                loaded.append((tokenizer, template, token_cache.tokenizer_fingerprint(tokenizer)) if template else None)
            except Exception:
                loaded.append(None)
        if loaded[0] is None:
            return None
        tokenizer, template, fingerprint = loaded[0]
        return AheadSpec(tokenizer, fingerprint, _job(fmt, template, recipe), workers)

    return make


def _batches_of(examples: list[dict], lines: dict[str, int], size: int) -> Iterator[tuple[np.ndarray, list[bytes]]]:
    """In-memory examples as the ``(lines, canonical JSON records)`` batches a spool yields."""
    for i in range(0, len(examples), size):
        chunk = examples[i : i + size]
        at = np.array([lines.get(record_key(ex), 0) for ex in chunk], dtype=np.int64)
        yield at, [canonical_json(ex).encode("utf-8") for ex in chunk]


def _tokenize_split(
    name: str,
    path: str,
    n: int,
    data_hash: str,
    batches: Callable[[], Iterator[tuple[np.ndarray, list[bytes]]]],
    job: EncodeJob,
    tokenizer: Any,
    recipe: Recipe,
    split_name: str,
    workers: int,
    pending: PendingTokens | None = None,
) -> TokenizedSource:
    """One split through the token cache: a hit is memory-mapped; a miss commits the tokens made during the scan
    (`pending`, when they were made with this job and tokenizer) or streams `batches()` into a new entry."""
    tokenizer_hash = token_cache.tokenizer_fingerprint(tokenizer)
    key = token_cache.cache_key(
        data_hash=data_hash,
        tokenizer_hash=tokenizer_hash,
        template=job.template,
        max_length=job.max_length,
        kind=job.kind,
        loss_on=job.loss_on,
        on_overlong=job.on_overlong,  # the schema sets `all` for cpt
    )
    root = cache_dir("tokens")
    if recipe.data.cache:
        hit = token_cache.load(root, name, key)
        if hit is not None:
            return hit
        if pending is not None and pending.matches(job, tokenizer_hash):
            return pending.commit(name, key)
    overlong = ValidationReport(
        path=path, format=job.kind, max_issues=MAX_ISSUES, full_report=root / "reports" / f"{key}.txt"
    )
    parts: list[Encoded] = []
    with CacheWriter(root, key) as writer:
        line_batches: deque[np.ndarray] = deque()

        def records() -> Iterator[list[bytes]]:
            for lines, batch in batches():
                line_batches.append(lines)
                yield batch

        for enc in encode_stream(tokenizer, records(), job, workers if n >= PARALLEL_MIN_EXAMPLES else 1):
            lines = line_batches.popleft()
            for p in enc.problems:  # turns the chat template cannot train: FILE:LINE: messages[i]: why
                overlong.add(DataIssue(path, int(lines[p.conversation]), p.field, p.problem, p.expected))
            for i, tokens in enc.too_long if job.on_overlong == "error" else ():
                overlong.add(
                    DataIssue(
                        path,
                        int(lines[i]),
                        "messages",
                        f"too long after tokenization: {tokens} tokens",
                        f"at most data.max_length={job.max_length}, or set data.on_overlong: truncate|drop",
                    )
                )
            if overlong.n_issues:
                continue  # name every overlong record, write nothing
            if recipe.data.cache:
                writer.append(enc.ids, enc.mask, enc.lengths, enc.supervised)
            else:
                parts.append(enc)
        overlong.close()
        if overlong.n_issues:
            more = f"; every one: {overlong.full_report}" if overlong.n_issues > len(overlong.issues) else ""
            raise DataError(overlong.issues, f"{path}: {overlong.n_issues} record(s) cannot be trained{more}")
        examples = writer.examples if recipe.data.cache else sum(len(p.lengths) for p in parts)
        if not examples:
            raise DataError(
                [
                    DataIssue(
                        path,
                        0,
                        "",
                        f"no {split_name} examples with supervised tokens",
                        "at least one assistant message with weight 1",
                    )
                ]
            )
        if recipe.data.cache:
            return writer.commit(name)
    return _in_memory(name, key, parts)


def _in_memory(name: str, key: str, parts: list[Encoded]) -> TokenizedSource:
    lengths = np.concatenate([p.lengths for p in parts])
    return TokenizedSource(
        name,
        np.concatenate([p.ids for p in parts]),
        np.concatenate([p.mask for p in parts]),
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        key,
        supervised=np.concatenate([p.supervised for p in parts]),
    )


def tokenize_sources(
    loaded: Sequence[LoadedSource], tokenizer: Any, template: str | None, recipe: Recipe
) -> list[SourceTokens]:
    """Tokenize every source's train and validation split through the cache (streamed, on all cores).

    `loaded` comes from :func:`load_sources` (records in memory) or ``stream.scan_sources`` (records spooled on
    disk, or only a manifest on a warm start — a cache miss then reads the source again).
    """
    workers = recipe.data.num_workers or default_workers()
    out = []
    try:
        for src in loaded:
            job = _job(src.format, template, recipe)
            splits = []
            for split_name, side in (("training", 0), ("validation", 1)):
                args = _split_args(src, side)
                if args is None:
                    splits.append(None)
                    continue
                path, n, data_hash, batches = args
                pending = _pending(src, side)
                splits.append(
                    _tokenize_split(
                        src.name, path, n, data_hash, batches, job, tokenizer, recipe, split_name, workers, pending
                    )
                )
            train, val = splits
            assert train is not None
            stats = dict(
                src.stats,
                cache_hit=train.cache_hit,
                train_tokens=len(train.ids),
                supervised_tokens=int(train.supervised_counts().sum()),
            )
            out.append(SourceTokens(src.name, src.weight, train, val, stats))
    finally:
        scanned = [s for s in loaded if isinstance(s, ScannedSource)]
        release(scanned)
    for s in loaded:
        if isinstance(s, ScannedSource) and s.trusted:
            verify_in_background(s.path, s.digest)
    return out


def _pending(src: LoadedSource, side: int) -> PendingTokens | None:
    """The tokens the scan made for one side of a source, if it made them."""
    split = src.train if side == 0 else src.val
    if not isinstance(src, ScannedSource) or split is None or split.spool is None or split.side < 0:
        return None
    return split.spool.tokens[side] if split.spool.tokens else None


def _split_args(src: LoadedSource, side: int) -> tuple[str, int, str, Callable[[], Iterator]] | None:
    """``(path, size, content hash, batches)`` of one side of a source, or None when that side is empty."""
    if isinstance(src, SourceExamples):
        examples = src.val if side else src.train
        if side and not examples:
            return None
        data_hash = content_hash(examples) if examples else "empty"
        return src.path, len(examples), data_hash, lambda: _batches_of(examples, src.lines, ENCODE_BATCH)
    split = src.val if side else src.train
    if split is None:
        return None

    def batches() -> Iterator[tuple[np.ndarray, list[bytes]]]:
        if split.spool is None:
            split.spool = rescan(split)
        return split.spool.batches(split.side, ENCODE_BATCH)

    return split.path, split.n, split.data_hash, batches
