"""Serving many adapters of one base: tuneforge's engine against swapping merged models and PEFT ``set_adapter``.

The model is the demo's base (``tuneforge demo``'s cached base when one exists under ``$TUNEFORGE_HOME``, else a
model of the same configuration built here with ``tuneforge.models.tiny`` — hidden 128, 4 layers, 4 heads, 1 KV
head, MLP 336, 1k vocabulary — with random weights; the JSON says which). Eight LoRA adapters (r 16, alpha 32,
all linear layers: tuneforge's default adapter) get random non-zero ``B`` so every adapter changes the answers.

The workload, the same for every side: ``--requests`` chat prompts from the demo's general-skills data (20–60
tokens), ``--concurrency`` closed-loop clients (each sends its next request when its last one is answered),
request ``i`` for adapter ``i mod 8``, greedy, exactly ``--max-tokens`` new tokens (no stop tokens, so every
side does the same work). Latency is submit → last token; throughput is requests / wall time.

* ``mixed`` — tuneforge's engine, requests for the 8 adapters in one running batch (per-row LoRA, ``lora.py``).
* ``base_only`` — the same engine, every request for the base: what LoRA costs on top.
* ``merged_swap`` — one merged model (``merge_and_unload``, saved per adapter) in memory at a time; a worker
  takes the oldest request, batches every waiting request for the same adapter with it (up to the
  concurrency), swaps that adapter's merged weights in from disk if another one is loaded, and runs
  ``generate``. Batching same-adapter requests is the strongest form of this baseline, not the naive one.
* ``peft_set_adapter`` — one ``PeftModel`` with the 8 adapters; the same worker, ``set_adapter`` per batch.

Repeats are interleaved (``benchmarks/common.py``): each repeat runs every side once, in reversed order on
every other repeat; figures are medians over repeats, ratios the medians of per-repeat ratios with spread.

PEFT's own mixed-adapter batches (``generate(adapter_names=…)``) are compared too: the same 16 requests for
8 adapters as one static batch through PEFT, and submitted at once to tuneforge's engine.

    python benchmarks/serving.py                   # a few minutes on 2 cores
    python benchmarks/serving.py --repeats 5 --requests 128
    python benchmarks/serving.py --lora-r 4        # LoRA's cost relative to the base shrinks with r / hidden size
    python benchmarks/serving.py --hidden-size 512 # the same recipe, a 4× wider model

The last line is ``{"mixed": {"rps", "p50_ms", "p99_ms"}, "base_only": {…}, "merged_swap": {…},
"peft_set_adapter": {…}}``; the line before it has the ratios, spreads and the PEFT mixed-batch comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import interleaved, paired_summary, quantile

SIDES = ("mixed", "base_only", "merged_swap", "peft_set_adapter")
N_ADAPTERS = 8
LORA = dict(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)


# ------------------------------------------------------------------------------------------------- setup


def demo_base(work: Path, hidden: int | None) -> tuple[Path, str]:
    """The demo's cached base if ``tuneforge demo`` built one, else a model of its configuration built here
    (``hidden``: the same recipe at another width, to see how the figures move with model size)."""
    from tuneforge.demo import run, world
    from tuneforge.models.tiny import TinySpec, build_tiny
    from tuneforge.paths import state_dir

    cached = state_dir() / "demo" / "full" / "base"
    if hidden is None and (cached / "tuneforge-demo.json").exists():
        return cached, f"the demo's pre-trained base ({cached})"
    size = run.FULL  # the same shape as run.build_base gives it
    width = hidden or size.hidden_size
    heads = max(2, width // 32)
    spec = TinySpec(
        hidden_size=width,
        num_layers=size.num_layers,
        num_heads=heads,
        num_kv_heads=max(k for k in range(1, max(1, width // 96) + 1) if heads % k == 0),  # 1 at the demo's width
        intermediate_size=width * 8 // 3 // 16 * 16,
        max_position_embeddings=size.max_length,
    )
    texts = world.general_corpus(1, 1500)
    out = build_tiny(work / "base", texts, vocab_size=size.vocab_size, spec=spec, seed=0)
    what = "the demo base's configuration" if hidden is None else f"the demo base's recipe at hidden size {width}"
    return out, f"random weights in {what} ({spec}), built with tuneforge.models.tiny"


def make_adapters(base: Path, work: Path) -> list[Path]:
    import peft
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(N_ADAPTERS):
        torch.manual_seed(100 + i)
        model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(**LORA))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        model.save_pretrained(work / f"adapter-{i}")
        paths.append(work / f"adapter-{i}")
    return paths


def merge_all(base: Path, adapters: list[Path], work: Path) -> list[Path]:
    """Each adapter merged into its own copy of the base, as a plain safetensors file."""
    import peft
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    out = []
    for i, path in enumerate(adapters):
        merged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path).merge_and_unload()
        file = work / f"merged-{i}.safetensors"
        save_file({k: v.contiguous() for k, v in merged.state_dict().items() if k != "lm_head.weight"}, file)
        out.append(file)
    return out


def prompts(tokenizer: Any, n: int) -> list[list[int]]:
    from tuneforge.demo import world

    out: list[list[int]] = []
    for record in world.general_chat_examples(11, 4 * n):
        ids = tokenizer.apply_chat_template(record["messages"][:1], add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        if 20 <= len(ids) <= 60:
            out.append(ids)
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} prompts of 20-60 tokens in the demo data; ask for fewer --requests")


# ------------------------------------------------------------------------------------------------ load


@dataclass
class Run:
    rps: float
    latencies: list[float]
    cpu_s: float  # CPU seconds of this process (all its threads) during the run

    def summary(self) -> dict[str, float]:
        return {
            "rps": round(self.rps, 2),
            "cpu_ms_per_request": round(self.cpu_s / len(self.latencies) * 1e3, 2),
            "p50_ms": round(quantile(self.latencies, 0.5) * 1e3, 1),
            "p99_ms": round(quantile(self.latencies, 0.99) * 1e3, 1),
        }


def closed_loop(send: Callable[[list[int], int], Any], work: list[list[int]], concurrency: int) -> Run:
    """``concurrency`` clients; each sends the next request (prompt, adapter index) when its last one is done."""
    latencies: list[float] = []
    jobs = list(enumerate(work))

    async def client() -> None:
        while jobs:
            i, ids = jobs.pop(0)
            t0 = time.perf_counter()
            await send(ids, i % N_ADAPTERS)
            latencies.append(time.perf_counter() - t0)

    async def main() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(concurrency)])
        return time.perf_counter() - t0

    cpu = time.process_time()
    wall = asyncio.run(main())
    return Run(len(work) / wall, latencies, time.process_time() - cpu)


@dataclass
class _Job:
    ids: list[int]
    adapter: int
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future = field(repr=False)


class SwapServer:
    """One model in memory; a worker thread serves the oldest request's adapter, batching waiting requests for it.

    ``switch(adapter)`` makes the model compute that adapter (load merged weights, or PEFT ``set_adapter``).
    """

    def __init__(self, model: Any, switch: Callable[[int], None], max_tokens: int, max_batch: int, pad_id: int):
        self.model, self.switch, self.max_tokens, self.max_batch, self.pad_id = (
            model,
            switch,
            max_tokens,
            max_batch,
            pad_id,
        )
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.waiting: list[_Job] = []
        self.current: int | None = None
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    async def send(self, ids: list[int], adapter: int) -> list[int]:
        loop = asyncio.get_running_loop()
        job = _Job(ids, adapter, loop, loop.create_future())
        self.jobs.put(job)
        return await job.done

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def _work(self) -> None:
        torch.set_flush_denormal(True)
        while True:
            if not self.waiting:
                job = self.jobs.get()
                if job is None:
                    return
                self.waiting.append(job)
            while not self.jobs.empty():
                job = self.jobs.get_nowait()
                if job is None:
                    return
                self.waiting.append(job)
            adapter = self.waiting[0].adapter
            batch = [j for j in self.waiting if j.adapter == adapter][: self.max_batch]
            self.waiting = [j for j in self.waiting if j not in batch]
            if adapter != self.current:
                self.switch(adapter)
                self.current = adapter
            for job, out in zip(batch, self._generate([j.ids for j in batch])):
                job.loop.call_soon_threadsafe(job.done.set_result, out)

    @torch.inference_mode()
    def _generate(self, batch: list[list[int]]) -> list[list[int]]:
        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=self.max_tokens,
            min_new_tokens=self.max_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=self.pad_id,
        )
        return out[:, width:].tolist()


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for every side")
    parser.add_argument(
        "--lora-r", type=int, default=16, help="adapters' rank (alpha = 2 r); 16 is tuneforge's default"
    )
    parser.add_argument("--hidden-size", type=int, default=None, help="build the demo recipe at another width")
    args = parser.parse_args()
    LORA.update(r=args.lora_r, lora_alpha=2 * args.lora_r)

    import peft
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tuneforge.models.loading import quiet_transformers
    from tuneforge.serve import Engine, SamplingParams

    quiet_transformers()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory(prefix="tuneforge-serving-") as tmp:
        work = Path(tmp)
        base, base_note = demo_base(work, args.hidden_size)
        adapters = make_adapters(base, work)
        merged = merge_all(base, adapters, work)

        engine = Engine(base, max_batch_size=args.concurrency)
        for i, path in enumerate(adapters):
            engine.add_adapter(f"adapter-{i}", path)
        work_items = prompts(engine.tokenizer, args.requests)
        pad = engine.tokenizer.pad_token_id or 0
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens)

        async def via_engine(ids: list[int], adapter: int | None) -> list[int]:
            name = None if adapter is None else f"adapter-{adapter}"
            return [e.token_id async for e in engine.generate(ids, params, adapter=name) if e.token_id is not None]

        swap_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

        def load_merged(i: int) -> None:
            swap_model.load_state_dict(load_file(str(merged[i])), strict=False)  # from disk, as on demand

        peft_model = peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapters[0], adapter_name="adapter-0"
        )
        for i, path in enumerate(adapters[1:], 1):
            peft_model.load_adapter(path, adapter_name=f"adapter-{i}")
        peft_model.eval()
        servers = {
            "merged_swap": SwapServer(swap_model, load_merged, args.max_tokens, args.concurrency, pad),
            "peft_set_adapter": SwapServer(
                peft_model, lambda i: peft_model.set_adapter(f"adapter-{i}"), args.max_tokens, args.concurrency, pad
            ),
        }
        sends = {
            "mixed": via_engine,
            "base_only": lambda ids, adapter: via_engine(ids, None),
            **{name: server.send for name, server in servers.items()},
        }
        # Same answers on every side that computes the same model (warms each side up, too).
        check = work_items[: args.concurrency]
        answers = {side: _answers(sends[side], check) for side in SIDES}
        agree = {side: answers[side] == answers["peft_set_adapter"] for side in ("mixed", "merged_swap")}

        runs = interleaved(SIDES, args.repeats, lambda side, i: closed_loop(sends[side], work_items, args.concurrency))
        peft_mixed = _peft_mixed_batch(peft_model, engine, params, check, pad, args.repeats)
        engine.stop()
        for server in servers.values():
            server.close()

    final = {side: _median_summary(runs[side]) for side in SIDES}
    rps = {side: [r.rps for r in runs[side]] for side in SIDES}
    detail = {
        "model": base_note,
        "workload": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "adapters": N_ADAPTERS,
            "lora": LORA,
            "threads": args.threads,
            "repeats": args.repeats,
        },
        "same_greedy_tokens_as_peft": agree,
        "mixed_vs_merged_swap": paired_summary(rps["mixed"], rps["merged_swap"]),
        "mixed_vs_peft_set_adapter": paired_summary(rps["mixed"], rps["peft_set_adapter"]),
        "base_only_vs_mixed": paired_summary(rps["base_only"], rps["mixed"]),
        # On a shared machine wall time also measures the neighbours; CPU time per request is the work itself.
        "cpu_ms_per_request": {side: _median([r.cpu_s / len(r.latencies) * 1e3 for r in runs[side]]) for side in SIDES},
        "peft_mixed_batch": peft_mixed,
        "per_repeat": {side: [r.summary() for r in runs[side]] for side in SIDES},
    }
    print(json.dumps(detail))
    print(json.dumps(final))


def _answers(send: Callable[[list[int], int], Any], work: list[list[int]]) -> list[list[int]]:
    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*[send(ids, i % N_ADAPTERS) for i, ids in enumerate(work)]))

    return asyncio.run(main())


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def _median_summary(runs: list[Run]) -> dict[str, float]:
    summaries = [r.summary() for r in runs]
    return {k: round(statistics.median(s[k] for s in summaries), 2) for k in ("rps", "p50_ms", "p99_ms")}


def _peft_mixed_batch(peft_model: Any, engine: Any, params: Any, batch: list[list[int]], pad: int, repeats: int):
    """One static batch, 8 adapters mixed: PEFT ``generate(adapter_names=…)`` against the engine, wall seconds."""
    names = [f"adapter-{i % N_ADAPTERS}" for i in range(len(batch))]
    width = max(len(ids) for ids in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, row in enumerate(batch):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1

    def peft_side() -> tuple[float, list[list[int]]]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = peft_model.generate(
                input_ids=ids,
                attention_mask=mask,
                adapter_names=names,
                max_new_tokens=params.max_tokens,
                min_new_tokens=params.max_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=pad,
            )
        return time.perf_counter() - t0, out[:, width:].tolist()

    def engine_side() -> tuple[float, list[list[int]]]:
        async def main() -> list[list[int]]:
            async def one(row: list[int], name: str) -> list[int]:
                return [e.token_id async for e in engine.generate(row, params, adapter=name) if e.token_id is not None]

            return list(await asyncio.gather(*[one(row, n) for row, n in zip(batch, names)]))

        t0 = time.perf_counter()
        out = asyncio.run(main())
        return time.perf_counter() - t0, out

    results = interleaved(
        ("tuneforge", "peft"), repeats, lambda side, i: (engine_side if side == "tuneforge" else peft_side)()
    )
    seconds = {side: [s for s, _ in results[side]] for side in results}
    return {
        "batch": len(batch),
        "adapters": N_ADAPTERS,
        "tuneforge_s": round(statistics.median(seconds["tuneforge"]), 3),
        "peft_s": round(statistics.median(seconds["peft"]), 3),
        "speedup": paired_summary(seconds["peft"], seconds["tuneforge"]),  # PEFT seconds / tuneforge seconds
        "same_tokens": results["tuneforge"][0][1] == results["peft"][0][1],
    }


if __name__ == "__main__":
    main()
