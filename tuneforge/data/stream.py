"""Large data in bounded memory: validate, sanitise and split a source in one streaming pass.

:func:`scan_sources` is the streaming counterpart of ``pipeline.load_sources`` for SFT / CPT. Records flow
from the reader through validation, sanitising (a :class:`~tuneforge.data.sanitize.Sanitizer`) and the split
keys in batches; the kept examples go to a *spool* on disk — their canonical JSON, one a line, which is exactly
what ``content_hash`` hashes — with their source lines and split keys in small arrays beside it. The split is
decided once the source is read (the exact split for small sets needs every key), so memory holds a batch,
the dedup table and 17 bytes per kept record; never the records themselves. Issues are kept up to
``MAX_ISSUES`` in memory and written, all of them, to a report file.

Warm start: what a scan found (format, counts, the content hashes of both sides of the split) is stored as a
*manifest* keyed by the file's fingerprint (``data.fingerprint``: size + mtime + a stored sha256) and every
setting that changes the result (format, allowed keys, sanitising, split fraction, seed). A second start finds
the manifest without reading the file; the token cache is keyed by the content hashes inside it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import tempfile
from array import array
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.config import Recipe, SanitizeConfig, SourceConfig
from tuneforge.data.ahead import AheadFactory, PendingTokens, TokenizeAhead
from tuneforge.data.fingerprint import file_digest
from tuneforge.data.readers import read_records
from tuneforge.data.sanitize import Sanitizer, canonical_json, split_key, split_mask
from tuneforge.data.validate import ValidationReport, iter_valid
from tuneforge.errors import DataError, DataIssue
from tuneforge.files import atomic_write
from tuneforge.paths import cache_dir

SCAN_VERSION = 1
BATCH = 2048  # records validated and deduplicated together
MAX_ISSUES = 1000  # issues kept in memory per file; the report file has all


@dataclass(frozen=True)
class ScanSpec:
    """Everything that decides a scan's result, apart from the file's content."""

    path: str
    format: str
    allow_extra: tuple[str, ...]
    sanitize: SanitizeConfig | None  # None: validate only (an explicit validation file)
    val_fraction: float
    seed: int

    def key(self, digest: str) -> str:
        blob = json.dumps(
            {
                "v": SCAN_VERSION,
                "data": digest,
                "format": self.format,
                "allow_extra": list(self.allow_extra),
                "sanitize": self.sanitize.model_dump() if self.sanitize is not None else None,
                "val_fraction": self.val_fraction,
                "seed": self.seed,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass
class Spool:
    """A scanned source's kept examples on disk: canonical JSON lines, their source lines, their side of the split."""

    dir: Path
    tokens: list[PendingTokens] | None = None  # both sides tokenized during the scan (``data.ahead``), if they were

    @property
    def examples(self) -> Path:
        return self.dir / "examples.jsonl"

    def batches(self, side: int, size: int) -> Iterator[tuple[np.ndarray, list[bytes]]]:
        """``(lines, records)`` batches of one side (0 train, 1 validation, -1 all), in file order."""
        lines = np.load(self.dir / "lines.npy", mmap_mode="r")
        is_val = np.load(self.dir / "is_val.npy", mmap_mode="r")
        with self.examples.open("rb") as f:
            idx, batch = array("q"), []
            for i, raw in enumerate(f):
                if side < 0 or bool(is_val[i]) == bool(side):
                    idx.append(i)
                    batch.append(raw)
                    if len(batch) == size:
                        yield np.asarray(lines[np.frombuffer(idx, dtype=np.int64)]), batch
                        idx, batch = array("q"), []
            if batch:
                yield np.asarray(lines[np.frombuffer(idx, dtype=np.int64)]), batch

    def remove(self) -> None:
        for pending in self.tokens or ():
            pending.discard()
        self.tokens = None
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Split:
    """One side of a source's split: its size and content hash, and how to get its examples again."""

    path: str  # the data file, for messages
    n: int
    data_hash: str
    spec: ScanSpec
    side: int  # 0 train, 1 validation, -1 every record (a validation file)
    spool: Spool | None = None  # None on a warm start: rescan when the tokens are not cached


@dataclass
class ScannedSource:
    """One source after a streaming scan (or its manifest): what ``tokenize_sources`` needs, no records."""

    name: str
    path: str
    weight: float
    format: str
    train: Split
    val: Split | None
    data_hash: str
    digest: str  # sha256 of the file
    trusted: bool  # the digest came from the stored fingerprint (no read)
    stats: dict[str, Any] = field(default_factory=dict)


def source_name(cfg: SourceConfig, taken: set[str]) -> str:
    """``cfg.name`` or the file's stem, made unique among `taken` (which it joins)."""
    name = cfg.name or Path(cfg.path).stem
    base, n = name, 2
    while name in taken:
        name, n = f"{base}{n}", n + 1
    taken.add(name)
    return name


@contextmanager
def _young_garbage_only() -> Iterator[None]:
    """The collector's full passes skip the objects that exist now: a scan's garbage is its own records (young,
    acyclic), while a pass over everything loaded (torch, transformers: ~350k objects) costs ~5 % of a scan."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _manifest_path(key: str) -> Path:
    return cache_dir("tokens") / "sources" / f"{key}.json"


def scan(
    spec: ScanSpec, digest: str, ahead: AheadFactory | None = None
) -> tuple[ValidationReport, dict[str, Any] | None, Spool | None]:
    """Read `spec.path` once: ``(report, manifest, spool)``; manifest and spool are None when records are bad.

    With `ahead` (a source's scan, not a validation file's), the kept examples are tokenized while the scan reads
    (``data.ahead``); the spool then carries both sides' pending tokens when they can be used."""
    key = spec.key(digest)
    root = cache_dir("tokens")
    report = ValidationReport(
        path=spec.path, format=None, max_issues=MAX_ISSUES, full_report=root / "reports" / f"{key}.txt"
    )
    (root / "spool").mkdir(parents=True, exist_ok=True)
    spool = Spool(Path(tempfile.mkdtemp(dir=root / "spool", prefix=f"{key}-")))
    sanitizer = Sanitizer(**spec.sanitize.model_dump()) if spec.sanitize is not None else None
    lines, keys = array("q"), array("d")
    data = hashlib.sha256()
    by_key = [hashlib.sha256(), hashlib.sha256()]  # each side of the threshold split (what a large set gets)
    tokenizing: TokenizeAhead | None = None
    try:
        with spool.examples.open("wb") as out:
            good = iter_valid(read_records(spec.path), report, spec.format, allow_extra=spec.allow_extra)
            while batch := [item for _, item in zip(range(BATCH), good)]:
                if report.n_bad:  # keep validating to name every bad record, but stop writing
                    if tokenizing is not None:
                        tokenizing.abandon()
                    continue
                if tokenizing is None and ahead is not None and spec.sanitize is not None and report.format:
                    found = ahead(report.format)
                    tokenizing = TokenizeAhead(found, spec.val_fraction, root) if found else None
                    ahead = None  # asked once per scan
                examples = [ex for _, ex in batch]
                canonicals = [canonical_json(ex) for ex in examples]
                keep = sanitizer.keep(examples, canonicals) if sanitizer is not None else [True] * len(batch)
                kept, kept_keys = [], array("d")
                for (line, _), canonical, k in zip(batch, canonicals, keep):
                    if k:
                        blob = canonical.encode("utf-8") + b"\n"
                        out.write(blob)
                        data.update(blob)
                        lines.append(line)
                        key = split_key(canonical, spec.seed) if spec.val_fraction else 1.0
                        keys.append(key)
                        by_key[key < spec.val_fraction].update(blob)
                        kept.append(blob)
                        kept_keys.append(key)
                if tokenizing is not None and kept:
                    tokenizing.add(kept, np.frombuffer(kept_keys, dtype=np.float64))
        if report.n_issues:
            if tokenizing is not None:
                tokenizing.abandon()
            spool.remove()
            return report, None, None
        key_array = np.frombuffer(keys, dtype=np.float64)
        is_val = split_mask(key_array, spec.val_fraction)
        np.save(spool.dir / "lines.npy", np.frombuffer(lines, dtype=np.int64))
        np.save(spool.dir / "is_val.npy", is_val)
        hashes = by_key
        by_threshold = np.array_equal(is_val, key_array < spec.val_fraction)
        if tokenizing is not None and by_threshold:
            spool.tokens = tokenizing.finish()
        elif tokenizing is not None:  # sides given by the threshold, but the split is by rank: of no use
            tokenizing.abandon()
        if not by_threshold:  # split by rank (a small set): hash again
            hashes = [hashlib.sha256(), hashlib.sha256()]
            with spool.examples.open("rb") as f:
                for raw, v in zip(f, is_val.tolist()):
                    hashes[v].update(raw)
        n_val = int(is_val.sum())
        stats = sanitizer.stats.as_dict() if sanitizer is not None else {}
        manifest = {
            "format": report.format,
            "records": report.n_records,
            "stats": stats,
            "data_hash": data.hexdigest(),
            "train": {"n": len(lines) - n_val, "hash": hashes[0].hexdigest() if len(lines) > n_val else "empty"},
            "val": {"n": n_val, "hash": hashes[1].hexdigest() if n_val else "empty"},
        }
        return report, manifest, spool
    except BaseException:
        if tokenizing is not None:
            tokenizing.abandon()
        spool.remove()
        raise


def _scan_or_recall(
    spec: ScanSpec, verify: bool, ahead: AheadFactory | None = None
) -> tuple[ValidationReport | None, dict[str, Any], Spool | None, str, bool]:
    digest, trusted = file_digest(spec.path, verify=verify)
    path = _manifest_path(spec.key(digest))
    try:
        return None, json.loads(path.read_text()), None, digest, trusted
    except (OSError, ValueError):
        pass
    with _young_garbage_only():
        report, manifest, spool = scan(spec, digest, ahead)
    if manifest is not None:
        atomic_write(path, json.dumps(manifest), fsync=False)
    return report, manifest or {}, spool, digest, trusted


def rescan(split: Split) -> Spool:
    """The examples of a split recalled from a manifest, read again (its tokens were not cached)."""
    digest, _ = file_digest(split.spec.path, verify=True)
    report, manifest, spool = scan(split.spec, digest)
    side = "val" if split.side == 1 else "train"
    if manifest is None or spool is None or manifest[side]["hash"] != split.data_hash:
        if spool is not None:
            spool.remove()
        raise DataError(
            report.issues if manifest is None else [],
            f"{split.path} changed since its fingerprint was stored (same size and mtime); it is re-read on the "
            "next start — run again",
        )
    return spool


def scan_sources(
    recipe: Recipe,
    *,
    default_format: str | None = None,
    allow_extra: Collection[str] = (),
    verify: bool = False,
    ahead: AheadFactory | None = None,
) -> list[ScannedSource]:
    """Every source scanned (or recalled from its manifest); all bad records of all files raise one ``DataError``.

    The same checks, cleaning and split as ``pipeline.load_sources``, for any size of data. `ahead` tokenizes each
    source while it is scanned (see ``data.ahead``); ``pipeline.tokenize_sources`` uses those tokens if it can.
    """
    d = recipe.data
    allow = tuple(sorted(allow_extra))
    val_fraction = 0.0 if d.validation else d.val_fraction
    out: list[ScannedSource] = []
    issues: list[DataIssue] = []
    summaries: list[str] = []
    names: set[str] = set()
    try:
        for cfg in d.sources:
            fmt = default_format if cfg.format == "auto" and default_format else cfg.format
            spec = ScanSpec(cfg.path, fmt, allow, d.sanitize, val_fraction, recipe.train.seed)
            report, manifest, spool, digest, trusted = _scan_or_recall(spec, verify, ahead)
            if report is not None and report.n_issues:
                issues.extend(report.issues)
                summaries.append(report.summary())
                continue
            out.append(_source(cfg, spec, manifest, spool, digest, trusted, source_name(cfg, names)))
        if issues:
            raise DataError(issues, "training data has bad records — nothing was trained:\n" + "\n".join(summaries))
        if d.validation:
            fmt = out[0].format if out else (default_format or "auto")
            spec = ScanSpec(d.validation, fmt, allow, None, 0.0, recipe.train.seed)
            report, manifest, spool, _, _ = _scan_or_recall(spec, verify)
            if report is not None and report.n_issues:
                raise DataError(report.issues, report.summary())
            out[0].val = Split(d.validation, manifest["train"]["n"], manifest["train"]["hash"], spec, -1, spool)
    except BaseException:
        release(out)
        raise
    return out


def _source(
    cfg: SourceConfig,
    spec: ScanSpec,
    manifest: dict[str, Any],
    spool: Spool | None,
    digest: str,
    trusted: bool,
    name: str,
) -> ScannedSource:
    train, val = manifest["train"], manifest["val"]
    if train["n"] + val["n"] == 0:
        if spool is not None:
            spool.remove()
        raise DataError([DataIssue(cfg.path, 0, "", "no usable records after sanitising", "at least one")])
    return ScannedSource(
        name=name,
        path=cfg.path,
        weight=cfg.weight,
        format=manifest["format"],
        train=Split(cfg.path, train["n"], train["hash"], spec, 0, spool),
        val=Split(cfg.path, val["n"], val["hash"], spec, 1, spool) if val["n"] else None,
        data_hash=manifest["data_hash"],
        digest=digest,
        trusted=trusted,
        stats={"records": manifest["records"], **manifest["stats"], "train": train["n"], "val": val["n"]},
    )


def release(sources: list[ScannedSource]) -> None:
    """Remove the spools of `sources` (their examples are tokenized, or preparing failed)."""
    for src in sources:
        for split in (src.train, src.val):
            if split is not None and split.spool is not None:
                split.spool.remove()
                split.spool = None
