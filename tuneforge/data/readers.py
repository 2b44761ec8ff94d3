"""Read records from data files, keeping where each one came from.

Every reader yields ``RawRecord``s in file order. A record that cannot be decoded (bad JSON, a CSV row with
the wrong number of fields) becomes a record with ``error`` set instead of stopping the read, so validation
can name every bad line in one pass. ``line`` is the 1-based line where the record starts for line-based
files (JSONL, CSV — the header counts as line 1) and the 1-based record number for JSON, Parquet and
Hugging Face ``datasets`` directories.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.errors import TuneforgeError

SUPPORTED = ".jsonl (or .ndjson), .json, .parquet, .csv, or a directory saved with datasets' save_to_disk"

# Columns that hold nested structures; CSV and Parquet often store them as JSON strings. Only keys whose
# valid values are never plain strings are decoded, so a string "chosen" response stays a string.
JSON_COLUMNS = ("messages", "input", "preferred_output", "non_preferred_output", "tools")


@dataclass(frozen=True)
class RawRecord:
    """One record as read from disk: ``value`` is the decoded record, or ``None`` when ``error`` is set."""

    path: str
    line: int
    value: Any
    error: str | None = None


def read_records(path: str | Path) -> Iterator[RawRecord]:
    """Yield every record of a data file (or ``datasets`` directory), dispatching on the suffix."""
    p = Path(path)
    if not p.exists():
        raise TuneforgeError(f"{p}: no such file or directory (supported data: {SUPPORTED})")
    if p.is_dir():
        return _read_datasets_dir(p)
    suffix = p.suffix.lower()
    reader = _READERS.get(suffix)
    if reader is None:
        raise TuneforgeError(f"{p}: unsupported data file suffix {suffix or '(none)'!r} (supported: {SUPPORTED})")
    return reader(p)


def _read_jsonl(p: Path) -> Iterator[RawRecord]:
    # Bytes per line: a bad UTF-8 sequence spoils only its own line, and json.loads decodes bytes itself.
    name = str(p)
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue  # blank lines are harmless; they still count for line numbers
            try:
                yield RawRecord(name, lineno, json.loads(raw))
            except json.JSONDecodeError as e:
                yield RawRecord(name, lineno, None, f"invalid JSON: {e.msg} at column {e.colno}")
            except UnicodeDecodeError as e:
                yield RawRecord(name, lineno, None, f"invalid UTF-8: bad byte at column {e.start + 1}")


def _read_json(p: Path) -> Iterator[RawRecord]:
    name = str(p)
    try:
        data = json.loads(p.read_bytes())
    except json.JSONDecodeError as e:
        # Nothing can be salvaged from a broken JSON document; report where the parser stopped.
        yield RawRecord(name, e.lineno, None, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}")
        return
    except UnicodeDecodeError as e:
        yield RawRecord(name, 1, None, f"invalid UTF-8: bad byte at offset {e.start}")
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        yield RawRecord(name, 1, None, 'top level is not an array of records or an object {"data": [...]}')
        return
    for i, value in enumerate(data, 1):
        yield RawRecord(name, i, value)


def _read_csv(p: Path) -> Iterator[RawRecord]:
    name = str(p)
    # Documents for continued pre-training easily exceed csv's default 128 KiB field limit.
    csv.field_size_limit(2**31 - 1)
    with p.open("r", encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
        except csv.Error as e:
            yield RawRecord(name, reader.line_num, None, f"invalid CSV header: {e}")
            return
        if header is None:
            return
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise TuneforgeError(f"{p}:1: CSV header repeats column(s) {', '.join(dupes)} (expected unique names)")
        while True:
            start = reader.line_num + 1  # a quoted field may span lines: the record starts here
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                # The parser cannot resynchronise after a malformed row, so this ends the file.
                yield RawRecord(name, start, None, f"invalid CSV: {e}")
                return
            if not row:
                continue  # blank line
            if len(row) != len(header):
                yield RawRecord(
                    name, start, None, f"wrong number of CSV fields: {len(row)}, the header has {len(header)}"
                )
                continue
            yield _decode_json_columns(name, start, dict(zip(header, row)))


def _read_parquet(p: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # pyarrow raises several types for a corrupt or non-Parquet file
        raise TuneforgeError(f"{p}: cannot read Parquet file: {e}") from e
    yield from _arrow_records(str(p), (batch.to_pylist() for batch in pf.iter_batches(batch_size=1024)))


def _read_datasets_dir(p: Path) -> Iterator[RawRecord]:
    if not ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
        raise TuneforgeError(f"{p}: directory is not a dataset saved with save_to_disk (supported: {SUPPORTED})")
    import datasets  # heavy: only imported when a directory is read

    try:
        ds = datasets.load_from_disk(str(p))
    except (FileNotFoundError, ValueError) as e:
        raise TuneforgeError(f"{p}: cannot load datasets directory: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise TuneforgeError(
                f"{p}: dataset has splits {', '.join(ds)}; point at one split's directory, e.g. {p / next(iter(ds))}"
            )
        ds = next(iter(ds.values()))
    batches = (table.to_pylist() for table in ds.with_format("arrow").iter(batch_size=1024))
    yield from _arrow_records(str(p), batches)


def _arrow_records(name: str, batches: Iterator[list[dict]]) -> Iterator[RawRecord]:
    n = 0
    for rows in batches:
        for row in rows:
            n += 1
            yield _decode_json_columns(name, n, _drop_nulls(row))


def _drop_nulls(value: Any) -> Any:
    """Remove null-valued keys, recursively.

    Arrow gives every struct the union of all fields, so a message that had no ``weight`` comes back with
    ``weight: None``. Dropping nulls restores the record as written (a null ``content`` becomes a missing
    one, which the format rules treat the same way).
    """
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _decode_json_columns(name: str, line: int, row: dict) -> RawRecord:
    for key in JSON_COLUMNS:
        text = row.get(key)
        if isinstance(text, str) and text.strip()[:1] in ("[", "{"):
            try:
                row[key] = json.loads(text)
            except json.JSONDecodeError as e:
                return RawRecord(name, line, None, f"invalid JSON in column {key!r}: {e.msg} at column {e.colno}")
    return RawRecord(name, line, row)


_READERS = {
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}
