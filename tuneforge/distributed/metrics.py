"""Recovery events and goodput, computed from the JSON-lines event logs every process writes.

Replicas log each step attempt (start, quorum done, end, committed?), heals, checkpoint loads and the
faults they inject; the supervisor logs spawns, exits, external kills and scaling. :func:`analyze`
turns those logs into a :class:`RunReport` — plain dataclasses, ``asdict``-able for MLflow.

Definitions (all times wall-clock, from the fault's own log line):

* detection_s — until the system noticed: a survivor's step failed, the supervisor saw the exit, or
  the watchdog fired, whichever came first.
* survivor_resume_s — until a surviving replica committed a step whose quorum formed after the fault.
* replacement_s — until the replacement of the failed slot committed a step.
* downtime_s — until the job committed a step beyond the highest one committed before the fault (so a
  restart from disk also pays for recomputing the steps it lost).
* steps_lost — committed steps whose effect was lost and had to be recomputed: per fault, the highest
  step the other replicas had committed minus the last step the job still had when it next committed;
  per run, the steps thrown away by restarts from a disk checkpoint. A step in flight when a replica
  died is *recomputed*, not lost: it was never committed (see ``recomputed_attempts``).
* goodput — useful step time / training wall time. A committed step's useful time is its compute and
  commit plus the *typical* (median) quorum latency; time spent waiting for failure detection,
  re-forming the group, failed attempts and recomputed steps is not useful.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class EventLog:
    """Append-only JSON-lines log; one ``write`` per event so concurrent readers see whole lines."""

    def __init__(self, path: Path, **fixed: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fixed = fixed
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def log(self, kind: str, t: float | None = None, **data: Any) -> None:
        record = {"t": time.time() if t is None else t, "kind": kind, **self.fixed, **data}
        os.write(self._fd, (json.dumps(record, default=str) + "\n").encode())

    def close(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """All events of a run, sorted by time (partial trailing lines from a killed writer are skipped)."""
    events: list[dict[str, Any]] = []
    folder = Path(run_dir) / "events"
    for path in sorted(folder.glob("*.jsonl")) if folder.exists() else []:
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    events.sort(key=lambda e: e["t"])
    return events


@dataclass
class RecoveryEvent:
    fault: str  # e.g. "kill:1@step 10" or "kill:2@31.2s"
    action: str
    replica: int | None
    t_fault: float
    detection_s: float | None = None
    survivor_resume_s: float | None = None
    downtime_s: float | None = None  # until the job committed a step beyond what it had before the fault
    replacement_s: float | None = None
    steps_lost: int = 0
    cold_restart: bool = False  # recovered from a disk checkpoint (no live peer)
    healed_from_peer: bool = False


@dataclass
class StartupBreakdown:
    """Where a (replacement) replica's time to its first useful step went, in seconds."""

    replica: int
    incarnation: int
    spare: bool
    process_start_s: float | None  # spawn/activation -> Python entered replica main
    imports_s: float | None  # torch, torchft, task module
    build_s: float | None  # task data + model/optimizer
    manager_s: float | None  # TCPStore + torchft Manager
    first_quorum_s: float | None  # join + live state transfer from a peer
    first_step_s: float | None  # that first step's compute and commit
    total_s: float | None  # spawn/activation -> first commit


@dataclass
class RunReport:
    wall_s: float | None
    train_s: float | None
    steps_committed: int
    final_step: int
    goodput: float | None
    steps_lost: int
    recomputed_attempts: int
    failures: list[RecoveryEvent] = field(default_factory=list)
    startups: list[StartupBreakdown] = field(default_factory=list)
    median_step_s: float | None = None
    median_quorum_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, float]:
        """Flat numbers for a tracker (``mlflow.log_metrics``)."""

        def mean(values: Iterable[float | None]) -> float | None:
            vals = [v for v in values if v is not None]
            return statistics.fmean(vals) if vals else None

        out: dict[str, Any] = {
            "wall_s": self.wall_s,
            "train_s": self.train_s,
            "goodput": self.goodput,
            "steps_lost": self.steps_lost,
            "failures": len(self.failures),
            "recomputed_attempts": self.recomputed_attempts,
            "detection_s_mean": mean(f.detection_s for f in self.failures),
            "survivor_resume_s_mean": mean(f.survivor_resume_s for f in self.failures),
            "downtime_s_mean": mean(f.downtime_s for f in self.failures),
            "replacement_s_mean": mean(f.replacement_s for f in self.failures),
        }
        return {k: float(v) for k, v in out.items() if v is not None}


def _fault_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Faults as injected: in-replica step faults and supervisor timed faults."""
    return [e for e in events if e["kind"] == "fault"]


def analyze(run_dir: Path, events: list[dict[str, Any]] | None = None) -> RunReport:
    events = read_events(run_dir) if events is None else events
    attempts = [e for e in events if e["kind"] == "attempt"]
    commits = [a for a in attempts if a.get("committed")]
    quorum_lat = [a["t_quorum"] - a["t_start"] for a in commits]
    med_q = statistics.median(quorum_lat) if quorum_lat else 0.0

    # final lineage: for each step, the last time it was committed
    last_commit: dict[int, dict[str, Any]] = {}
    for a in commits:
        if a["step"] not in last_commit or a["t_end"] >= last_commit[a["step"]]["t_end"]:
            last_commit[a["step"]] = a
    useful = sum((a["t_end"] - a["t_quorum"]) + min(a["t_quorum"] - a["t_start"], med_q) for a in last_commit.values())
    starts = [a["t_start"] for a in attempts]
    train_s = (max(a["t_end"] for a in commits) - min(starts)) if commits else None
    sup_start = [e["t"] for e in events if e["kind"] == "supervisor_start"]
    sup_end = [e["t"] for e in events if e["kind"] in ("supervisor_done", "supervisor_failed")]
    wall_s = (sup_end[-1] - sup_start[0]) if sup_start and sup_end else train_s

    failures = [_recovery(f, events, commits) for f in _fault_events(events)]
    step_durs = [a["t_end"] - a["t_quorum"] for a in last_commit.values()]
    return RunReport(
        wall_s=wall_s,
        train_s=train_s,
        steps_committed=len(last_commit),
        final_step=(max(last_commit) + 1) if last_commit else 0,
        goodput=(useful / train_s) if train_s else None,
        steps_lost=_steps_lost(events, commits),
        recomputed_attempts=sum(1 for a in attempts if not a.get("committed")),
        failures=failures,
        startups=_startups(events),
        median_step_s=statistics.median(step_durs) if step_durs else None,
        median_quorum_s=med_q if quorum_lat else None,
    )


def _steps_lost(events: list[dict[str, Any]], commits: list[dict[str, Any]], gap_s: float = 10.0) -> int:
    """Committed steps thrown away by restarts from disk (each cold restart counted once).

    Loads less than ``gap_s`` apart belong to one restart episode. In episode ``e`` (time ``T``, loaded
    step ``k``) the steps ``>= k`` committed since the previous episode were lost.
    """
    loads = sorted((e["t"], int(e["step"])) for e in events if e["kind"] == "ckpt_loaded")
    episodes: list[tuple[float, int]] = []
    for t, step in loads:
        if episodes and t - episodes[-1][0] < gap_s:
            episodes[-1] = (episodes[-1][0], min(episodes[-1][1], step))
        else:
            episodes.append((t, step))
    lost, since = 0, float("-inf")
    for t, k in episodes:
        lost += len({c["step"] for c in commits if since < c["t_end"] < t and c["step"] >= k})
        since = t
    return lost


def _recovery(fault: dict[str, Any], events: list[dict[str, Any]], commits: list[dict[str, Any]]) -> RecoveryEvent:
    t0 = fault["t"]
    victim = fault.get("target")
    victim_inc = fault.get("target_inc")
    rec = RecoveryEvent(fault=fault.get("desc", ""), action=fault.get("action", "kill"), replica=victim, t_fault=t0)

    def is_victim(e: dict[str, Any]) -> bool:
        return e.get("replica") == victim and e.get("inc") == victim_inc

    noticed = [
        e["t_end"] if e["kind"] == "attempt" else e["t"]
        for e in events
        if e["t"] >= t0
        and (
            (e["kind"] == "attempt" and not e.get("committed") and not is_victim(e))
            or (e["kind"] == "replica_exit" and e.get("replica") == victim and e.get("inc") == victim_inc)
            or (e["kind"] == "watchdog_kill" and e.get("replica") == victim)
        )
    ]
    if noticed:
        rec.detection_s = min(noticed) - t0
    after = [c for c in commits if c["t_quorum"] > t0 and not is_victim(c)]
    survivors = [c for c in after if c.get("replica") != victim]
    if survivors:
        rec.survivor_resume_s = min(c["t_end"] for c in survivors) - t0
    replacement = [c for c in after if c.get("replica") == victim]
    if replacement:
        rec.replacement_s = min(c["t_end"] for c in replacement) - t0
    before = [c["step"] for c in commits if c["t_end"] <= t0 and not is_victim(c)]
    before = before or [c["step"] for c in commits if c["t_end"] <= t0]
    if before and after:
        first_after = min(after, key=lambda c: c["t_end"])["step"]
        rec.steps_lost = max(0, max(before) - (first_after - 1))
    progress = max((c["step"] for c in commits if c["t_end"] <= t0), default=-1)
    beyond = [c["t_end"] for c in commits if c["t_end"] > t0 and c["step"] > progress and not is_victim(c)]
    if beyond:
        rec.downtime_s = min(beyond) - t0
    rec.cold_restart = any(e["kind"] == "ckpt_loaded" and e["t"] > t0 for e in events)
    rec.healed_from_peer = any(e["kind"] == "healed" and e["t"] > t0 for e in events)
    return rec


def _startups(events: list[dict[str, Any]]) -> list[StartupBreakdown]:
    out: list[StartupBreakdown] = []
    by_proc: dict[tuple[Any, Any], dict[str, dict[str, Any]]] = {}
    for e in events:
        if e.get("replica") is None or e.get("inc") is None:
            continue
        if e["kind"] in ("boot", "activated", "manager_ready", "attempt"):
            slot = by_proc.setdefault((e["replica"], e["inc"]), {})
            key = e["kind"] if e["kind"] != "attempt" else ("first_commit" if e.get("committed") else "")
            if key and key not in slot:
                slot[key] = e
    for (replica, inc), got in sorted(by_proc.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        boot = got.get("boot")
        if boot is None:
            continue
        act = got.get("activated")
        mgr = got.get("manager_ready")
        first = got.get("first_commit")
        spare = act is not None

        def diff(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else b - a

        t_origin = act["t"] if act else boot.get("t_spawn")
        out.append(
            StartupBreakdown(
                replica=replica,
                incarnation=inc,
                spare=spare,
                process_start_s=None if spare else diff(boot.get("t_spawn"), boot.get("t_main")),
                imports_s=None if spare else diff(boot.get("t_main"), boot.get("t_imports")),
                build_s=None if spare else diff(boot.get("t_imports"), boot.get("t_built")),
                manager_s=diff(act["t"] if act else boot.get("t_built"), mgr["t"] if mgr else None),
                first_quorum_s=diff(mgr["t"] if mgr else None, first["t_quorum"] if first else None),
                first_step_s=diff(first["t_quorum"] if first else None, first["t_end"] if first else None),
                total_s=diff(t_origin, first["t_end"] if first else None),
            )
        )
    return out
