"""Errors a user can act on.

Everything raised as a ``TuneforgeError`` is printed by the CLI as a clean message (no traceback) and
turned into a 4xx by the API. Anything else is a bug in tuneforge and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class TuneforgeError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""

    exit_code = 2


class RecipeError(TuneforgeError):
    """The recipe (YAML or overrides) does not match the schema."""


class ModelError(TuneforgeError):
    """A model or tokenizer cannot be found or loaded."""


class UnknownModelError(ModelError):
    """A model name, version or alias that nothing is registered under (the registry, fine-tuned names)."""

    exit_code = 1


@dataclass(frozen=True)
class DataIssue:
    """One bad record: where it is, which field, what is wrong and what was expected."""

    path: str
    line: int  # 1-based line (JSONL/CSV) or record number (JSON array, Parquet, datasets dir)
    field: str  # dotted path inside the record, e.g. "messages[2].role"; "" for the whole record
    problem: str
    expected: str = ""

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}: "
        field = f"{self.field}: " if self.field else ""
        expected = f" (expected {self.expected})" if self.expected else ""
        return f"{where}{field}{self.problem}{expected}"


class DataError(TuneforgeError):
    """The data has bad records; ``issues`` lists every one of them."""

    exit_code = 1

    def __init__(self, issues: list[DataIssue], summary: str = "") -> None:
        self.issues = list(issues)
        shown = "\n".join(str(i) for i in self.issues[:50])
        more = f"\n… and {len(self.issues) - 50} more" if len(self.issues) > 50 else ""
        head = summary or f"{len(self.issues)} bad record(s)"
        super().__init__(f"{head}\n{shown}{more}")


def suggest(got: str, valid: list[str] | tuple[str, ...], *, cutoff: float = 0.6, list_all: bool = False) -> str:
    """``" — did you mean 'x'?"`` for the closest valid name, or ``""`` (or the list of valid names).

    The one "did you mean" of tuneforge: recipe keys, record fields, formats, grader names and metrics all
    use it, so every suggestion reads the same and uses the same cut-off.
    """
    import difflib

    near = difflib.get_close_matches(str(got), [str(v) for v in valid], n=1, cutoff=cutoff)
    if near:
        return f" — did you mean '{near[0]}'?"
    return f" (valid: {', '.join(map(str, valid))})" if list_all else ""
