"""Data at scale: ``prepare()`` of an SFT LoRA recipe on N generated chats, cold and warm, against ``datasets``.

What is measured, in one run:

* **cold** — ``tuneforge.training.build.prepare(recipe)`` with an empty ``$TUNEFORGE_HOME``: read, validate
  every record, dedup, split, render the chat template, tokenize with assistant masks, write the token cache,
  plan the steps.
* **warm** — the same call again with the cache in place (what a restart or a replacement replica does).
* **datasets** — the anchor: the same cold work done the usual Hugging Face way, ``load_dataset("json")`` then
  ``map(num_proc=cores)`` with the very same template, tokenizer and assistant-mask function
  (``tuneforge.data.templates.encode_chats``: the same renders and tokenizer calls as the cold prepare's workers,
  so the comparison is of the pipelines around it), into its own fresh Arrow cache. It does no validation, dedup
  or split, so it does less work than the cold prepare.

Each measurement runs in a fresh subprocess; peak memory is the peak of the memory of the subprocess and all
its children (tokenizer workers, ``num_proc`` workers) summed — PSS, so pages a forked worker shares with its
parent count once — sampled every 100 ms with psutil; the imports (torch, transformers) are included on both
sides. Wall times are taken inside the subprocess around the call, after a first tokenizer load (transformers
imports itself lazily, ~3 s, once per process whatever the data); ``*_process_s`` is the whole subprocess and
``*_cpu_s`` the CPU time of the subprocess and every descendant (imports included) — on a machine shared with
other work, the steadier of the two comparisons (Linux's autogroup scheduling gives a session a share of the CPUs
however many processes it runs, so there a parallel pipeline's wall time says less than its CPU time).

``--repeats N`` runs N rounds of cold, warm, ``datasets`` — interleaved, so each ratio compares two runs under the
same load — and reports medians, with the range of the per-round speed-ups.
The data: support-ticket chats from the demo's generator (``tuneforge.demo.tickets``), a system prompt on half,
a second user/assistant turn on a third, each made unique by a reference number; the tokenizer is a 1k BPE
trained on a sample of them (ChatML), as the demo's base model has.

    python benchmarks/data_scale.py                      # 1,000,000 records (long on 2 cores)
    python benchmarks/data_scale.py --records 100000 --repeats 3

The last line printed is one JSON object: ``{"records", "cold_s", "cold_peak_rss_mb", "warm_s",
"datasets_cold_s", "datasets_peak_rss_mb", "cold_vs_datasets", "cold_vs_datasets_range", "cold_cpu_s",
"datasets_cpu_s", "cpu_vs_datasets", "warm_vs_cold", ...}``. Generated data and caches are removed at the end
unless ``--workdir`` keeps them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
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
    """Run one measurement in a fresh interpreter; returns its JSON plus the peak memory and CPU time of its tree."""
    import resource

    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
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
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the child and every descendant it waited for
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = peak[0] / 2**20
    result["process_s"] = time.perf_counter() - started
    result["process_cpu_s"] = sum(getattr(after, f) - getattr(before, f) for f in ("ru_utime", "ru_stime"))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=1, help="cold / warm / datasets rounds, interleaved (medians)")
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
    spec = json.dumps(recipe(model, data, work))
    rounds: list[dict[str, Any]] = []
    try:
        for r in range(args.repeats):  # A B A B: the machine's load drifts; each pair shares it
            home = work / f"home-{r}"
            env = dict(os.environ, TUNEFORGE_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
            cold = run_child(["--child", "prepare", spec], env)
            print(f"round {r} cold:", json.dumps(cold), flush=True)
            warm = run_child(["--child", "prepare", spec], env)
            print(f"round {r} warm:", json.dumps(warm), flush=True)
            if not warm["cache_hit"]:
                raise SystemExit("the warm prepare missed the token cache")
            shutil.rmtree(home, ignore_errors=True)
            anchor: dict[str, Any] = {"wall_s": None, "peak_rss_mb": None, "process_cpu_s": None}
            if not args.skip_datasets:
                cache = work / f"hf-cache-{r}"
                anchor = run_child(["--child", "datasets", str(model), str(data), str(cache), str(cores())], env)
                print(f"round {r} datasets:", json.dumps(anchor), flush=True)
                shutil.rmtree(cache, ignore_errors=True)
            rounds.append({"cold": cold, "warm": warm, "datasets": anchor})
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary(args.records, rounds)))


def summary(records: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds; ratios are per round (same load), then their median and range."""

    def med(kind: str, key: str) -> float | None:
        values = [r[kind][key] for r in rounds if r[kind][key] is not None]
        return statistics.median(values) if values else None

    def ratios(a: str, b: str, key: str) -> list[float]:
        return [r[a][key] / r[b][key] for r in rounds if r[a][key] and r[b][key]]

    def rnd(x: float | None, digits: int) -> float | None:
        return None if x is None else round(x, digits)

    speed, cpu = ratios("datasets", "cold", "wall_s"), ratios("datasets", "cold", "process_cpu_s")
    warm = ratios("cold", "warm", "wall_s")
    return {
        "records": records,
        "cold_s": rnd(med("cold", "wall_s"), 2),
        "cold_peak_rss_mb": round(max(r["cold"]["peak_rss_mb"] for r in rounds)),
        "warm_s": rnd(med("warm", "wall_s"), 3),
        "warm_peak_rss_mb": round(max(r["warm"]["peak_rss_mb"] for r in rounds)),
        "warm_process_s": rnd(med("warm", "process_s"), 2),
        "datasets_cold_s": rnd(med("datasets", "wall_s"), 2),
        "datasets_peak_rss_mb": rnd(med("datasets", "peak_rss_mb"), 0),
        "cold_vs_datasets": rnd(statistics.median(speed), 2) if speed else None,
        "cold_vs_datasets_range": [round(min(speed), 2), round(max(speed), 2)] if speed else None,
        "cold_cpu_s": rnd(med("cold", "process_cpu_s"), 1),
        "datasets_cpu_s": rnd(med("datasets", "process_cpu_s"), 1),
        "cpu_vs_datasets": rnd(statistics.median(cpu), 2) if cpu else None,
        "warm_vs_cold": rnd(statistics.median(warm), 1) if warm else None,
        "rounds": len(rounds),
        "cores": cores(),
    }


if __name__ == "__main__":
    main()
