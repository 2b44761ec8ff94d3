"""One replica group (here: one process): the fault-tolerant data-parallel step loop on torchft.

Run as ``python -m tuneforge.distributed.replica --run-dir RUN --slot I --inc K`` by the supervisor.
Module-level imports are stdlib only so that the process can report when its heavy imports (torch,
torchft, the task module) start and end; a hot spare (``--spare``) does all of that ahead of time and
then waits on stdin for the slot it should take over.

What torchft does here: lighthouse quorum per step, reconfiguring the gloo/NCCL process group when the
membership changes, the per-step commit vote (``should_commit``) and live recovery — a replica behind
the others fetches the registered state (model, optimizer, scheduler, data cursor) from an up-to-date
peer during ``start_quorum``. What this module adds: the exact global batch (see ``assignment``), a
SUM all-reduce of token-normalised gradients, async disk checkpoints as a last resort, fault
injection, and event logs for the recovery metrics.

Exit codes: 0 finished, 10 left on request (scale down), 3 orphaned (no live peer to heal from).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tuneforge.distributed import faults as fault_lib
from tuneforge.distributed.assignment import micro_batches, plan_step, shard, start_position
from tuneforge.distributed.config import JobSpec
from tuneforge.distributed.metrics import EventLog
from tuneforge.distributed.network import advertised_host, replica_id
from tuneforge.distributed.runfiles import (
    EXIT_DONE,
    EXIT_LEFT,
    EXIT_ORPHANED,
    checkpoint_paths,
    wait_for_lighthouse,
    write_status,
)
from tuneforge.distributed.task import MAX_SUFFIX
from tuneforge.files import atomic_path


class StepAborted(RuntimeError):
    """A collective inside a step's preparation failed: the step is voted down and retried."""


class Replica:
    """The training loop of one replica; see the module docstring."""

    def __init__(self, spec: JobSpec, run_dir: Path, task: Any, built: tuple[Any, Any, Any]) -> None:
        self.spec = spec
        self.run_dir = run_dir
        self.task = task
        self.model, self.optimizer, self.scheduler = built
        self.policy = spec.batch_policy()
        self.res = spec.resilience
        self.position = 0  # stream position of the next step (only matters for the per_replica policy)
        self.stateful = False  # holds live training state (committed, healed or loaded a checkpoint)
        self.healed = False
        self.leave_requested = False
        self._saver: threading.Thread | None = None
        self._staged = threading.Event()  # clear while a checkpoint snapshot is being taken
        self._staged.set()
        self._status_key: tuple[str, bool] | None = None
        self._status_t = 0.0
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    # -- state exchanged with peers (live recovery) and written to disk (fallback) ----------------
    def _state_dict(self) -> dict[str, Any]:
        from tuneforge.distributed.task import task_state_dict

        state = task_state_dict(self.task, self.model, self.optimizer, self.scheduler)
        return {"task": state, "engine": {"position": self.position}}

    def _load_state_dict(self, state: dict[str, Any]) -> None:
        from tuneforge.distributed.task import load_task_state

        self._wait_staged()
        load_task_state(self.task, self.model, self.optimizer, self.scheduler, state["task"])
        self.position = int(state["engine"]["position"])
        self.healed = True

    # -- setup --------------------------------------------------------------------------------
    def connect(self, slot: int, inc: int, log: EventLog) -> None:
        """Start this group's TCPStore and torchft Manager (which heartbeats to the lighthouse)."""
        from datetime import timedelta

        import torch
        from torch.distributed import TCPStore
        from torchft import Manager
        from torchft.process_group import ProcessGroupBabyNCCL

        from tuneforge.distributed.endpoints import AdvertisedHTTPTransport, BoundProcessGroupGloo

        self.slot, self.inc, self.log = slot, inc, log
        lighthouse = wait_for_lighthouse(self.run_dir)
        # what peers (possibly on other machines) connect to: our store, manager server, checkpoint server
        host = advertised_host(self.res.bind_host, self.res.advertise_host)
        timeout = timedelta(seconds=self.res.timeout_s)
        use_nccl = self.res.backend == "nccl" or (self.res.backend == "auto" and torch.cuda.is_available())
        self.pg = pg = (
            ProcessGroupBabyNCCL(timeout=timeout) if use_nccl else BoundProcessGroupGloo(self.res.bind_host, timeout)
        )
        self.store = TCPStore(host_name=host, port=0, is_master=True, wait_for_workers=False)
        self.transport = AdvertisedHTTPTransport(host, timeout)
        self.manager = Manager(
            pg=pg,
            load_state_dict=self._load_state_dict,
            state_dict=self._state_dict,
            min_replica_size=self.res.min_replicas,
            use_async_quorum=False,  # heal before computing, so every member of a quorum contributes
            timeout=timeout,
            quorum_timeout=timedelta(seconds=self.res.quorum_timeout_s),
            connect_timeout=timedelta(seconds=max(10.0, self.res.timeout_s)),
            rank=0,
            world_size=1,
            store_addr=host,
            store_port=self.store.port,
            lighthouse_addr=lighthouse,
            replica_id=replica_id(self.res.node, slot),
            hostname=host,
            heartbeat_interval=timedelta(milliseconds=self.res.heartbeat_interval_ms),
            checkpoint_transport=self.transport,
            init_sync=self.res.init_sync,
            quorum_retries=2,  # ride out a lighthouse restart instead of failing every replica
        )
        log.log("manager_ready", lighthouse=lighthouse, host=host, node=self.res.node)

    def load_latest_checkpoint(self) -> int | None:
        """Cold restart: load the newest complete disk checkpoint, if any. Returns its step."""
        import torch

        paths = checkpoint_paths(self.run_dir)
        if not paths:
            return None
        t0 = time.time()
        blob = torch.load(paths[-1], map_location="cpu", weights_only=False)
        self._load_state_dict(blob["user"])
        self.healed = False
        self.manager.load_state_dict(blob["torchft"])
        self.stateful = True
        step = int(blob["torchft"]["step"])
        self.log.log("ckpt_loaded", step=step, path=str(paths[-1]), seconds=time.time() - t0)
        return step

    # -- the loop -------------------------------------------------------------------------------
    def wait_for_peers(self, count: int, timeout_s: float) -> None:
        """Start barrier for a (re)started job: give the other initial replicas a moment to come up,
        so step 0 is not run by whoever imported torch first. Purely an efficiency measure."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            ready = 0
            for path in (self.run_dir / "status").glob("replica_*.json"):
                try:
                    st = json.loads(path.read_text())
                    os.kill(int(st["pid"]), 0)
                except (OSError, ValueError, KeyError):
                    continue
                ready += st.get("phase") in ("ready", "training", "done")
            if ready >= count:
                return
            time.sleep(0.05)

    def train(self, min_step: int, start_barrier: int = 0) -> int:
        """Run until the job's last step is committed. Returns the process exit code."""
        manager, spec = self.manager, self.spec
        step_faults = fault_lib.FaultPlan.parse(self.res.fault_plan).step_faults(self.slot)
        self._status("ready", manager.current_step())
        if start_barrier > 1:
            self.wait_for_peers(start_barrier, timeout_s=min(60.0, self.res.quorum_timeout_s))
        last_rank = None
        while True:
            if self.leave_requested:
                self.log.log("leave", step=manager.current_step())
                self._status("left", manager.current_step())
                return EXIT_LEFT
            if manager.current_step() >= spec.steps:
                break
            t_start = time.time()
            self.healed = False
            manager.start_quorum()
            t_quorum = time.time()
            step = manager.current_step()
            if self.healed:
                self.stateful = step > 0
                self.log.log("healed", step=step, seconds=t_quorum - t_start, source=self.transport.last_source)
            if step >= spec.steps:
                break
            if step < min_step and manager.errored() is None:
                # Peers that held the state are gone: training from scratch here would silently
                # restart the job. Leave it to the supervisor (cold restart from disk).
                self.log.log("orphaned", step=step, min_step=min_step)
                self._status("orphaned", step)
                return EXIT_ORPHANED
            committed, world, rank, metrics, error = self._attempt(step, step_faults)
            t_end = time.time()
            if committed:
                self.stateful = True
                last_rank = rank
            self.log.log(
                "attempt",
                step=step,
                committed=committed,
                world=world,
                rank=rank,
                t_start=t_start,
                t_quorum=t_quorum,
                t_end=t_end,
                metrics=metrics if (committed and self._writes(rank)) else None,
                error=error,
                **({"lr_multiplier": self.policy.lr_multiplier(world)} if self.policy.mode != "fixed" else {}),
            )
            self._status("training", manager.current_step(), throttle_s=0.25)
            if committed and self._writes(rank):
                log_hook = getattr(self.task, "log_step", None)
                if callable(log_hook):
                    log_hook(step, metrics)
                self._maybe_checkpoint(manager.current_step())
        self._finish(last_rank)
        return EXIT_DONE

    def _attempt(self, step: int, step_faults: dict[int, Any]) -> tuple[bool, int, int, dict[str, float], str | None]:
        """Compute this replica's share of ``step``, all-reduce, vote; True if the step was committed."""
        import torch

        manager = self.manager
        if manager.errored() is not None:  # quorum / process group / heal failed: vote no, retry
            error = str(manager.errored())
            manager.should_commit()
            self.pg.abort()
            return False, 0, -1, {}, error
        rank = manager.participating_rank()
        world = manager.num_participants()
        assert rank is not None, "synchronous quorum: every member participates"
        start = start_position(self.policy, step, self.position)
        plan = plan_step(
            self.policy, step, start, rank, world, self.task.num_samples(), self.spec.seed, self.spec.shuffle
        )
        indices, micro = plan.global_indices, plan.micro_batches
        rows_for = getattr(self.task, "rows_for_step", None)
        if callable(rows_for) and self.policy.mode == "fixed":  # the task says which samples a step holds
            indices = list(rows_for(step))
            micro = micro_batches(shard(indices, rank, world), self.spec.micro_batch_size)

        def fire_faults() -> None:
            """Injected faults of this step: before the first collective of its preparation when it has one
            (online RL: mid-rollout, after sampling), else after the backward pass, before the all-reduce."""
            for at in sorted(s for s in step_faults if s <= step):  # a late joiner fires at its first step past N
                fault = step_faults.pop(at)
                if fault_lib.claim(self.run_dir, fault):
                    self._inject(fault, step)

        def reduce(tensor: Any) -> Any:
            fire_faults()
            return self._sum_over_participants(tensor)

        prepare = getattr(self.task, "prepare_step", None)
        if callable(prepare):  # e.g. online RL: sample this replica's share of the prompts, gather the step
            try:
                prepare(self.model, step, indices, [i for mb in micro for i in mb], reduce)
            except StepAborted as e:
                manager.should_commit()  # votes no: a peer failed while the step was being prepared
                self.pg.abort()
                return False, world, rank, {}, str(e)
        scale = 1.0 / max(1, self.task.loss_tokens(indices))

        self.optimizer.zero_grad(set_to_none=False)
        sums: dict[str, float] = {}
        for mb in micro:
            for key, value in self.task.forward_backward(self.model, mb, scale).items():
                v = float(value)
                sums[key] = max(sums.get(key, v), v) if key.endswith(MAX_SUFFIX) else sums.get(key, 0.0) + v
        fire_faults()

        self._allreduce_grads(sums)
        if manager.errored() is None:  # the norm is logged like a local run's; clipping only when asked
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.spec.max_grad_norm or math.inf)
            sums["grad_norm"] = float(norm)
        error = None if manager.errored() is None else str(manager.errored())
        committed = manager.should_commit()
        if committed:
            self._optimizer_step(plan.lr_multiplier)
            self.position = plan.next_position
        else:
            # Tear our side of the group down now: a peer still blocked in this collective (it may
            # only talk to the dead replica through us) then fails at once instead of at its timeout.
            self.pg.abort()
        self.optimizer.zero_grad(set_to_none=False)
        return committed, world, rank, sums, error

    def _sum_over_participants(self, tensor: Any) -> Any:
        """SUM all-reduce of a small tensor among this step's participants; raises StepAborted when the group failed
        (the step is then retried by whoever is left, so no half-gathered value is ever used)."""
        from torch.distributed import ReduceOp

        if self.manager.errored() is None:
            self.manager.allreduce(tensor, reduce_op=ReduceOp.SUM).wait()
        if self.manager.errored() is not None:
            raise StepAborted(str(self.manager.errored()))
        return tensor

    def _allreduce_grads(self, sums: dict[str, float]) -> None:
        """SUM all-reduce of all gradients (bucketed, flattened) plus the step's metrics in one pass (in place:
        sums, and maxima for the keys ending in ``MAX_SUFFIX``)."""
        import torch
        from torch.distributed import ReduceOp

        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        limit = max(1, int(self.spec.bucket_mb * 2**20))
        buckets: list[list[Any]] = [[]]
        size = 0
        for p in self.params:
            nbytes = p.grad.numel() * p.grad.element_size()
            if buckets[-1] and (size + nbytes > limit or p.grad.dtype != buckets[-1][0].grad.dtype):
                buckets.append([])
                size = 0
            buckets[-1].append(p)
            size += nbytes
        works = []
        for params in buckets:
            flat = torch.cat([p.grad.reshape(-1) for p in params]) if params else None
            if flat is not None:
                works.append((params, flat, self.manager.allreduce(flat, reduce_op=ReduceOp.SUM)))
        device = self.params[0].device if self.params else "cpu"
        metric_works = []
        for op, keys in (
            (ReduceOp.SUM, sorted(k for k in sums if not k.endswith(MAX_SUFFIX))),
            (ReduceOp.MAX, sorted(k for k in sums if k.endswith(MAX_SUFFIX))),
        ):
            if keys:
                flat = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
                metric_works.append((keys, flat, self.manager.allreduce(flat, reduce_op=op)))
        for params, flat, work in works:
            work.wait()
            offset = 0
            for p in params:
                n = p.grad.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n
        for keys, flat, work in metric_works:
            work.wait()
            sums.update(zip(keys, flat.tolist()))

    def _optimizer_step(self, lr_multiplier: float) -> None:
        self._wait_staged()
        if lr_multiplier != 1.0:  # per_replica policy: scale LR for this step only (never compounds)
            saved = [g["lr"] for g in self.optimizer.param_groups]
            for g in self.optimizer.param_groups:
                g["lr"] = g["lr"] * lr_multiplier
            self.optimizer.step()
            for g, lr in zip(self.optimizer.param_groups, saved):
                g["lr"] = lr
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def _inject(self, fault: Any, step: int) -> None:
        self.log.log(
            "fault", desc=fault.describe(), action=fault.action, target=self.slot, target_inc=self.inc, step=step
        )
        if fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        fault_lib.hang_forever()

    # -- checkpoints and completion -----------------------------------------------------------
    def _writes(self, rank: int | None) -> bool:
        """Whether this replica writes metrics, checkpoints and the result after a step it committed as ``rank``.

        Rank 0 of the job does. With several machines, slot 0 of every node does too (its state is the
        same all-reduced state), so each node's run directory is complete on its own: a node can restart
        from its own checkpoints and every node's ``tuneforge train`` ends with the result.
        """
        if rank is None:
            return False
        return rank == 0 or (self.res.multi_node and self.slot == 0)

    def _maybe_checkpoint(self, next_step: int) -> None:
        """Every ``checkpoint_every`` steps, snapshot and write the state in a background thread.

        The snapshot (copy to CPU) overlaps the next step's forward/backward, which only read the
        state; :meth:`_wait_staged` holds back the next optimizer step (or a heal) until it is done,
        so the checkpoint is consistent and this replica does not arrive late at the next quorum.
        """
        every = self.res.checkpoint_every
        if not every or next_step % every or next_step >= self.spec.steps:
            return
        if self._saver is not None and self._saver.is_alive():
            self.log.log("ckpt_skipped", step=next_step, reason="previous save still running")
            return
        self._staged.clear()
        manager_state = self.manager.state_dict()
        self._saver = threading.Thread(target=self._save, args=(manager_state, next_step), daemon=True)
        self._saver.start()

    def _wait_staged(self) -> None:
        self._staged.wait()

    def _save(self, manager_state: dict[str, Any], step: int) -> None:
        import torch
        from torch.utils._pytree import tree_map_only

        t0 = time.time()
        try:
            snapshot = tree_map_only(
                torch.Tensor,
                lambda t: t.detach().to("cpu", copy=True),
                {"user": self._state_dict(), "torchft": manager_state},
            )
        finally:
            self._staged.set()
        t1 = time.time()
        folder = self.run_dir / "ckpt"
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"step_{step:08d}.pt"
        with atomic_path(final, fsync=False) as tmp:
            torch.save(snapshot, tmp)
        for old in checkpoint_paths(self.run_dir)[: -self.res.keep_checkpoints]:
            old.unlink(missing_ok=True)
        self.log.log("ckpt_saved", step=step, path=str(final), stage_s=t1 - t0, write_s=time.time() - t1)

    def _finish(self, last_rank: int | None) -> None:
        import torch

        if self._saver is not None:
            self._saver.join()
        mode = self.res.final_state
        if mode == "all" or (mode == "rank0" and self._writes(last_rank)):
            folder = self.run_dir / "final"
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(folder / f"replica_{self.slot}.pt", fsync=False) as tmp:
                torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, tmp)
        if self._writes(last_rank):
            hook = getattr(self.task, "save_final", None)
            if callable(hook):
                hook(self.model, self.run_dir / "final")
        self.log.log("done", step=self.manager.current_step(), rank=last_rank)
        self._status("done", self.manager.current_step())

    def _status(self, phase: str, step: int, throttle_s: float = 0.0) -> None:
        """Publish phase/step; routine per-step updates are throttled (a file write costs ~0.5 ms)."""
        now = time.monotonic()
        key = (phase, self.stateful)
        if throttle_s and key == self._status_key and now - self._status_t < throttle_s:
            return
        self._status_key, self._status_t = key, now
        write_status(self.run_dir, self.slot, inc=self.inc, phase=phase, step=step, stateful=self.stateful)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tuneforge.distributed.replica")
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--slot", type=int, default=-1)
    ap.add_argument("--inc", type=int, default=0)
    ap.add_argument("--mode", choices=["resume", "join"], default="resume")
    ap.add_argument("--min-step", type=int, default=0)
    ap.add_argument("--start-barrier", type=int, default=0, help="wait for this many replicas before step 1")
    ap.add_argument("--spare", type=str, default="", help="hot spare id: pre-import and wait on stdin")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    t_main = time.time()
    args = _parse(argv)
    run_dir: Path = args.run_dir
    t_spawn = float(os.environ.get("TUNEFORGE_SPAWN_T", t_main))
    spec = JobSpec.load(run_dir / "job.json")

    import torch  # noqa: F401  (timed: the bulk of a cold start)
    import torchft  # noqa: F401

    from tuneforge.distributed.task import load_task

    task = load_task(spec.task, spec.task_config)
    t_imports = time.time()
    built = task.build(spec.seed)
    t_built = time.time()
    replica = Replica(spec, run_dir, task, built)
    boot = {"t_spawn": t_spawn, "t_main": t_main, "t_imports": t_imports, "t_built": t_built}

    if args.spare:
        write_status(run_dir, f"spare_{args.spare}", phase="spare_ready", step=0, stateful=False)
        line = sys.stdin.readline()
        if not line.strip():
            return EXIT_LEFT  # supervisor closed our stdin: not needed any more
        order = json.loads(line)
        (run_dir / "status" / f"replica_spare_{args.spare}.json").unlink(missing_ok=True)
        slot, inc, mode, min_step = order["slot"], order["inc"], order["mode"], order["min_step"]
        barrier = int(order.get("start_barrier", 0))
    else:
        slot, inc, mode, min_step, barrier = args.slot, args.inc, args.mode, args.min_step, args.start_barrier

    log = EventLog(run_dir / "events" / f"replica_{slot}_{inc}.jsonl", replica=slot, inc=inc, pid=os.getpid())
    log.log("boot", spare=bool(args.spare), **boot)
    if args.spare:
        log.log("activated")
    write_status(run_dir, slot, inc=inc, phase="connecting", step=0, stateful=False)

    signal.signal(signal.SIGTERM, lambda *_: setattr(replica, "leave_requested", True))
    signal.signal(signal.SIGUSR1, lambda *_: fault_lib.hang_forever())  # supervisor-injected hang
    replica.connect(slot, inc, log)
    if mode == "resume":
        replica.load_latest_checkpoint()
    code = replica.train(min_step, barrier)
    replica.manager.shutdown(wait=False)
    log.close()
    return code


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown of torchft's native threads
