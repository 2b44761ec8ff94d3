"""Command line for elastic runs without a recipe (the tuneforge CLI maps its recipe onto the same API).

    python -m tuneforge.distributed train --task tuneforge.distributed.toy:make_task --steps 200 \\
        --global-batch-size 32 --micro-batch-size 8 --replicas 2:4 [--fault-plan kill:1@50] [--name RUN]
    python -m tuneforge.distributed scale RUN 3
    python -m tuneforge.distributed report RUN
    python -m tuneforge.distributed lighthouse --bind 0.0.0.0:29510 --min-replicas 2   # multi-node runs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tuneforge.distributed.config import JobSpec, ResilienceConfig, parse_replicas
from tuneforge.distributed.lighthouse import add_serve_arguments, serve_from_args
from tuneforge.errors import RecipeError, TuneforgeError


def _json_arg(text: str | None, what: str) -> dict[str, Any]:
    if not text:
        return {}
    source = Path(text[1:]).read_text() if text.startswith("@") else text
    try:
        if source.lstrip().startswith("{"):
            data = json.loads(source)
        else:
            import yaml

            data = yaml.safe_load(source)
    except Exception as exc:
        raise RecipeError(f"{what}: cannot parse ({exc})") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{what}: expected a mapping")
    return data


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tuneforge.distributed")
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train a task with elastic, fault-tolerant replicas")
    tr.add_argument("--task", required=True, help="module:factory of a ReplicaTask")
    tr.add_argument("--task-config", help="JSON/YAML text or @file passed to the factory")
    tr.add_argument("--steps", type=int, required=True)
    tr.add_argument("--global-batch-size", type=int, required=True)
    tr.add_argument("--micro-batch-size", type=int, required=True)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--replicas", default="1:1", help="MIN:MAX")
    tr.add_argument("--resilience", help="the resilience: section as JSON/YAML text or @file")
    tr.add_argument("--fault-plan", help="see tuneforge.distributed.faults")
    tr.add_argument("--hot-spares", type=int)
    tr.add_argument("--run-dir", type=Path)
    tr.add_argument("--name")
    tr.add_argument("--timeout-s", type=float)
    sc = sub.add_parser("scale", help="change the replica count of a running job")
    sc.add_argument("run")
    sc.add_argument("replicas", type=int)
    rp = sub.add_parser("report", help="recovery events and goodput of a run, as JSON")
    rp.add_argument("run")
    lh = sub.add_parser("lighthouse", help="run a torchft lighthouse for a job that spans several machines")
    add_serve_arguments(lh)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from tuneforge.distributed import supervisor
    from tuneforge.distributed.metrics import analyze

    try:
        if args.cmd == "lighthouse":
            return serve_from_args(args)
        if args.cmd == "scale":
            target = supervisor.scale(args.run, args.replicas)
            print(f"asked {args.run} to run {target} replica(s)")
            return 0
        if args.cmd == "report":
            print(json.dumps(analyze(supervisor.resolve_run_dir(args.run)).to_dict(), indent=1))
            return 0
        lo, hi = parse_replicas(args.replicas)
        res = _json_arg(args.resilience, "--resilience")
        res.update(min_replicas=lo, max_replicas=hi)
        if args.fault_plan:
            res["fault_plan"] = args.fault_plan
        if args.hot_spares is not None:
            res["hot_spares"] = args.hot_spares
        spec = JobSpec(
            task=args.task,
            task_config=_json_arg(args.task_config, "--task-config"),
            steps=args.steps,
            global_batch_size=args.global_batch_size,
            micro_batch_size=args.micro_batch_size,
            seed=args.seed,
            resilience=ResilienceConfig.from_dict(res),
        )
        run_dir = args.run_dir or supervisor.new_run_dir(args.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"run directory: {run_dir}", file=sys.stderr)
        report = supervisor.run(spec, run_dir, timeout_s=args.timeout_s)
        print(json.dumps(report.to_dict()))
        return 0
    except TuneforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
