"""How well does ``tuneforge plan`` forecast a run? Forecast vs measured peak memory and step time over a grid.

    python benchmarks/planner_accuracy.py            # 17 configurations, 3 model sizes (~35 min on 2 busy cores)
    python benchmarks/planner_accuracy.py --only qlora   # the 3 QLoRA rows (4-bit NF4 base, LoRA on top)
    python benchmarks/planner_accuracy.py --quick    # 4 configurations, the smallest model (~2 min)

The grid spans model sizes (3.3 M, 18 M and 53 M parameters, Llama-architecture, built here), methods (sft, dpo,
grpo), adapters (full, LoRA, QLoRA), gradient checkpointing on/off and sequence lengths. Every configuration runs in a
fresh interpreter (nothing another configuration allocated is in its numbers):

* **forecast** — :func:`tuneforge.planning.forecast.make_forecast` from the model's config and the prepared data,
  before any weight loads. The step time uses a calibration (:func:`tuneforge.planning.calibrate.calibrate`: FLOP
  rate, fixed cost per pass, optimizer cost per parameter) of the same model and adapter family on a configuration
  that is not in the grid (sft on raw text, 128 tokens, 4 sequences a step, no checkpointing) — so each row's time
  is a prediction across method, checkpointing, length and batch split, not a replay. The calibration runs right
  before its row, in its own interpreter and its own cache: on a machine shared with other work the load drifts
  over the half hour the grid takes, and a calibration from the start would hold every later row against another
  machine.
* **measured step time** — the median of 5 optimizer steps after a warm-up step, through the real training loop,
  single-threaded and timed by the process's CPU time (``PLANNER_CLOCK=wall`` for the wall clock on a quiet
  machine): the calibration and every row use the same clock.
* **measured peak memory** — the peak of live CPU tensor bytes in PyTorch's profiler allocation log (every
  allocation and free the CPU allocator served, in order) over 2 steps from an empty process — the CPU analogue of
  ``torch.cuda.max_memory_allocated`` and exactly what the memory model counts: weights, gradients, optimizer
  states, autograd's saved activations and the backward pass's temporaries. It is honest in the sense that nothing
  is sampled (a spike between samples cannot be missed) and nothing is estimated. The process's peak RSS
  (kernel ``VmHWM``) is reported too (``measured_rss_mb``): it is larger, by glibc's retained free blocks, which is
  why ``train`` compares ``tensors × 1.5`` (``ALLOCATOR_OVERHEAD``) against the free memory on a CPU.

The last line is one JSON object: configs, worst relative errors ((forecast − measured) / measured) and every row.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = [
    "apple",
    "banana",
    "cherry",
    "delta",
    "echo",
    "fox",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mango",
    "nova",
    "oscar",
    "papa",
]
MODELS = {  # hidden, layers, intermediate
    "S": (256, 4, 704),
    "M": (512, 6, 1408),
    "L": (768, 8, 2048),
}
GRID = [
    # model, method, adapter, grad-ckpt, max_length, micro, global batch
    ("S", "sft", "full", False, 256, 4, 8),
    ("S", "sft", "lora", False, 256, 4, 8),
    ("S", "sft", "full", True, 256, 4, 8),
    ("S", "sft", "full", False, 512, 2, 4),
    ("S", "dpo", "lora", False, 256, 2, 4),
    ("S", "grpo", "lora", False, 96, 2, 2),
    ("M", "sft", "full", False, 256, 2, 4),
    ("M", "sft", "lora", True, 512, 2, 2),
    ("M", "dpo", "full", False, 192, 2, 2),
    ("M", "grpo", "full", False, 96, 2, 2),
    ("L", "sft", "lora", False, 256, 1, 1),
    ("L", "sft", "full", True, 256, 1, 1),
    ("L", "dpo", "lora", True, 128, 1, 1),
    ("L", "sft", "full", False, 192, 2, 2),
    ("S", "sft", "qlora", False, 256, 4, 8),
    ("M", "sft", "qlora", True, 512, 2, 2),
    ("L", "sft", "qlora", False, 256, 1, 1),
]
QUICK = [g for g in GRID if g[0] == "S"][:4]
# Step time is the single thread's CPU time per step: on a shared machine the wall clock measures the neighbours
# (the development box runs several engineers' tests at once). Set PLANNER_CLOCK=wall on a quiet machine.
CLOCK = os.environ.get("PLANNER_CLOCK", "cpu")


def texts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) + str(rng.randint(0, 999)) for _ in range(words)) for _ in range(n)]


def build_assets(root: Path) -> None:
    """Models of each size (tokenizer trained on the data's words) and one data file per method."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tuneforge.models.tiny import TinySpec, build_tiny

    corpus = texts(400, 60, 0)
    for name, (h, layers, inter) in MODELS.items():
        if not (root / name / "config.json").exists():
            spec = TinySpec(h, layers, max(h // 64, 2), max(h // 128, 1), inter, 2048)
            build_tiny(root / name, corpus, vocab_size=2048, spec=spec)

    def write(name: str, rows: list[dict]) -> None:
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("text.jsonl", [{"text": t * 3} for t in corpus])
    long = texts(300, 30, 1)
    write(
        "pairs.jsonl",
        [{"prompt": p[:40], "chosen": long[i], "rejected": long[-i - 1]} for i, p in enumerate(texts(300, 10, 2))],
    )
    write("prompts.jsonl", [{"messages": [{"role": "user", "content": p}], "label": p[:5]} for p in texts(200, 12, 3)])


def recipe_for(root: Path, cfg: tuple) -> dict:
    model, method, adapter, ckpt, length, micro, batch = cfg
    data = {"sft": "text.jsonl", "dpo": "pairs.jsonl", "grpo": "prompts.jsonl"}[method]
    raw = {
        "name": "bench",
        "method": "cpt" if method == "sft" else method,  # raw text: every token supervised
        "model": {"path": str(root / model)},
        "data": {"sources": [{"path": str(root / data)}], "max_length": length, "val_fraction": 0.05},
        "adapter": {"kind": adapter, "r": 16, "alpha": 32},
        "train": {
            "max_steps": 8,
            "global_batch_size": batch,
            "micro_batch_size": micro,
            "lr": 1e-4,
            "gradient_checkpointing": ckpt,
            "num_threads": 1,  # one thread: its CPU time is its step time, whatever else the machine runs
            "precision": "fp32",
        },
        "tracking": {"enabled": False},
    }
    if method == "dpo":
        raw["data"]["on_overlong"] = "truncate"
    if method == "grpo":
        raw["grpo"] = {
            "graders": {
                "type": "string_check",
                "name": "s",
                "operation": "eq",
                "input": "{{sample.output_text}}",
                "reference": "{{item.label}}",
            },
            "group_size": 4,
        }
        raw["generation"] = {"max_new_tokens": 24, "batch_size": 16}
        raw["data"]["on_overlong"] = "truncate"
    return raw


def run_one(root: Path, cfg: tuple, calibrate_only: bool) -> dict:
    """In a fresh interpreter: forecast, then time 6 steps, then profile 2 steps' memory."""
    from tuneforge.config import load_recipe
    from tuneforge.planning.calibrate import calibrate, run_steps
    from tuneforge.planning.forecast import make_forecast
    from tuneforge.planning.hardware import local_hardware
    from tuneforge.planning.resolve import resolve
    from tuneforge.planning.workload import policy_shape
    from tuneforge.training.build import prepare

    recipe = load_recipe(recipe_for(root, cfg))
    prepared = prepare(recipe)
    res = resolve(recipe, prepared.num_steps, prepared=prepared)
    if calibrate_only:
        m = calibrate(recipe, res, prepared, steps=5, clock=CLOCK)
        return {
            "calibrated_step_s": m.median_step_s,
            "pass_s": m.pass_s,
            "optimizer_s": m.optimizer_s,
            "decode_step_s": m.decode_step_s,
        }
    f = make_forecast(res.apply(recipe), res, local_hardware(), prepared)
    timed = run_steps(recipe, res, prepared, steps=6, clock=CLOCK)
    profiled = run_steps(recipe, res, prepared, steps=2, profile_memory=True)
    model, method, adapter, ckpt, length, micro, batch = cfg
    return {
        "model": model,
        "params_m": round(policy_shape(recipe).params / 1e6, 1),
        "method": method,
        "adapter": adapter,
        "grad_ckpt": ckpt,
        "max_length": length,
        "micro": micro,
        "global_batch": batch,
        "forecast_mb": f.memory["peak_mb"],
        "measured_mb": round(profiled.peak_bytes / 2**20, 1),
        "forecast_rss_mb": f.process_peak_mb,
        "measured_rss_mb": round(timed.peak_bytes / 2**20, 1),
        "forecast_step_s": round(f.step_s, 4),
        "measured_step_s": round(timed.median_step_s, 4),
        "time_source": f.time_source,
    }


def child(root: Path, cfg: tuple, calibrate_only: bool, home: Path) -> dict:
    env = dict(os.environ, TUNEFORGE_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    args = [sys.executable, __file__, "--one", json.dumps([str(root), list(cfg), calibrate_only])]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise RuntimeError(f"{cfg}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--only", default=None, help="comma-separated methods or adapters: run only their rows (sft,dpo,grpo,qlora)"
    )
    parser.add_argument("--root", default=None, help="where models and data are built (default: a temp dir)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        root, cfg, calibrate_only = json.loads(args.one)
        print(json.dumps(run_one(Path(root), tuple(cfg), calibrate_only)))
        return
    grid = QUICK if args.quick else GRID
    if args.only:
        grid = [g for g in grid if g[1] in args.only.split(",") or g[2] in args.only.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp)
        root.mkdir(parents=True, exist_ok=True)
        home = root / "home"
        build_assets(root)
        t0 = time.perf_counter()
        rows = []
        for i, cfg in enumerate(grid):
            family = cfg[2] if cfg[2] in ("full", "qlora") else "lora"  # calibrations are kept per family
            calibration = (cfg[0], "sft", family, False, 128, 4, 4)  # not in the grid
            cal = child(root, calibration, True, home / f"row-{i}")
            print(f"calibrated {calibration}: {cal}", file=sys.stderr)
            row = child(root, cfg, False, home / f"row-{i}")
            row["memory_error"] = round((row["forecast_mb"] - row["measured_mb"]) / row["measured_mb"], 4)
            row["time_error"] = round((row["forecast_step_s"] - row["measured_step_s"]) / row["measured_step_s"], 4)
            row["rss_error"] = round((row["forecast_rss_mb"] - row["measured_rss_mb"]) / row["measured_rss_mb"], 4)
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
    summary = {
        "configs": len(rows),
        "worst_memory_error": max((abs(r["memory_error"]) for r in rows), default=0.0),
        "worst_time_error": max((abs(r["time_error"]) for r in rows), default=0.0),
        "worst_rss_error": max((abs(r["rss_error"]) for r in rows), default=0.0),
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
