"""What an evaluation produced, per model and task — values, per-item statistics, per-item details — as JSON.

The per-item statistics (:class:`~tuneforge.eval.scores.MetricStats`) are kept, not only the values, so any two
saved results on the same task (same fingerprint: config and records) can be compared later with a paired
bootstrap, by ``tuneforge compare``, without running either model again.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.errors import TuneforgeError
from tuneforge.eval.scores import MetricStats
from tuneforge.files import atomic_write

FORMAT = "tuneforge-eval/1"


@dataclass
class TaskResult:
    """One task's metrics for one model. Headline metrics first, then per-group ones (``exact_match/add``)."""

    name: str
    type: str
    fingerprint: str
    metrics: dict[str, MetricStats]
    items: list[dict[str, Any]] = field(default_factory=list)
    spec: str = ""
    engine: str = "tuneforge"  # or "lm-eval"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    values_only: dict[str, float] = field(default_factory=dict)  # aggregate metrics without per-item statistics

    @property
    def n(self) -> int:
        return max((m.n for m in self.metrics.values()), default=len(self.items))

    def values(self) -> dict[str, float]:
        out = {name: m.value() for name, m in self.metrics.items()}
        out.update(self.values_only)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "fingerprint": self.fingerprint,
            "spec": self.spec,
            "engine": self.engine,
            "n": self.n,
            "seconds": round(self.seconds, 3),
            "notes": self.notes,
            "values": {k: _finite(v) for k, v in self.values().items()},
            "metrics": {k: m.to_dict() for k, m in self.metrics.items()},
            "values_only": self.values_only,
            "items": self.items,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskResult:
        return cls(
            name=d["name"],
            type=d["type"],
            fingerprint=d["fingerprint"],
            metrics={k: MetricStats.from_dict(m) for k, m in d.get("metrics", {}).items()},
            items=list(d.get("items", [])),
            spec=d.get("spec", ""),
            engine=d.get("engine", "tuneforge"),
            seconds=float(d.get("seconds", 0.0)),
            notes=list(d.get("notes", [])),
            values_only=dict(d.get("values_only", {})),
        )


@dataclass
class ModelResults:
    """Every task's result for one model; ``ref`` is what was evaluated, ``info`` where it came from."""

    label: str
    ref: str
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def flat_values(self) -> dict[str, float]:
        """``{"task/metric": value}`` — the keys MLflow logs and compares across runs."""
        return {f"{t}/{k}": v for t, r in self.tasks.items() for k, v in r.values().items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "label": self.label,
            "ref": self.ref,
            "info": self.info,
            "tasks": {k: t.to_dict() for k, t in self.tasks.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str = "<results>") -> ModelResults:
        if d.get("format") != FORMAT:
            raise TuneforgeError(f"{origin}: not a tuneforge evaluation result (expected format {FORMAT!r})")
        return cls(
            label=d["label"],
            ref=d.get("ref", ""),
            tasks={k: TaskResult.from_dict(t) for k, t in d.get("tasks", {}).items()},
            info=dict(d.get("info", {})),
        )

    def save(self, path: Path) -> Path:
        atomic_write(path, json.dumps(self.to_dict(), indent=1, ensure_ascii=False, default=str))
        return path

    @classmethod
    def load(cls, path: Path) -> ModelResults:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")), str(path))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise TuneforgeError(f"{path}: cannot read evaluation results: {e}") from None


def _finite(v: float) -> float | None:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None
