"""Data at scale: ``prepare()`` of an SFT LoRA recipe on N generated chats, cold and warm, against ``datasets``.

What is measured, in one run:

* **cold** — ``tuneforge.training.build.prepare(recipe)`` with an empty ``$TUNEFORGE_HOME``: read, validate
  every record, dedup, split, render the chat template, tokenize with assistant masks, write the token cache,
  plan the steps.
* **warm** — the same call again with the cache in place (what a restart or a replacement replica does).
* **datasets** — the anchor: the same cold work done the usual Hugging Face way, ``load_dataset("json")`` then
  ``map(num_proc=cores)`` with the very same template, tokenizer and assistant-mask function
  (``tuneforge.data.templates.encode_chats``), into its own fresh Arrow cache. It does no validation, dedup or
  split, so it does less work than the cold prepare.

Each measurement runs in a fresh subprocess; peak memory is the peak of the memory of the subprocess and all
its children (tokenizer workers, ``num_proc`` workers) summed — PSS, so pages a forked worker shares with its
parent count once — sampled every 100 ms with psutil; the imports (torch, transformers) are included on both
sides. Wall times are taken inside the subprocess around the call, after a first tokenizer load (transformers
imports itself lazily, ~3 s, once per process whatever the data); ``*_process_s`` is the whole subprocess.
The data: support-ticket chats from the demo's generator (``tuneforge.demo.tickets``), a system prompt on half,
a second user/assistant turn on a third, each made unique by a reference number; the tokenizer is a 1k BPE
trained on a sample of them (ChatML), as the demo's base model has.

    python benchmarks/data_scale.py                      # 1,000,000 records (long on 2 cores)
    python benchmarks/data_scale.py --records 200000

The last line printed is one JSON object: ``{"records", "cold_s", "cold_peak_rss_mb", "warm_s",
"datasets_cold_s", "datasets_peak_rss_mb", "cold_vs_datasets", "warm_vs_cold", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MAX_LENGTH = 256
SYSTEM = "You are the support desk's triage assistant. Answer with the ticket's category only."


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# -- inputs ---------------------------------------------------------------------------------------------
def write_chats(path: Path, n: int, seed: int = 0) -> None:
    """``n`` unique chat records, written in chunks (the generator never holds the whole set)."""
    from tuneforge.demo.tickets import ticket_examples

    rng = random.Random(seed)
    chunk = 10_000
    with path.open("w", encoding="utf-8") as f:
        for start in range(0, n, chunk):
            for i, rec in enumerate(ticket_examples(seed + start, min(chunk, n - start)), start):
                user, answer = rec["messages"][0]["content"], rec["messages"][1]["content"]
                messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
                messages += [
                    {"role": "user", "content": f"{user} (ref {i})"},
                    {"role": "assistant", "content": answer},
                ]
                if rng.random() < 1 / 3:
                    messages += [
                        {"role": "user", "content": "Are you sure? Please check again."},
                        {"role": "assistant", "content": answer, **({"weight": 0} if rng.random() < 0.5 else {})},
                    ]
                f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def build_inputs(work: Path, n: int) -> tuple[Path, Path]:
    from tuneforge.demo.tickets import ticket_examples
    from tuneforge.models.tiny import TinySpec, build_tiny

    data = work / "chats.jsonl"
    write_chats(data, n)
    texts = [m["content"] for r in ticket_examples(0, 3000) for m in r["messages"]] + [SYSTEM]
    spec = TinySpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=176)
    model = build_tiny(work / "base", texts, vocab_size=1024, spec=spec)
    return data, model


def recipe(model: Path, data: Path, work: Path) -> dict[str, Any]:
    return {
        "name": "data-scale",
        "method": "sft",
        "model": {"path": str(model)},
        "data": {"sources": [{"path": str(data)}], "max_length": MAX_LENGTH, "val_fraction": 0.01},
        "adapter": {"kind": "lora"},
        "train": {"epochs": 1, "global_batch_size": 32},
        "tracking": {"enabled": False},
        "output": {"dir": str(work / "out")},
    }


# -- children (one per measurement) ---------------------------------------------------------------------
def child_prepare(spec: dict[str, Any]) -> dict[str, Any]:
    import resource

    from tuneforge.config import load_recipe
    from tuneforge.models.loading import load_tokenizer
    from tuneforge.training import sft_task
    from tuneforge.training.build import prepare

    r = load_recipe(spec)
    # transformers imports most of itself lazily on the first tokenizer load (~3 s here); a training process pays
    # that once whatever the data, so it is paid here, before the clock starts (the same for the anchor).
    load_tokenizer(r.model.path)
    t0 = time.perf_counter()
    prepared = prepare(r)
    wall = time.perf_counter() - t0
    assert isinstance(prepared, sft_task.SFTPrepared)
    info = next(iter(prepared.data_info.values()))
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "wall_s": wall,
        "cache_hit": bool(info.get("cache_hit")),
        "steps": prepared.plan.num_steps,
        "main_max_rss_mb": self_mb,
        "largest_worker_max_rss_mb": workers_mb,
        **info,
    }


def child_datasets(model: str, data: str, cache: str, num_proc: int) -> dict[str, Any]:
    import datasets

    from tuneforge.data.templates import encode_chats
    from tuneforge.models.loading import load_tokenizer

    datasets.disable_progress_bars()
    tok = load_tokenizer(model)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = encode_chats(tok, batch["messages"], tok.chat_template, "assistant")
        return {"input_ids": [ids[:MAX_LENGTH] for ids, _ in encoded], "mask": [m[:MAX_LENGTH] for _, m in encoded]}

    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=data, split="train", cache_dir=cache)
    ds = ds.map(encode, batched=True, batch_size=1000, num_proc=num_proc, remove_columns=ds.column_names)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "rows": len(ds)}


def _tree_memory(proc: Any) -> int:
    """Bytes resident in the process and its children: summed PSS, so pages a fork shares count once (RSS if no PSS)."""
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except psutil.Error:
            pass
    return total


def run_child(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; returns its JSON plus the peak RSS of its process tree."""
    import psutil

    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    ps = psutil.Process(proc.pid)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                peak[0] = max(peak[0], _tree_memory(ps))
            except psutil.Error:
                return
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    finally:
        done.set()
        sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"child {args[:2]} failed ({proc.returncode}):\n{err[-4000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = peak[0] / 2**20
    result["process_s"] = time.perf_counter() - started
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--workdir", default=None, help="keep inputs and caches here (default: a temporary directory)")
    ap.add_argument("--skip-datasets", action="store_true", help="leave out the datasets anchor")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        result = child_prepare(json.loads(rest[0])) if kind == "prepare" else child_datasets(*rest[:3], int(rest[3]))
        print(json.dumps(result, default=str))
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="tuneforge-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data, model = build_inputs(work, args.records)
    print(
        f"generated {args.records} records ({data.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s"
    )
    env = dict(os.environ, TUNEFORGE_HOME=str(work / "home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    spec = json.dumps(recipe(model, data, work))

    cold = run_child(["--child", "prepare", spec], env)
    print("cold:", json.dumps(cold))
    warm = run_child(["--child", "prepare", spec], env)
    print("warm:", json.dumps(warm))
    if not warm["cache_hit"]:
        raise SystemExit("the warm prepare missed the token cache")
    anchor: dict[str, Any] = {"wall_s": None, "peak_rss_mb": None}
    if not args.skip_datasets:
        anchor = run_child(["--child", "datasets", str(model), str(data), str(work / "hf-cache"), str(cores())], env)
        print("datasets:", json.dumps(anchor))

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a and b else None

    print(
        json.dumps(
            {
                "records": args.records,
                "cold_s": round(cold["wall_s"], 2),
                "cold_peak_rss_mb": round(cold["peak_rss_mb"]),
                "warm_s": round(warm["wall_s"], 3),
                "warm_peak_rss_mb": round(warm["peak_rss_mb"]),
                "warm_process_s": round(warm["process_s"], 2),
                "datasets_cold_s": anchor["wall_s"] and round(anchor["wall_s"], 2),
                "datasets_peak_rss_mb": anchor["peak_rss_mb"] and round(anchor["peak_rss_mb"]),
                "cold_vs_datasets": ratio(anchor["wall_s"], cold["wall_s"]),
                "warm_vs_cold": ratio(cold["wall_s"], warm["wall_s"]),
                "cores": cores(),
            }
        )
    )


if __name__ == "__main__":
    main()
