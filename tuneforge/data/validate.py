"""Validate a whole data file and report every bad record, not just the first.

Users fix data in one go when they see all of it: ``FILE:LINE: field: problem (expected …)`` for each
issue, then a summary. Training calls ``load_examples`` (small data) or streams records through
:func:`iter_valid` (``data.stream``), and raises the same report as a ``DataError`` before any model is
loaded, so a bad line never costs a model download or a GPU hour.

Memory stays bounded on any file: :func:`iter_valid` yields good records one at a time, and a report made
with ``max_issues`` keeps only that many issues in memory (counts stay exact) while writing every one of
them to ``full_report``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from tuneforge.data.formats import check_record, describe_unknown, detect_format, resolve_format, to_canonical
from tuneforge.data.readers import RawRecord, read_records
from tuneforge.errors import DataError, DataIssue


@dataclass
class ValidationReport:
    """What validation found: every issue (or the first ``max_issues``, with exact counts), and good records."""

    path: str
    format: str | None
    n_records: int = 0
    n_bad: int = 0
    issues: list[DataIssue] = field(default_factory=list)
    examples: list[tuple[int, dict]] = field(default_factory=list)  # (line, canonical record)
    n_issues: int = 0
    by_field: Counter = field(default_factory=Counter)
    max_issues: int | None = None
    full_report: Path | None = None  # every issue, one per line, when set
    _sink: TextIO | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return not self.n_issues

    def add(self, issue: DataIssue) -> None:
        self.n_issues += 1
        self.by_field[re.sub(r"\[\d+\]", "[*]", issue.field) or issue.problem.split(":")[0]] += 1
        if self.max_issues is None or len(self.issues) < self.max_issues:
            self.issues.append(issue)
        if self.full_report is not None:
            if self._sink is None:
                self.full_report.parent.mkdir(parents=True, exist_ok=True)
                self._sink = self.full_report.open("w", encoding="utf-8")
            self._sink.write(f"{issue}\n")

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def summary(self) -> str:
        """A line of counts, then issues per field (indices folded: ``messages[*].role``) or record-level problem."""
        fmt = self.format or "unknown"
        head = (
            f"{self.path}: {self.n_records} record(s), format {fmt}: "
            f"{self.n_records - self.n_bad} good, {self.n_bad} bad ({self.n_issues} issue(s))"
        )
        lines = [f"  {n:>6} × {name}" for name, n in self.by_field.most_common()]
        if self.full_report is not None and self.n_issues > len(self.issues):
            lines.append(f"  every issue, one per line: {self.full_report}")
        return "\n".join([head, *lines])

    def render(self) -> str:
        """The full report: every issue on its own line, then the summary."""
        return "\n".join([*(str(i) for i in self.issues), self.summary()])

    def raise_if_bad(self) -> None:
        if self.n_issues:
            raise DataError(self.issues, self.summary())


def iter_valid(
    records: Iterable[RawRecord],
    report: ValidationReport,
    fmt: str = "auto",
    *,
    token_length: Callable[[dict], int] | None = None,
    max_tokens: int | None = None,
    allow_extra: Collection[str] = (),
) -> Iterator[tuple[int, dict]]:
    """Check every record, adding problems to `report`; yields ``(line, canonical record)`` for the good ones.

    With ``fmt="auto"`` the first record whose keys name a format fixes it. ``token_length(canonical)`` is only
    called for records that pass the format checks, and only when ``max_tokens`` is set: a record longer than
    ``max_tokens`` is bad (it would be silently truncated).
    """
    fmt = resolve_format(fmt)
    allow = frozenset(allow_extra)
    report.format = None if fmt == "auto" else fmt
    fixed = None if fmt == "auto" else fmt
    first_line = 0
    for rec in records:
        report.n_records += 1
        report.path = report.path or rec.path
        problems: list[tuple[str, str, str]]
        if rec.error is not None:
            problems = [("", rec.error, "")]
        elif fixed is None:
            found = detect_format(rec.value)
            if found is None:
                problems = [describe_unknown(rec.value)]
            else:
                fixed, first_line = found, rec.line
                report.format = found
                problems = check_record(rec.value, fixed, allow_extra=allow)
        else:
            found = detect_format(rec.value) if fmt == "auto" else None
            if found is not None and found != fixed:
                problems = [
                    ("", f"wrong format: a {found} record", f"{fixed} records, the format found at line {first_line}")
                ]
            else:
                problems = check_record(rec.value, fixed, allow_extra=allow)
        if not problems:
            example = to_canonical(rec.value, fixed)
            if max_tokens is not None and token_length is not None:
                n = token_length(example)
                if n > max_tokens:
                    problems = [("", f"too long after tokenization: {n} tokens", f"at most {max_tokens} tokens")]
            if not problems:
                yield rec.line, example
                continue
        report.n_bad += 1
        for f, p, e in problems:
            report.add(DataIssue(rec.path, rec.line, f, p, e))
    if report.n_records == 0:
        report.add(DataIssue(report.path, 0, "", "holds no records", "at least one record"))
    report.close()


def validate_records(
    records: Iterable[RawRecord],
    fmt: str = "auto",
    *,
    token_length: Callable[[dict], int] | None = None,
    max_tokens: int | None = None,
    allow_extra: Collection[str] = (),
    path: str = "",
    keep_examples: bool = True,
) -> ValidationReport:
    """Check every record (see :func:`iter_valid`); the report holds the good records unless ``keep_examples`` is off."""
    report = ValidationReport(path=path, format=None)
    for item in iter_valid(
        records, report, fmt, token_length=token_length, max_tokens=max_tokens, allow_extra=allow_extra
    ):
        if keep_examples:
            report.examples.append(item)
    return report


def validate_file(
    path: str | Path,
    fmt: str = "auto",
    *,
    token_length: Callable[[dict], int] | None = None,
    max_tokens: int | None = None,
    allow_extra: Collection[str] = (),
    keep_examples: bool = True,
) -> ValidationReport:
    """Read and validate a whole file (or ``datasets`` directory)."""
    return validate_records(
        read_records(path),
        fmt,
        token_length=token_length,
        max_tokens=max_tokens,
        allow_extra=allow_extra,
        path=str(path),
        keep_examples=keep_examples,
    )


def load_examples(
    path: str | Path,
    fmt: str = "auto",
    *,
    token_length: Callable[[dict], int] | None = None,
    max_tokens: int | None = None,
    allow_extra: Collection[str] = (),
) -> list[dict]:
    """The canonical examples of a file; raises ``DataError`` with the full report if any record is bad."""
    report = validate_file(path, fmt, token_length=token_length, max_tokens=max_tokens, allow_extra=allow_extra)
    report.raise_if_bad()
    return [example for _, example in report.examples]
