"""Recovery benchmark: the same 3-replica job run three ways, with the same fault schedule.

1. ``no_faults``  — tuneforge, nobody dies (the wall-clock reference).
2. ``baseline``   — the standard approach: ``torchrun`` elastic agents (c10d rendezvous, tuned with
   ``last_call_timeout=5`` and ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``), every worker restarts after a
   failure and resumes from the last async disk checkpoint.
3. ``tuneforge``  — torchft replicas: survivors keep stepping, the failed replica is replaced (hot spare)
   and heals from a live peer.

Faults: SIGKILL of one replica's training process at fixed times after training started (default one
per minute). The job is the toy MLP with a per-sample sleep standing in for accelerator compute, so
the numbers measure coordination and recovery, not CPU speed. Both systems use the same exact-global-
batch assignment, so their final parameters agree too (reported).

    python benchmarks/recovery.py            # ~8 min: 600 steps, kills at 30 s and 90 s
    python benchmarks/recovery.py --quick    # ~2 min: 150 steps, one kill at 12 s
    python benchmarks/recovery.py --real     # the demo's SFT LoRA recipe on its base model, >= 10 min per system,
                                             # one SIGKILL per minute at seeded random times (--minutes, --seed)

``--real`` trains the real model (``tuneforge demo`` must have built its base under ``$TUNEFORGE_HOME``; the task
is ``tuneforge.training.elastic:make_task``, the same code a ``tuneforge train --replicas`` run uses) instead of
the stand-in, with the same three runs and the same JSON shape. Its length in steps comes from a short
fault-free probe run of the same job (``--minutes`` of training on 3 replicas, plus a 20 % margin so that the
last kill lands before the end; ``--steps`` overrides), it runs as ``tuneforge train --replicas`` does (the
recipe's seed and gradient clipping, the plan's own sample order; the torchrun workers clip alike), LoRA
dropout is off (each process draws its own dropout masks, so no run that loses a process could end on the
fault-free weights), and token caches and runs live in the work directory, not in ``$TUNEFORGE_HOME``.

The last line printed is one JSON object (see ``main``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPLICAS = 3
PROBE_STEPS = 40  # --real: the fault-free run that times a step


REAL_TASK: dict[str, Any] = {}  # --real: task, task_config, batch sizes of the demo recipe (see real_task)


def real_task(minutes: float, steps: int | None, work: Path) -> dict[str, Any]:
    """The demo's SFT LoRA recipe on the demo's base model, as an elastic task (data tokenized once, here).

    The recipe's paths are resolved against the current ``$TUNEFORGE_HOME`` (where ``tuneforge demo`` built the
    base); caches and runs then go to a home inside `work`, never the user's. LoRA dropout is set to 0: a dropout
    mask is drawn from each process's own random stream, which a replacement replica does not share, so with
    dropout no elastic run (nor a restarted one) could end on the fault-free run's weights. Without ``steps``, the
    run is as long as a short fault-free probe run of the same job says `minutes` of training take.
    """
    from tuneforge.config import load_recipe

    recipe_path = Path(__file__).resolve().parents[1] / "recipes" / "sft-lora.yaml"
    overrides = ["tracking.enabled=false", "adapter.dropout=0"]
    recipe = load_recipe(recipe_path, [*overrides, f"train.max_steps={PROBE_STEPS}"])  # against $TUNEFORGE_HOME
    if not Path(recipe.model.path).is_dir():
        raise SystemExit(f"--real needs the demo's base model at {recipe.model.path}: run `tuneforge demo` first")
    os.environ["TUNEFORGE_HOME"] = str(work / "home")  # token caches and plans: not the user's home
    if steps is None:
        REAL_TASK.update(elastic_task(recipe))
        step_s = probe_step_s(work / "probe", PROBE_STEPS)
        REAL_TASK.clear()
        steps = int(minutes * 60 / step_s * 1.2) + 1  # a margin: the last kill must land before the end
        print(f"probe: {step_s:.3f} s per step on {REPLICAS} replicas -> {steps} steps", file=sys.stderr)
    return elastic_task(load_recipe(recipe.to_dict(), [f"train.max_steps={steps}"]))


def elastic_task(recipe: Any) -> dict[str, Any]:
    """``REAL_TASK`` for a recipe: its data tokenized here (every replica and every restart then maps the cache)."""
    from tuneforge.planner import resolve
    from tuneforge.training.build import prepare

    prepared = prepare(recipe)
    res = resolve(recipe, prepared.num_steps)
    return {
        "task": "tuneforge.training.elastic:make_task",
        "task_config": {"recipe": recipe.to_dict(), "micro_batch_size": res.micro_batch_size, "threads": 1},
        "global_batch_size": recipe.train.global_batch_size,
        "micro_batch_size": res.micro_batch_size,
        "steps": prepared.num_steps,
        # as `tuneforge train --replicas` runs it (tuneforge.training.elastic.run_elastic)
        "seed": recipe.train.seed,
        "shuffle": False,  # the plan is already shuffled and mixed, by global index
        "max_grad_norm": recipe.train.grad_clip,
    }


def probe_step_s(run_dir: Path, steps: int, warmup: int = 5) -> float:
    """Seconds per step of the ``REPLICAS``-replica job, from a short fault-free run of it (the first `warmup`
    steps left out): the replicas' coordination per step counts, and so does whatever else this machine runs now."""
    from tuneforge.distributed.metrics import read_events

    run_tuneforge(run_dir, job_spec(steps, [], 0, 0), 900)
    ends: dict[int, float] = {}
    for e in read_events(run_dir):
        if e["kind"] == "attempt" and e.get("committed"):
            ends[e["step"]] = max(ends.get(e["step"], 0.0), e["t_end"])
    if len(ends) <= warmup + 1:
        raise RuntimeError(f"the probe run committed {len(ends)} steps; see {run_dir / 'logs'}")
    last = max(ends)
    return (ends[last] - ends[warmup - 1]) / (last - warmup + 1)


def job_spec(steps: int, faults: list[tuple[float, int]], checkpoint_every: int, hot_spares: int) -> Any:
    from tuneforge.distributed import JobSpec, ResilienceConfig

    plan = {"faults": [{"action": "kill", "replica": r, "time_s": t} for t, r in faults]} if faults else None
    task = REAL_TASK or {
        "task": "tuneforge.distributed.toy:make_task",
        "task_config": {"num_samples": 4096, "sample_time_s": 0.01},
        "global_batch_size": 48,
        "micro_batch_size": 8,
    }
    return JobSpec(
        task=task["task"],
        task_config=task["task_config"],
        steps=min(steps, task.get("steps", steps)),
        global_batch_size=task["global_batch_size"],
        micro_batch_size=task["micro_batch_size"],
        seed=task.get("seed", 0),
        shuffle=task.get("shuffle", True),
        max_grad_norm=task.get("max_grad_norm"),
        resilience=ResilienceConfig(
            min_replicas=2,
            max_replicas=REPLICAS,
            replicas=REPLICAS,
            hot_spares=hot_spares,
            checkpoint_every=checkpoint_every,
            timeout_s=30,
            fault_plan=plan,
        ),
    )


# -- tuneforge ------------------------------------------------------------------------------------
def run_tuneforge(run_dir: Path, spec: Any, timeout_s: float) -> Any:
    from tuneforge.distributed import Supervisor

    sup = Supervisor(spec, run_dir)
    try:
        return sup.run(timeout_s=timeout_s)
    finally:
        sup.shutdown()


# -- baseline: torchrun elastic + restart from disk -----------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(run_dir: Path, spec: Any, faults: list[tuple[float, int]], timeout_s: float) -> dict[str, Any]:
    """Three torchrun agents (one worker each) + the same kills, delivered to the worker processes."""
    from tuneforge.distributed.metrics import EventLog, analyze

    for sub in ("events", "status", "logs", "ckpt"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    spec.save(run_dir / "job.json")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    port = _free_port()
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1")
    log = EventLog(run_dir / "events" / "bench.jsonl", replica=None, inc=None)
    t_start = time.time()
    log.log("supervisor_start")
    agents: list[subprocess.Popen[bytes]] = []
    try:
        for agent in range(REPLICAS):
            cmd = [
                torchrun,
                f"--nnodes=1:{REPLICAS}",
                "--nproc-per-node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=bench",
                f"--rdzv-conf=last_call_timeout=5,join_timeout=120,is_host={'true' if agent == 0 else 'false'}",
                "--max-restarts=50",
                "--monitor-interval=0.1",
                __file__,
                "--torchrun-worker",
                str(run_dir),
            ]
            with open(run_dir / "logs" / f"agent_{agent}.log", "ab") as out:
                agents.append(
                    subprocess.Popen(
                        cmd,
                        env=dict(env, BENCH_AGENT=str(agent)),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            if agent == 0:
                time.sleep(0.5)  # let the store host bind first
        pending = sorted(faults)
        t_train: float | None = None
        deadline = time.monotonic() + timeout_s
        while any(a.poll() is None for a in agents):
            if time.monotonic() > deadline:
                raise RuntimeError("baseline did not finish in time")
            status = _worker_status(run_dir)
            if t_train is None and any(s.get("step", 0) >= 1 for s in status.values()):
                t_train = time.time()
            if pending and t_train is not None and time.time() >= t_train + pending[0][0]:
                offset, victim = pending.pop(0)
                st = status.get(victim)
                if st is None:
                    continue
                log.log("fault", desc=f"kill:{victim}@{offset:g}s", action="kill", target=victim, target_inc=st["inc"])
                try:
                    os.kill(st["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        codes = [a.returncode for a in agents]
        if any(codes):
            raise RuntimeError(f"torchrun agents exited with {codes}; see {run_dir / 'logs'}")
    finally:
        stop_baseline(agents, run_dir)
        log.log("supervisor_done")
    report = analyze(run_dir)
    report.wall_s = time.time() - t_start
    return {"report": report}


def stop_baseline(agents: list[subprocess.Popen[bytes]], run_dir: Path) -> None:
    """Stop every process the baseline started, by PID: the agents (each in its own session, with its process
    group) and their workers — torchrun starts each worker in a session of its own, which outlives its agent."""
    for a in agents:
        if a.poll() is None:
            try:
                os.killpg(a.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        a.wait()
    for status in _worker_status(run_dir).values():  # the newest worker of each agent wrote its PID here
        pid = int(status["pid"])
        try:  # only if that PID is still our worker (not a process that reused the number)
            ours = str(run_dir) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if ours:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _worker_status(run_dir: Path) -> dict[int, dict[str, Any]]:
    out = {}
    for path in (run_dir / "status").glob("worker_*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        out[int(data["agent"])] = data
    return out


def torchrun_worker(run_dir: Path) -> None:
    """A conventional DDP-style worker: plain gloo all-reduce, restart = reload the newest checkpoint."""
    t_main = time.time()
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.utils._pytree import tree_map_only

    from tuneforge.distributed.assignment import micro_batches, plan_step, shard
    from tuneforge.distributed.config import JobSpec
    from tuneforge.distributed.metrics import EventLog
    from tuneforge.distributed.task import load_task, load_task_state, task_state_dict

    spec = JobSpec.load(run_dir / "job.json")
    agent = int(os.environ["BENCH_AGENT"])
    inc = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    log = EventLog(run_dir / "events" / f"replica_{agent}_{inc}.jsonl", replica=agent, inc=inc, pid=os.getpid())

    def status(step: int) -> None:
        tmp = run_dir / "status" / f".worker_{agent}.tmp"
        tmp.write_text(json.dumps({"agent": agent, "inc": inc, "pid": os.getpid(), "step": step, "t": time.time()}))
        tmp.replace(run_dir / "status" / f"worker_{agent}.json")

    status(0)
    dist.init_process_group("gloo", timeout=timedelta(seconds=spec.resilience.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    task = load_task(spec.task, spec.task_config)
    t_imports = time.time()
    model, optimizer, scheduler = task.build(spec.seed)
    log.log("boot", t_spawn=t_main, t_main=t_main, t_imports=t_imports, t_built=time.time())
    log.log("manager_ready")
    step = 0
    ckpts = sorted((run_dir / "ckpt").glob("step_*.pt"))
    if ckpts:
        blob = torch.load(ckpts[-1], weights_only=False)
        load_task_state(task, model, optimizer, scheduler, blob["task"])
        step = int(blob["step"])
        log.log("ckpt_loaded", step=step, path=str(ckpts[-1]))
    else:  # as DDP does: every rank starts from rank 0's weights
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    policy = spec.batch_policy()
    rows_for = getattr(task, "rows_for_step", None)  # the same assignment rule as tuneforge's replicas
    prepare = getattr(task, "prepare_step", None)

    def reduce(t: Any) -> Any:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    params = [p for p in model.parameters() if p.requires_grad]  # LoRA: the frozen base has no gradients
    saver: threading.Thread | None = None
    every = spec.resilience.checkpoint_every
    while step < spec.steps:
        t0 = time.time()
        position = step * spec.global_batch_size
        plan = plan_step(policy, step, position, rank, world, task.num_samples(), spec.seed, spec.shuffle)
        indices, micro = plan.global_indices, plan.micro_batches
        if callable(rows_for) and policy.mode == "fixed":  # the task says which samples a step holds
            indices = list(rows_for(step))
            micro = micro_batches(shard(indices, rank, world), spec.micro_batch_size)
        if callable(prepare):
            prepare(model, step, indices, [i for mb in micro for i in mb], reduce)
        scale = 1.0 / max(1, task.loss_tokens(indices))
        optimizer.zero_grad(set_to_none=False)
        for mb in micro:
            task.forward_backward(model, mb, scale)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm or math.inf)  # as the replicas do
        optimizer.step()
        scheduler.step()
        step += 1
        t1 = time.time()
        log.log("attempt", step=step - 1, committed=True, world=world, rank=rank, t_start=t0, t_quorum=t0, t_end=t1)
        status(step)
        if rank == 0 and every and step % every == 0 and step < spec.steps and not (saver and saver.is_alive()):
            snap = tree_map_only(
                torch.Tensor, lambda t: t.detach().clone(), task_state_dict(task, model, optimizer, scheduler)
            )

            def save(snap: dict[str, Any] = snap, at: int = step) -> None:
                tmp = run_dir / "ckpt" / f".step_{at:08d}.tmp"
                torch.save({"task": snap, "step": at}, tmp)
                tmp.replace(run_dir / "ckpt" / f"step_{at:08d}.pt")

            saver = threading.Thread(target=save, daemon=True)
            saver.start()
    if saver is not None:
        saver.join()
    if rank == 0:
        (run_dir / "final").mkdir(exist_ok=True)
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, run_dir / "final" / "replica_0.pt")
    dist.destroy_process_group()


# -- reporting -------------------------------------------------------------------------------------
def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _summary(report: Any, with_survivor: bool) -> dict[str, Any]:
    out = {
        "downtime_s_per_failure": _mean([f.downtime_s for f in report.failures]),
        "steps_lost": report.steps_lost,
        "goodput": report.goodput,
        "wall_s": report.wall_s,
        "train_s": report.train_s,
        "failures": len(report.failures),
        "detection_s": _mean([f.detection_s for f in report.failures]),
    }
    if with_survivor:
        out["survivor_resume_s"] = _mean([f.survivor_resume_s for f in report.failures])
        out["replacement_s"] = _mean([f.replacement_s for f in report.failures])
        spares = [s.total_s for s in report.startups if s.spare and s.total_s is not None]
        out["replacement_startup_s"] = _mean(spares)  # activation -> first committed step
    return out


def _rel_diff(a_dir: Path, b_dir: Path) -> float | None:
    import torch

    a_files, b_files = sorted(a_dir.glob("replica_*.pt")), sorted(b_dir.glob("replica_*.pt"))
    if not (a_files and b_files):
        return None
    a, b = torch.load(a_files[0]), torch.load(b_files[0])
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in a)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="150 steps and one kill (smoke run)")
    ap.add_argument("--real", action="store_true", help="the demo's SFT LoRA recipe on its base model")
    ap.add_argument("--minutes", type=float, default=10.0, help="--real: minutes of faults, one kill per minute")
    ap.add_argument("--seed", type=int, default=0, help="--real: seed of the kill schedule")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--fault-times", help="comma-separated seconds after training start (default 30,90)")
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--hot-spares", type=int, default=1)
    ap.add_argument("--work-dir", type=Path)
    ap.add_argument("--torchrun-worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.torchrun_worker:
        torchrun_worker(args.torchrun_worker)
        return 0

    # SIGTERM runs the same cleanup as Ctrl-C: every replica, agent and worker started here is stopped by PID
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="tuneforge-recovery-"))
    work.mkdir(parents=True, exist_ok=True)
    steps = args.steps or (150 if args.quick else 600)
    times = [float(t) for t in (args.fault_times or ("12" if args.quick else "30,90")).split(",")]
    faults = [(t, 1 + i % (REPLICAS - 1)) for i, t in enumerate(times)]  # never the same slot twice in a row
    if args.real:
        import random

        rng = random.Random(args.seed)  # one kill in each minute, at a seeded random second, of a random replica
        faults, last = [], -1
        for minute in range(int(args.minutes)):
            slot = rng.choice([r for r in range(REPLICAS) if r != last])
            faults.append((60.0 * minute + rng.uniform(20.0, 50.0), slot))
            last = slot
        REAL_TASK.update(real_task(args.minutes, args.steps, work))
        steps = REAL_TASK["steps"]
    else:
        os.environ["TUNEFORGE_HOME"] = str(work / "home")  # the stand-in writes nothing to the user's home either
    kills = ", ".join(f"{t:.0f}s:{r}" for t, r in faults)
    print(f"work dir: {work}; {steps} steps; kills (seconds after training start: replica) {kills}", file=sys.stderr)
    timeout_s = max(1200.0, 3 * 60.0 * (args.minutes if args.real else 5))

    no_faults = run_tuneforge(
        work / "no_faults", job_spec(steps, [], args.checkpoint_every, args.hot_spares), timeout_s
    )
    print(f"no faults: wall {no_faults.wall_s:.1f}s train {no_faults.train_s:.1f}s", file=sys.stderr)
    baseline = run_torchrun(work / "baseline", job_spec(steps, [], args.checkpoint_every, 0), faults, timeout_s)
    b = _summary(baseline["report"], with_survivor=False)
    print(f"baseline: {json.dumps(b)}", file=sys.stderr)
    tuneforge = run_tuneforge(
        work / "tuneforge", job_spec(steps, faults, args.checkpoint_every, args.hot_spares), timeout_s
    )
    t = _summary(tuneforge, with_survivor=True)
    print(f"tuneforge: {json.dumps(t)}", file=sys.stderr)

    reduction = None
    if b["downtime_s_per_failure"] and t["downtime_s_per_failure"] is not None:
        reduction = 1.0 - t["downtime_s_per_failure"] / b["downtime_s_per_failure"]
    result = {
        "no_faults": {"wall_s": no_faults.wall_s, "train_s": no_faults.train_s, "goodput": no_faults.goodput},
        "baseline": b,
        "tuneforge": t,
        "downtime_reduction": reduction,
        "final_params_rel_diff": {
            "tuneforge_vs_no_faults": _rel_diff(work / "tuneforge" / "final", work / "no_faults" / "final"),
            "baseline_vs_no_faults": _rel_diff(work / "baseline" / "final", work / "no_faults" / "final"),
        },
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
