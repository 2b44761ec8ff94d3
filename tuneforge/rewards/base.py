"""What every grader is: ``Grader.evaluate_batch(samples, items) -> [GradeResult]``, errors as results.

Kept apart from the grader types (``graders``) and the judges (``judge``) so both can build on it without
importing each other.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

log = logging.getLogger("tuneforge.rewards.graders")

Sample = dict[str, Any] | str


@dataclass
class GradeResult:
    """One pair's reward, and why it is 0 when something went wrong."""

    score: float
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


def as_sample(sample: Sample) -> dict[str, Any]:
    """A bare completion string is shorthand for ``{"output_text": text}``."""
    if isinstance(sample, str):
        return {"output_text": sample}
    if not isinstance(sample, dict):
        raise TypeError(f"a sample must be a dict or a string, not {type(sample).__name__}")
    return sample


class Grader(ABC):
    """Scores completions. Subclasses implement ``_evaluate_batch``; errors become results, not raises."""

    type: ClassVar[str]
    name: str

    def grade(self, sample: Sample, item: dict[str, Any]) -> float:
        return self.evaluate(sample, item).score

    def grade_batch(self, samples: Sequence[Sample], items: Sequence[dict[str, Any]]) -> list[float]:
        return [r.score for r in self.evaluate_batch(samples, items)]

    def evaluate(self, sample: Sample, item: dict[str, Any]) -> GradeResult:
        return self.evaluate_batch([sample], [item])[0]

    def evaluate_batch(self, samples: Sequence[Sample], items: Sequence[dict[str, Any]]) -> list[GradeResult]:
        """Scores with per-pair errors and details (sub-scores, the judge's reply)."""
        if len(samples) != len(items):
            raise ValueError(f"grader {self.name!r}: {len(samples)} samples but {len(items)} items")
        results = self._evaluate_batch([as_sample(s) for s in samples], list(items))
        for i, result in enumerate(results):
            if result.error is not None:
                log.warning("grader %r: pair %d scored 0: %s", self.name, i, result.error)
        return results

    @abstractmethod
    def _evaluate_batch(self, samples: list[dict[str, Any]], items: list[dict[str, Any]]) -> list[GradeResult]: ...
