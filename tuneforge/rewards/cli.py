"""``tuneforge grader run GRADER.json --item … --sample …``: try a grader on one pair before a run.

Item and sample are JSON strings or ``@file``; a sample that is not JSON is taken as the completion text
itself. Prints the score, then any error and the details (sub-scores, the judge's reply); the exit
status is 0 when the pair was graded without error, 1 otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tuneforge.errors import TuneforgeError
from tuneforge.rewards.base import Grader
from tuneforge.rewards.graders import PythonGrader, load_grader


def _read_arg(text: str, flag: str, *, allow_text: bool) -> Any:
    source = flag
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise TuneforgeError(f"{flag}: file not found: {path}")
        text, source = path.read_text(), f"{flag} {path}"
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if allow_text:
            return {"output_text": text}
        raise TuneforgeError(f"{source}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def _uses_sandbox(grader: Grader) -> bool:
    subs = getattr(grader, "graders", {})
    return isinstance(grader, PythonGrader) or any(_uses_sandbox(g) for g in subs.values())


def grader_cli(grader_path: str, item_json: str, sample_json: str) -> int:
    """Grade one (sample, item) pair with the grader at ``grader_path``; return the exit status."""
    try:
        grader = load_grader(grader_path)
        item = _read_arg(item_json, "--item", allow_text=False)
        sample = _read_arg(sample_json, "--sample", allow_text=True)
        if not isinstance(item, dict):
            raise TuneforgeError(f"--item: expected a JSON object, got {type(item).__name__}")
        if not isinstance(sample, (dict, str)):
            raise TuneforgeError(f"--sample: expected a JSON object or string, got {type(sample).__name__}")
    except TuneforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result = grader.evaluate(sample, item)
    print(f"score: {result.score:g}")
    if _uses_sandbox(grader):
        from tuneforge.rewards.sandbox import describe_layers

        print(f"sandbox: {describe_layers()}", file=sys.stderr)
    if result.details:
        print("details: " + json.dumps(result.details, ensure_ascii=False, default=str))
    if result.error is not None:
        print(f"error: {result.error}", file=sys.stderr)
        return 1
    return 0
