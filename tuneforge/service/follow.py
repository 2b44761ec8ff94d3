"""A job's run directory → ``fine_tuning.job.event`` rows and checkpoints, written idempotently.

Every event has a key that names what it reports (``metrics:12``, ``checkpoint:40``, ``elastic:replica_1_0.jsonl:7``),
unique per job in the database. A follower can therefore start from the beginning of every file after a server
restart — or see a step twice after a job resumed from a checkpoint — and the event list still has each step
exactly once, in order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.training.checkpoint import list_checkpoints
from tuneforge.training.watch import LineTail, describe_event


@dataclass
class Observed:
    """What one poll of a run directory found."""

    events: list[dict[str, Any]] = field(default_factory=list)  # kwargs for db.Event (key, level, type, message, data)
    checkpoints: list[tuple[int, Path]] = field(default_factory=list)
    last_step: int = 0
    tokens: int = 0


def metrics_event(row: dict[str, Any], total_steps: int | None) -> dict[str, Any]:
    """OpenAI's metrics event: ``Step 3/12: training loss=1.234``, with ``data.train_loss`` and friends."""
    step = int(row["step"])
    data = {"step": step, "train_loss": float(row.get("loss", 0.0)), "total_steps": total_steps}
    data.update({k: v for k, v in row.items() if k not in ("step", "loss") and isinstance(v, (int, float))})
    of = f"/{total_steps}" if total_steps else ""
    return {
        "key": f"metrics:{step}",
        "level": "info",
        "type": "metrics",
        "message": f"Step {step}{of}: training loss={data['train_loss']:.4f}",
        "data": data,
    }


class RunFollower:
    """Follows one run directory; :meth:`poll` returns what is new since the last call."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.tail = LineTail()
        self.seen_checkpoints: set[int] = set()
        self.rows: dict[int, dict[str, Any]] = {}  # step → metrics row (for checkpoint metrics)

    def poll(self, total_steps: int | None) -> Observed:
        out = Observed()
        for _, line in self.tail.numbered(self.run_dir / "metrics.jsonl"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = int(row.get("step", 0))
            if step in self.rows:
                continue  # a resumed run repeats the steps after its checkpoint
            self.rows[step] = row
            out.tokens += int(row.get("tokens", 0))
            out.last_step = max(out.last_step, step)
            out.events.append(metrics_event(row, total_steps))
        events = self.run_dir / "events"
        for path in sorted(events.glob("*.jsonl")) if events.is_dir() else []:
            for number, line in self.tail.numbered(path):
                try:
                    text = describe_event(json.loads(line))
                except (json.JSONDecodeError, AttributeError):
                    continue
                if text:
                    key = f"elastic:{path.name}:{number}"
                    out.events.append({"key": key, "level": "info", "type": "message", "message": text, "data": None})
        for ckpt in list_checkpoints(self.run_dir / "checkpoints"):
            step = int(ckpt.name.removeprefix("step-"))
            if step not in self.seen_checkpoints:
                self.seen_checkpoints.add(step)
                out.checkpoints.append((step, ckpt))
        return out

    def metrics_at(self, step: int) -> dict[str, Any]:
        """OpenAI's checkpoint metrics (``train_loss``, ``valid_loss`` when known) at `step`."""
        row = self.rows.get(step) or {}
        metrics: dict[str, Any] = {"step": step}
        if "loss" in row:
            metrics["train_loss"] = float(row["loss"])
        for key in ("val_loss", "valid_loss"):
            if key in row:
                metrics["valid_loss"] = float(row[key])
        return metrics


def results_csv(run_dir: Path) -> str:
    """The job's result file, like OpenAI's: one row per step of ``step,train_loss,…``, then valid_loss at the end."""
    rows = []
    path = Path(run_dir) / "metrics.jsonl"
    seen: set[int] = set()
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(row.get("step", 0)) in seen:
            continue
        seen.add(int(row["step"]))
        rows.append(row)
    final: dict[str, Any] = {}
    result = Path(run_dir) / "result.json"
    if result.exists():
        final = json.loads(result.read_text()).get("metrics", {})
    lines = ["step,train_loss,learning_rate,tokens,valid_loss"]
    for i, row in enumerate(rows):
        valid = final.get("val_loss", "") if i == len(rows) - 1 else ""
        lines.append(f"{row['step']},{row.get('loss', '')},{row.get('lr', '')},{row.get('tokens', '')},{valid}")
    return "\n".join(lines) + "\n"
