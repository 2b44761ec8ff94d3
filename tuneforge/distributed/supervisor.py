"""The supervisor: starts the lighthouse and the replica processes, replaces failed ones, scales.

It never touches training state. Its decisions only use process exits and the small status files
replicas publish (``<run>/status/replica_<slot>.json``):

* A replica dies while another one holds live state -> start a replacement in *join* mode (or hand
  the slot to a hot spare); torchft heals it from a peer at its first quorum. It never reads disk.
* Nobody alive holds state (all died) -> start every slot in *resume* mode: each loads the newest
  disk checkpoint. A joiner left without peers exits as "orphaned" and is treated the same way.
* ``scale(N)`` (or ``tuneforge scale RUN N`` writing ``<run>/control.json``) moves the target
  between MIN and MAX: new slots join live, surplus ones get SIGTERM and leave after their step.
* A replica that stops making progress while its peers do (a hang) is SIGKILLed by a watchdog.
* Timed faults of the fault plan are delivered from here (SIGKILL, or SIGUSR1 = hang).

Several machines (``resilience.lighthouse`` set): one supervisor per node, all pointed at one external
lighthouse, each with its own run directory. The rules stay the same but "live state" may now be on
another node, beyond this supervisor's sight, so a replacement always *joins* first (heals from
whichever peer holds state) and only a replica that finds nobody with state anywhere (it exits as
orphaned) is restarted in resume mode, from this node's own checkpoints.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import tuneforge.distributed.faults as fault_lib
from tuneforge.distributed.config import JobSpec
from tuneforge.distributed.lighthouse import Lighthouse
from tuneforge.distributed.metrics import EventLog, RunReport, analyze
from tuneforge.distributed.network import default_node_name, lighthouse_url, split_host_port, wait_for_port
from tuneforge.distributed.runfiles import EXIT_DONE, EXIT_ORPHANED, checkpoint_paths
from tuneforge.errors import TuneforgeError

TICK_S = 0.05


@dataclass
class _Proc:
    popen: subprocess.Popen[bytes]
    slot: int | None  # None for an idle hot spare
    inc: int
    mode: str  # "resume" | "join" | "spare"
    started: float
    spare_id: str | None = None
    leaving: bool = False
    leave_deadline: float = 0.0
    stdin: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid


def resolve_run_dir(run: str | Path) -> Path:
    """A run directory from a path or a run name under ``$TUNEFORGE_HOME/runs``."""
    path = Path(run)
    if (path / "job.json").exists():
        return path
    from tuneforge.paths import runs_dir

    named = runs_dir() / str(run)
    if (named / "job.json").exists():
        return named
    raise TuneforgeError(f"run {str(run)!r}: no elastic run there (looked for {path}/job.json and {named}/job.json)")


def scale(run: str | Path, replicas: int) -> int:
    """Ask a running job to change its replica count (works from any process). Returns the target."""
    run_dir = resolve_run_dir(run)
    spec = JobSpec.load(run_dir / "job.json")
    lo, hi = spec.resilience.min_replicas, spec.resilience.max_replicas
    if not lo <= replicas <= hi:
        raise TuneforgeError(f"scale {replicas}: outside this run's --replicas {lo}:{hi}")
    _write_control(run_dir, replicas)
    return replicas


def _write_control(run_dir: Path, replicas: int) -> None:
    tmp = run_dir / f".control.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_text(json.dumps({"replicas": replicas, "t": time.time()}))
    tmp.replace(run_dir / "control.json")


class Supervisor:
    """Owns one elastic run: ``start()``, then ``run()`` (blocking) or ``tick()`` from your own loop."""

    def __init__(self, spec: JobSpec, run_dir: Path, python: str = sys.executable, env: dict[str, str] | None = None):
        if spec.resilience.multi_node and spec.resilience.node is None:
            spec = replace(spec, resilience=replace(spec.resilience, node=default_node_name()))
        self.spec = spec
        self.res = spec.resilience
        self.run_dir = Path(run_dir)
        self.python = python
        self.env = dict(os.environ if env is None else env)
        self.procs: dict[int, _Proc] = {}  # slot -> live replica
        self.leaving: list[_Proc] = []
        self.spares: list[_Proc] = []
        self.next_inc: dict[int, int] = {}
        self.spare_seq = 0
        self.target = self.res.initial_replicas
        self.control_mtime = 0.0
        self.restarts = 0
        self.startup_failures = 0
        self.job_progress = False
        self.force_resume = False  # multi-node: a joiner found nobody with state anywhere
        self.t_train_start: float | None = None
        self.completed = False
        self.finished = False
        self.failed: str | None = None
        self.plan = fault_lib.FaultPlan.parse(self.res.fault_plan)
        self.timed = self.plan.timed_faults()
        self.rng = random.Random(self.plan.seed)
        self.lighthouse: Lighthouse | None = None
        self.log: EventLog | None = None
        self._done_deadline = 0.0
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        for sub in ("events", "status", "logs"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        self._claim_run_dir()
        self.spec.save(self.run_dir / "job.json")
        _write_control(self.run_dir, self.target)
        self.control_mtime = (self.run_dir / "control.json").stat().st_mtime
        self.log = EventLog(self.run_dir / "events" / "supervisor.jsonl", replica=None, inc=None)
        policy = self.spec.batch_policy()
        self.log.log(
            "supervisor_start",
            target=self.target,
            pid=os.getpid(),
            faults=self.plan.to_dict(),
            batch_policy=policy.mode,
            lr_scaling=policy.lr_scaling if policy.mode != "fixed" else "none (global batch fixed)",
            node=self.res.node,
            lighthouse=self.res.lighthouse,
        )
        (self.run_dir / "lighthouse.addr").unlink(missing_ok=True)
        self.job_progress = bool(checkpoint_paths(self.run_dir))
        if self.res.multi_node:
            addr = self._wait_external_lighthouse()
            self._publish_lighthouse(addr)
            self._reconcile(time.time())
            return
        self.lighthouse = Lighthouse(
            min_replicas=self.res.min_replicas,
            log_path=self.run_dir / "logs" / "lighthouse.log",
            heartbeat_timeout_ms=self.res.heartbeat_timeout_ms,
            join_timeout_ms=self.res.join_timeout_ms,
            quorum_tick_ms=self.res.quorum_tick_ms,
        )
        self.lighthouse.launch()
        # replicas import torch while the lighthouse starts; they wait for lighthouse.addr
        self._reconcile(time.time())  # spawns the replicas, then the hot spares
        try:
            addr = self.lighthouse.wait_ready()
        except BaseException:
            self.shutdown()
            raise
        self._publish_lighthouse(addr)

    def _publish_lighthouse(self, addr: str) -> None:
        tmp = self.run_dir / ".lighthouse.addr.tmp"
        tmp.write_text(addr)
        tmp.replace(self.run_dir / "lighthouse.addr")
        info = {"pid": os.getpid(), "lighthouse": addr, "node": self.res.node, "host": socket.gethostname()}
        (self.run_dir / "supervisor.json").write_text(json.dumps(info))

    def _claim_run_dir(self) -> None:
        """Refuse a run directory another node's supervisor uses (two nodes sharing one clobber each other)."""
        try:
            owner = json.loads((self.run_dir / "supervisor.json").read_text()).get("node")
        except (OSError, ValueError, AttributeError):
            pass
        else:
            if owner != self.res.node:
                raise TuneforgeError(
                    f"run directory {self.run_dir} belongs to node {owner!r}, not {self.res.node!r}: every node "
                    "needs its own run directory (output.dir per node, or $TUNEFORGE_HOME on a per-node disk)"
                )
        info = {"pid": os.getpid(), "node": self.res.node, "host": socket.gethostname()}
        (self.run_dir / "supervisor.json").write_text(json.dumps(info))

    def _wait_external_lighthouse(self) -> str:
        """The external lighthouse's URL, once it accepts connections (it may start after this node)."""
        assert self.log is not None and self.res.lighthouse is not None
        addr = lighthouse_url(self.res.lighthouse)
        host, port = split_host_port(addr.removeprefix("http://"), "resilience.lighthouse")
        limit = self.res.quorum_timeout_s
        if not wait_for_port(host, port, limit):
            self.log.log("supervisor_failed", reason=f"lighthouse {addr} unreachable")
            self.log.close()
            self.finished = True
            raise TuneforgeError(
                f"resilience.lighthouse: nothing answers at {addr} after {limit:.0f}s (quorum_timeout_s); start it "
                "with `tuneforge lighthouse --bind 0.0.0.0:PORT --min-replicas N` and check the address and firewall"
            )
        self.log.log("lighthouse_external", address=addr)
        return addr

    def run(self, timeout_s: float | None = None) -> RunReport:
        """Supervise until the job finishes (or fails / times out); always stops every child."""
        if self.log is None:
            self.start()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with _SigtermExit() as sigterm:
            try:
                while not self.tick():
                    if deadline is not None and time.monotonic() > deadline:
                        self.failed = f"timed out after {timeout_s:.0f}s"
                        break
                    time.sleep(TICK_S)
            finally:
                sigterm.disarm()  # a SIGTERM now must not interrupt the cleanup
                self.shutdown()
        if self.failed:
            raise TuneforgeError(f"elastic run {self.run_dir} failed: {self.failed}")
        return analyze(self.run_dir)

    def scale(self, replicas: int) -> None:
        """In-process equivalent of :func:`scale`."""
        scale(self.run_dir, replicas)

    def shutdown(self) -> None:
        """Stop every child process this supervisor started (by PID) and the lighthouse."""
        with self._lock:
            procs = list(self.procs.values()) + self.leaving + self.spares
            for p in procs:
                if p.stdin is not None:
                    try:
                        p.stdin.close()
                    except OSError:
                        pass
                if p.popen.poll() is None:
                    try:
                        os.kill(p.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            end = time.monotonic() + 3.0
            for p in procs:
                try:
                    p.popen.wait(timeout=max(0.0, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    try:
                        os.kill(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    p.popen.wait(timeout=5)
            self.procs.clear()
            self.leaving.clear()
            self.spares.clear()
            if self.lighthouse is not None:
                self.lighthouse.stop()
            if self.log is not None and not self.finished:
                self.log.log("supervisor_failed" if self.failed else "supervisor_done", reason=self.failed)
                self.log.close()
                self.finished = True

    def live_pids(self) -> list[int]:
        return [p.pid for p in list(self.procs.values()) + self.leaving + self.spares if p.popen.poll() is None]

    # -- one supervision step ----------------------------------------------------------------------
    def tick(self) -> bool:
        """Check children, faults, control and watchdog once. Returns True when the run is over."""
        with self._lock:
            now = time.time()
            assert self.log is not None
            if self.lighthouse is not None and not self.lighthouse.alive() and not self.completed:
                self.log.log("lighthouse_restart")
                self.lighthouse.restart()
            self._read_control()
            status = self._statuses()
            self._reap(now, status)
            if self.failed:
                return True
            if not self.completed and any(
                (s := self._status_of(p, status)) and s.get("phase") == "done" for p in self.procs.values()
            ):
                self.completed = True  # a replica committed the last step: never respawn from here on
                self._done_deadline = now + self.res.timeout_s
            if self.completed:
                return self._wind_down(now)
            self._note_progress(now, status)
            self._faults(now)
            self._watchdog(now, status)
            self._reconcile(now, status)
            return bool(self.failed)

    def _read_control(self) -> None:
        path = self.run_dir / "control.json"
        try:
            mtime = path.stat().st_mtime
            if mtime == self.control_mtime:
                return
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return
        self.control_mtime = mtime
        wanted = int(data["replicas"])
        clamped = max(self.res.min_replicas, min(self.res.max_replicas, wanted))
        if clamped != self.target:
            assert self.log is not None
            self.log.log("scale", target=clamped, previous=self.target, requested=wanted)
            self.target = clamped

    def _statuses(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for path in (self.run_dir / "status").glob("replica_*.json"):
            try:
                out[path.stem.removeprefix("replica_")] = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
        return out

    def _status_of(self, p: _Proc, status: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        s = status.get(str(p.slot))
        return s if s is not None and s.get("inc") == p.inc and s.get("pid") == p.pid else None

    def _reap(self, now: float, status: dict[str, dict[str, Any]]) -> None:
        assert self.log is not None
        for slot, p in list(self.procs.items()):
            rc = p.popen.poll()
            if rc is None:
                continue
            del self.procs[slot]
            self.log.log("replica_exit", replica=slot, inc=p.inc, pid=p.pid, returncode=rc)
            if rc == EXIT_DONE:
                self.completed = True
                self._done_deadline = now + self.res.timeout_s
                continue
            if rc == EXIT_ORPHANED:
                # respawned by _reconcile, in resume mode if nobody holds state; with several nodes only
                # the orphan itself can tell (it asked the whole quorum)
                self.force_resume = self.force_resume or self.res.multi_node
                continue
            ever_ran = (self.run_dir / "events" / f"replica_{slot}_{p.inc}.jsonl").exists()
            self.startup_failures = 0 if ever_ran else self.startup_failures + 1
            if self.startup_failures >= 3:
                self.failed = f"replica {slot} failed to start 3 times; see {self._log_path(slot, p.inc)}"
                return
            self.restarts += 1
            if self.restarts > self.res.max_restarts:
                self.failed = f"more than max_restarts={self.res.max_restarts} replica failures"
                return
        for p in list(self.leaving):
            if p.popen.poll() is not None:
                self.leaving.remove(p)
                self.log.log("replica_exit", replica=p.slot, inc=p.inc, pid=p.pid, returncode=p.popen.returncode)
            elif now > p.leave_deadline:
                os.kill(p.pid, signal.SIGKILL)
        for p in list(self.spares):
            if p.popen.poll() is not None:
                self.spares.remove(p)
                self.log.log("spare_exit", spare=p.spare_id, pid=p.pid, returncode=p.popen.returncode)

    def _wind_down(self, now: float) -> bool:
        """One replica finished the job; let the others that hold state finish their last step too
        (bounded by ``timeout_s``); replicas still starting or joining are not waited for."""
        status = self._statuses()
        finishing = [p for p in self._stateful(status) if p.popen.poll() is None]
        return not finishing or now >= self._done_deadline

    def _note_progress(self, now: float, status: dict[str, dict[str, Any]]) -> None:
        if self.t_train_start is None and any(s.get("step", 0) >= 1 for s in status.values()):
            self.t_train_start = now
            self.job_progress = True

    def _stateful(self, status: dict[str, dict[str, Any]]) -> list[_Proc]:
        out = []
        for p in self.procs.values():
            s = self._status_of(p, status)
            if s is not None and s.get("step", 0) >= 1 and s.get("phase") in ("ready", "training"):
                out.append(p)
        return out

    def _faults(self, now: float) -> None:
        assert self.log is not None
        while self.timed and self.t_train_start is not None and now >= self.t_train_start + (self.timed[0].time_s or 0):
            fault = self.timed.pop(0)
            active = sorted(s for s, p in self.procs.items() if not p.leaving)
            slot = fault.replica if fault.replica is not None else (self.rng.choice(active) if active else None)
            if slot not in self.procs or not fault_lib.claim(self.run_dir, fault):
                self.log.log("fault_skipped", desc=fault.describe(), reason="target not running")
                continue
            p = self.procs[slot]
            self.log.log("fault", desc=fault.describe(), action=fault.action, target=slot, target_inc=p.inc, pid=p.pid)
            os.kill(p.pid, signal.SIGKILL if fault.action == "kill" else signal.SIGUSR1)

    def _watchdog(self, now: float, status: dict[str, dict[str, Any]]) -> None:
        assert self.log is not None
        limit = self.res.hang_timeout_s
        fresh = {p.slot for p in self.procs.values() if (s := self._status_of(p, status)) and now - s["t"] < limit / 2}
        for p in list(self.procs.values()):
            s = self._status_of(p, status)
            if s is None or s.get("phase") != "training" or now - s["t"] <= limit:
                continue
            if fresh - {p.slot}:
                self.log.log("watchdog_kill", replica=p.slot, inc=p.inc, pid=p.pid, silent_s=now - s["t"])
                os.kill(p.pid, signal.SIGKILL)

    def _reconcile(self, now: float, status: dict[str, dict[str, Any]] | None = None) -> None:
        """Make the set of live replicas match the target, choosing join vs resume per the rules above."""
        assert self.log is not None
        status = self._statuses() if status is None else status
        stateful = self._stateful(status)
        if self.job_progress and not stateful and not self.res.multi_node:
            # nobody holds live state: joiners can never heal; restart them from disk instead
            for slot, p in list(self.procs.items()):
                if p.mode == "join":
                    self.log.log("orphan_kill", replica=slot, inc=p.inc, pid=p.pid)
                    os.kill(p.pid, signal.SIGKILL)
                    p.popen.wait(timeout=10)
                    del self.procs[slot]
            if not self.procs:
                self.log.log("cold_restart", checkpoint=str(checkpoint_paths(self.run_dir)[-1:]))
        active = sorted(s for s, p in self.procs.items() if not p.leaving)
        while len(active) > self.target:
            slot = active.pop()
            p = self.procs.pop(slot)
            p.leaving, p.leave_deadline = True, now + self.res.timeout_s + 15
            self.leaving.append(p)
            self.log.log("scale_down", replica=slot, inc=p.inc, pid=p.pid)
            os.kill(p.pid, signal.SIGTERM)
        busy = set(self.procs) | {p.slot for p in self.leaving}
        # several nodes: once this node has seen the job train, peers elsewhere probably hold live state
        remote_state = self.res.multi_node and self.t_train_start is not None and not self.force_resume
        mode = "join" if stateful or remote_state else "resume"
        # a whole (re)start waits for its peers before step 1; a joiner never waits
        barrier = self.target if mode == "resume" and not self.procs else 0
        slot = 0
        while len(active) < self.target:
            while slot in busy:
                slot += 1
            self._spawn(slot, mode, barrier)
            busy.add(slot)
            active.append(slot)
            if mode == "resume":
                self.force_resume = False
        while len(self.spares) < self.res.hot_spares:
            self._spawn_spare()

    # -- spawning ------------------------------------------------------------------------------
    def _log_path(self, slot: int | str, inc: int) -> Path:
        return self.run_dir / "logs" / f"replica_{slot}_{inc}.log"

    def _child_env(self) -> dict[str, str]:
        env = dict(self.env)
        env["TUNEFORGE_SPAWN_T"] = repr(time.time())
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, self.res.max_replicas))))
        return env

    def _popen(self, args: list[str], log_path: Path, stdin: Any) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                [self.python, "-m", "tuneforge.distributed.replica", "--run-dir", str(self.run_dir), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=stdin,
                env=self._child_env(),
            )

    def _spawn(self, slot: int, mode: str, barrier: int = 0) -> None:
        assert self.log is not None
        inc = self.next_inc.get(slot, 0)
        self.next_inc[slot] = inc + 1
        min_step = 1 if mode == "join" else 0
        ready = [p for p in self.spares if (self.run_dir / "status" / f"replica_spare_{p.spare_id}.json").exists()]
        if ready:
            p = ready[0]
            self.spares.remove(p)
            assert p.stdin is not None
            p.stdin.write(
                (
                    json.dumps({"slot": slot, "inc": inc, "mode": mode, "min_step": min_step, "start_barrier": barrier})
                    + "\n"
                ).encode()
            )
            p.stdin.flush()
            p.slot, p.inc, p.mode, p.started = slot, inc, mode, time.time()
            self.procs[slot] = p
            self.log.log("activate", replica=slot, inc=inc, pid=p.pid, spare=p.spare_id, mode=mode)
            return
        popen = self._popen(
            [
                "--slot",
                str(slot),
                "--inc",
                str(inc),
                "--mode",
                mode,
                "--min-step",
                str(min_step),
                "--start-barrier",
                str(barrier),
            ],
            self._log_path(slot, inc),
            subprocess.DEVNULL,
        )
        self.procs[slot] = _Proc(popen=popen, slot=slot, inc=inc, mode=mode, started=time.time())
        self.log.log("spawn", replica=slot, inc=inc, pid=popen.pid, mode=mode)

    def _spawn_spare(self) -> None:
        assert self.log is not None
        sid = str(self.spare_seq)
        self.spare_seq += 1
        popen = self._popen(["--spare", sid], self.run_dir / "logs" / f"spare_{sid}.log", subprocess.PIPE)
        self.spares.append(
            _Proc(popen=popen, slot=None, inc=-1, mode="spare", started=time.time(), spare_id=sid, stdin=popen.stdin)
        )
        self.log.log("spare_spawn", spare=sid, pid=popen.pid)


class _SigtermExit:
    """While supervising, turn SIGTERM into SystemExit so ``run``'s cleanup stops every child (a container's
    PID 1 would otherwise ignore it and be SIGKILLed with its replicas). Main thread only; else a no-op."""

    def __init__(self) -> None:
        self.armed = False
        self.previous: Any = None

    def __enter__(self) -> _SigtermExit:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
            self.armed = True
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.armed:
            self.armed = False
            raise SystemExit(128 + signum)

    def disarm(self) -> None:
        self.armed = False

    def __exit__(self, *_exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def new_run_dir(name: str | None = None) -> Path:
    """A fresh run directory under ``$TUNEFORGE_HOME/runs``."""
    from tuneforge.paths import runs_dir

    name = name or time.strftime("elastic-%Y%m%d-%H%M%S")
    path = runs_dir() / name
    if (path / "job.json").exists():
        raise TuneforgeError(f"run {name!r} already exists at {path}; pick another name")
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(spec: JobSpec, run_dir: Path | None = None, timeout_s: float | None = None) -> RunReport:
    """Train ``spec`` elastically to completion and return the recovery/goodput report."""
    return Supervisor(spec, run_dir or new_run_dir()).run(timeout_s=timeout_s)


def start_background(
    spec: JobSpec, run_dir: Path | None = None, timeout_s: float | None = None
) -> tuple[Supervisor, threading.Thread]:
    """Run the supervisor in a thread (for notebooks and tests); ``scale`` it while it runs."""
    sup = Supervisor(spec, run_dir or new_run_dir())
    sup.start()
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["report"] = sup.run(timeout_s=timeout_s)
        except BaseException as exc:  # surfaced by the caller via sup.error
            result["error"] = exc

    thread = threading.Thread(target=target, name="tuneforge-supervisor", daemon=True)
    thread.start()
    sup.result = result  # type: ignore[attr-defined]
    return sup, thread
