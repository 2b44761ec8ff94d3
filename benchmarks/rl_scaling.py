"""GRPO on 1, 2 and 3 elastic replicas (processes) on one machine: steps per second and exactness.

The same recipe — a tiny Llama, 12 prompts per step, 8 completions each, up to 24 new tokens, a ``string_check``
grader, beta 0.05 (a reference forward pass every step) — runs in one process and on 2 and 3 torchft replicas
that each sample their share of the step's groups and train on it. Every configuration must end with the
single-process weights (the step's rollout is gathered, so advantages and the loss divisor are the whole step's).

On a 2-core machine the replicas compete for the same cores, so more replicas are not faster here; the point is
exactness and the shape of the curve (on a GPU host, run one replica per GPU). Steps per second is the inverse of
the median step time after ``--warmup`` steps (start-up, model loading and the final save are not steps).

    python benchmarks/rl_scaling.py                 # ~5 min on 2 idle cores
    python benchmarks/rl_scaling.py --steps 12 --replicas 1 2

Last line: ``{"steps_per_s": {"1": …, "2": …, "3": …}, "max_rel_weight_diff": …}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

GRADER = {
    "type": "string_check",
    "name": "mentions",
    "input": "{{sample.output_text}}",
    "reference": "{{item.keyword}}",
    "operation": "like",
}


def make_inputs(work: Path) -> tuple[Path, Path]:
    """A tiny Llama with a ChatML template and 240 prompts ``reverse: w1 w2 w3`` that the grader checks for 'apple'."""
    import random

    from tuneforge.models.tiny import build_tiny

    rng = random.Random(0)
    words = ["apple", "banana", "cherry", "delta", "echo", "fox", "golf", "hotel", "india", "juliet"]
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    model = build_tiny(work / "model", corpus, vocab_size=512, seed=0)
    data = work / "prompts.jsonl"
    with data.open("w") as f:
        for _ in range(240):
            prompt = "reverse: " + " ".join(rng.choice(words) for _ in range(3))
            f.write(json.dumps({"messages": [{"role": "user", "content": prompt}], "keyword": "apple"}) + "\n")
    return model, data


def recipe(model: Path, data: Path, out: Path, steps: int, threads: int) -> dict[str, Any]:
    return {
        "name": "rl-scaling",
        "method": "grpo",
        "model": {"path": str(model)},
        "data": {"sources": [{"path": str(data)}], "max_length": 64, "val_fraction": 0},
        "adapter": {"kind": "full"},
        "grpo": {"graders": GRADER, "group_size": 8, "beta": 0.05, "loss_type": "dapo"},
        "generation": {"max_new_tokens": 24, "temperature": 1.0},
        "train": {
            "max_steps": steps,
            "global_batch_size": 12,
            "micro_batch_size": 2,
            "lr": 1e-3,
            "schedule": "constant",
            "warmup_steps": 0,
            "precision": "fp32",
            "num_threads": threads,
            "eval_every": 10_000,
            "log_every": 1,
            "device": "cpu",
        },
        "tracking": {"enabled": False},
        "output": {"dir": str(out)},
        "resilience": {"timeout_s": 60, "hang_timeout_s": 120, "checkpoint_every": 0},
    }


def weights(result: Any) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(result.output_dir / "model.safetensors"))


def rel_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in a)
    return (num / sum(float(a[k].norm() ** 2) for k in a)) ** 0.5


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument(
        "--threads",
        type=int,
        help="threads per replica (default: the cores shared out, at least 1); on a machine busy with other work "
        "use 1 — threads that wait for a descheduled sibling spin, and a 2-thread process can run many times slower",
    )
    a = p.parse_args(argv)
    if a.steps <= a.warmup + 2:
        p.error("need --steps > --warmup + 2")

    import tuneforge

    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="tuneforge-rl-scaling-") as tmp:
        work = Path(tmp)
        os.environ["TUNEFORGE_HOME"] = str(work / "home")
        model, data = make_inputs(work)
        rates: dict[str, float] = {}
        finals: dict[int, dict[str, Any]] = {}
        for n in a.replicas:
            threads = a.threads or max(1, cores // n)
            r = recipe(model, data, work / f"run-{n}", a.steps, threads)
            result = tuneforge.train(r, progress=False) if n == 1 else tuneforge.train(r, replicas=f"{n}:{n}")
            step_s = statistics.median(h["step_s"] for h in result.history[a.warmup :])
            rates[str(n)] = round(1.0 / step_s, 3)
            finals[n] = weights(result)
            print(
                f"{n} replica(s), {threads} thread(s) each: {rates[str(n)]:.3f} steps/s "
                f"(median step {step_s * 1e3:.0f} ms), final reward {result.history[-1]['reward']:.3f}",
                flush=True,
            )
        base = finals[min(finals)]
        worst = max((rel_diff(base, w) for w in finals.values()), default=0.0)
    print(json.dumps({"steps_per_s": rates, "max_rel_weight_diff": worst}))


if __name__ == "__main__":
    main()
