"""Fault injection: kill (SIGKILL) or hang a replica at given steps, at given times, or at random.

A plan is JSON/YAML (a file path or inline text) or a compact string::

    kill:1@10          SIGKILL replica 1 in the middle of step 10 (after backward, before all-reduce)
    hang:0@25s         hang replica 0 25 s after the run started (main thread stops, heartbeats go on)
    kill:*@40s         kill any live replica at 40 s (chosen with the plan's seed)

    {"faults": [{"action": "kill", "replica": 1, "step": 10}, {"action": "hang", "time_s": 30}],
     "random": {"action": "kill", "mean_interval_s": 60, "count": 3, "seed": 0, "start_s": 10}}

``random`` also accepts ``interval_steps: [lo, hi]`` (step-based, uniform). Step faults run inside the
replica (precise "mid-step" failures); timed faults are sent by the supervisor from outside, like a
real hardware fault. Each fault fires once per run: a token file under ``<run>/faults/`` records it, so
a replacement that heals back to the same step does not die again.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from tuneforge.errors import RecipeError

Action = Literal["kill", "hang"]


@dataclass(frozen=True)
class Fault:
    id: int
    action: Action
    replica: int | None = None  # replica slot; None = any live one (timed faults only)
    step: int | None = None
    time_s: float | None = None  # seconds after the supervisor started the run

    def describe(self) -> str:
        who = "*" if self.replica is None else str(self.replica)
        when = f"step {self.step}" if self.step is not None else f"{self.time_s:g}s"
        return f"{self.action}:{who}@{when}"


@dataclass
class FaultPlan:
    faults: list[Fault]
    seed: int = 0

    def step_faults(self, replica: int) -> dict[int, Fault]:
        """Step -> fault for one replica slot."""
        return {f.step: f for f in self.faults if f.step is not None and f.replica == replica}

    def timed_faults(self) -> list[Fault]:
        return sorted((f for f in self.faults if f.time_s is not None), key=lambda f: f.time_s or 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "faults": [asdict(f) for f in self.faults]}

    @classmethod
    def parse(cls, source: Any) -> FaultPlan:
        """From None, a dict/list, JSON or YAML text, a file path, or the compact string form."""
        if source is None or source == "":
            return cls([])
        if isinstance(source, FaultPlan):
            return source
        where = "fault plan"
        if isinstance(source, (str, Path)):
            text = str(source)
            path = Path(text)
            if "\n" not in text and len(text) < 4096 and path.is_file():
                where = str(path)
                text = path.read_text()
            data = _parse_text(text, where)
        else:
            data = source
        return _from_data(data, where)


def _parse_text(text: str, where: str) -> Any:
    stripped = text.strip()
    if stripped.startswith(("{", "[")):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"{where}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    if "\n" in stripped or stripped.startswith(("faults:", "random:")):
        import yaml

        try:
            return yaml.safe_load(stripped)
        except yaml.YAMLError as exc:
            raise RecipeError(f"{where}: invalid YAML ({exc})") from exc
    return [_parse_compact(item.strip(), where) for item in stripped.split(",") if item.strip()]


def _parse_compact(item: str, where: str) -> dict[str, Any]:
    try:
        head, when = item.split("@")
        action, _, who = head.partition(":")
        entry: dict[str, Any] = {"action": action, "replica": None if who in ("", "*") else int(who)}
        if when.endswith("s"):
            entry["time_s"] = float(when[:-1])
        else:
            entry["step"] = int(when)
        return entry
    except ValueError:
        raise RecipeError(
            f"{where}: cannot read {item!r}; expected ACTION:REPLICA@STEP or ACTION:REPLICA@SECONDSs "
            "(e.g. kill:1@10, hang:0@25s, kill:*@40s)"
        ) from None


def _from_data(data: Any, where: str) -> FaultPlan:
    if isinstance(data, list):
        data = {"faults": data}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping with 'faults' and/or 'random', got {type(data).__name__}")
    unknown = set(data) - {"faults", "random", "seed"}
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {sorted(unknown)} (expected faults, random, seed)")
    seed = int(data.get("seed", 0))
    faults: list[Fault] = []
    for i, entry in enumerate(data.get("faults") or []):
        faults.append(_fault(len(faults), entry, f"{where}: faults[{i}]"))
    if data.get("random"):
        faults.extend(_random_faults(len(faults), data["random"], f"{where}: random", seed))
    return FaultPlan(faults, seed)


def _fault(fid: int, entry: Any, where: str) -> Fault:
    if not isinstance(entry, dict):
        raise RecipeError(f"{where}: expected a mapping, got {entry!r}")
    unknown = set(entry) - {"action", "replica", "step", "time_s"}
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {sorted(unknown)} (expected action, replica, step, time_s)")
    action = entry.get("action", "kill")
    if action not in ("kill", "hang"):
        raise RecipeError(f"{where}.action: got {action!r}, expected 'kill' or 'hang'")
    step, time_s, replica = entry.get("step"), entry.get("time_s"), entry.get("replica")
    if (step is None) == (time_s is None):
        raise RecipeError(f"{where}: give exactly one of 'step' or 'time_s'")
    if step is not None and replica is None:
        raise RecipeError(f"{where}.replica: a step fault needs a replica slot")
    if step is not None and int(step) < 0:
        raise RecipeError(f"{where}.step: must be >= 0")
    if time_s is not None and float(time_s) < 0:
        raise RecipeError(f"{where}.time_s: must be >= 0")
    return Fault(
        id=fid,
        action=action,
        replica=None if replica is None else int(replica),
        step=None if step is None else int(step),
        time_s=None if time_s is None else float(time_s),
    )


def _random_faults(first_id: int, spec: Any, where: str, seed: int) -> list[Fault]:
    """Expand a random schedule into concrete faults, deterministically from its seed."""
    if not isinstance(spec, dict):
        raise RecipeError(f"{where}: expected a mapping")
    allowed = {"action", "mean_interval_s", "interval_steps", "count", "seed", "start_s", "start_step", "replicas"}
    unknown = set(spec) - allowed
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {sorted(unknown)} (expected {sorted(allowed)})")
    action = spec.get("action", "kill")
    if action not in ("kill", "hang"):
        raise RecipeError(f"{where}.action: got {action!r}, expected 'kill' or 'hang'")
    count = int(spec.get("count", 1))
    rng = random.Random(int(spec.get("seed", seed)))
    out: list[Fault] = []
    if "mean_interval_s" in spec:
        mean = float(spec["mean_interval_s"])
        if mean <= 0:
            raise RecipeError(f"{where}.mean_interval_s: must be > 0")
        t = float(spec.get("start_s", 0.0))
        for i in range(count):
            t += rng.expovariate(1.0 / mean)
            out.append(Fault(id=first_id + i, action=action, replica=None, time_s=round(t, 3)))
    elif "interval_steps" in spec:
        try:
            lo, hi = (int(v) for v in spec["interval_steps"])
        except (TypeError, ValueError):
            raise RecipeError(f"{where}.interval_steps: expected [lo, hi]") from None
        replicas = spec.get("replicas")
        if not replicas or lo < 1 or hi < lo:
            raise RecipeError(f"{where}: interval_steps needs 1 <= lo <= hi and a 'replicas' list of slots")
        step = int(spec.get("start_step", 0))
        for i in range(count):
            step += rng.randint(lo, hi)
            out.append(Fault(id=first_id + i, action=action, replica=int(rng.choice(replicas)), step=step))
    else:
        raise RecipeError(f"{where}: give mean_interval_s (timed) or interval_steps (step-based)")
    return out


def claim(run_dir: Path, fault: Fault) -> bool:
    """Atomically mark ``fault`` as fired; False if it already fired in this run."""
    folder = Path(run_dir) / "faults"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(folder / f"fired_{fault.id}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def hang_forever() -> None:
    """Stop the calling (main) thread for good, as a stuck kernel or collective would."""
    import threading

    threading.Event().wait()
