"""Training throughput: tuneforge's loop against TRL's ``SFTTrainer``, same model, data, batch and threads.

Both sides train the same tiny Llama (``TinySpec()`` with a 1k vocabulary: 0.87 M parameters, embeddings
tied) on the same token sequences, 8 sequences × 128 tokens per optimizer step, fp32, AdamW (lr 2e-4,
constant schedule, no weight decay, gradients clipped at 1.0), for full fine-tuning and for LoRA (r 16,
alpha 32, all linear layers, no dropout).

Fairness, concretely:

* Data: random documents over a word list in which every word is one token of the trained tokenizer,
  so ``bos + 126 words + eos`` is exactly 128 tokens (asserted). tuneforge reads them as text (``cpt``,
  chunked at 128, so each packed row is one whole document); TRL gets the very same ids pre-tokenized
  (an ``input_ids`` dataset, which ``SFTTrainer`` neither re-tokenizes nor extends: it only adds
  ``labels = input_ids`` and truncates to ``max_length``, a no-op here). Every TRL row is checked.
* TRL is set up for a CPU as a careful user would: fp32 and no gradient checkpointing (its defaults,
  bf16 + checkpointing, are many times slower on a CPU), one micro-batch per step, no logging, saving
  or evaluation inside the measured steps, no dataloader workers. Its optimizer is its own default
  (``adamw_torch``); tuneforge uses whatever its loop builds — that choice is part of what is compared.
* Timing: PyTorch's global optimizer-step hook timestamps the end of every ``optimizer.step()`` on both
  sides, so a step is everything between two updates (data loading, collation, forward, backward,
  clipping, update, bookkeeping) and the probe depends on neither system's internals. Steps
  ``warmup + 1 .. steps`` are timed on both sides; a run's figure is its median step. Repeats are
  interleaved (tuneforge, TRL, then TRL, tuneforge, …: ``benchmarks/common.py``), each back-to-back pair
  gives one ratio, and the reported ratio is the median of the pairs' ratios, with its spread — load
  drifting on a shared machine slows both halves of a pair. CPU seconds per step and the time inside a
  step (without TRL's data loading) are printed as cross-checks.
* Isolation: every (system, adapter, repeat) runs in a fresh subprocess with the same thread count
  (``torch.set_num_threads`` and ``OMP_NUM_THREADS``).

    python benchmarks/sft_throughput.py                       # ~7 min on 2 idle cores
    python benchmarks/sft_throughput.py --steps 60 --repeats 7 --threads 1 --adapters lora

The last line printed is one JSON object: ``{"full": {"tuneforge_tok_s", "trl_tok_s", "ratio",
"ratio_spread", "ratios"}, "lora": {...}}`` — tok/s are medians over repeats, ``ratio`` (tuneforge / TRL)
the median of the paired ratios, ``ratio_spread`` their ``{n, min, q1, median, q3, max, iqr}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import describe, interleaved, paired_summary, run_child, worker_env

SEQ_LEN = 128
BATCH = 8
WORDS_PER_DOC = SEQ_LEN - 2  # bos + words + eos
LR = 2e-4
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
SYSTEMS = ("tuneforge", "trl")
ADAPTERS = ("full", "lora")


# -- shared inputs ------------------------------------------------------------------------------------
def _candidate_words(rng: random.Random, n: int = 300) -> list[str]:
    """Pronounceable four-letter words (consonant-vowel ×2): short enough that BPE learns them whole."""
    cons, vowels = "bdfgklmnprstvz", "aeiou"
    words: set[str] = set()
    while len(words) < n:
        words.add(rng.choice(cons) + rng.choice(vowels) + rng.choice(cons) + rng.choice(vowels))
    return sorted(words)


def prepare(work: Path, n_docs: int, seed: int = 0) -> dict[str, Any]:
    """Build the tiny model, pick one-token words, write the documents (JSONL) and their token ids (JSON)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneforge.data.templates import encode_texts
    from tuneforge.models.loading import load_tokenizer
    from tuneforge.models.tiny import build_tiny

    rng = random.Random(seed)
    candidates = _candidate_words(rng)
    corpus = [" ".join(rng.choice(candidates) for _ in range(30)) for _ in range(3000)]
    model_dir = build_tiny(work / "model", corpus, vocab_size=1024, seed=seed)
    tok = load_tokenizer(str(model_dir))

    def one_token(text: str) -> bool:
        return len(tok(text, add_special_tokens=False)["input_ids"]) == 1

    # A word must be one token both at the start of a document and after a space.
    words = [w for w in candidates if one_token(w) and one_token(" " + w)]
    if len(words) < 50:
        raise RuntimeError(f"only {len(words)} single-token words; the data would be too repetitive")

    docs = [" ".join(rng.choice(words) for _ in range(WORDS_PER_DOC)) for _ in range(n_docs)]
    # The ids tuneforge trains on come from its own cpt encoder; TRL is fed exactly these.
    encoded = encode_texts(tok, docs, SEQ_LEN)
    if len(encoded) != n_docs:
        raise AssertionError(f"{n_docs} documents became {len(encoded)} chunks; each must be one 128-token row")
    seqs = []
    for ids, mask in encoded:
        if len(ids) != SEQ_LEN or ids[0] != tok.bos_token_id or ids[-1] != tok.eos_token_id or not mask.all():
            raise AssertionError(
                f"a document encoded to {len(ids)} tokens; expected bos + {WORDS_PER_DOC} + eos, every token a target"
            )
        seqs.append([int(i) for i in ids])

    (work / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (work / "ids.json").write_text(json.dumps(seqs))
    n_params = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).num_parameters()
    return {"model": str(model_dir), "words": len(words), "docs": n_docs, "vocab": len(tok), "params": n_params}


# -- workers (one per subprocess) ----------------------------------------------------------------------
class StepClock:
    """Timestamps at the end of every ``optimizer.step()``, through PyTorch's global optimizer hook.

    The same hook times both systems, and it depends on neither's internals: the span between two
    optimizer steps is one whole training step (data, forward, backward, clipping, update, bookkeeping).
    """

    def __init__(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.threads: set[int] = set()
        self.trainable = 0
        self._seen: set[int] = set()
        self._handle = register_optimizer_step_post_hook(self._hook)

    def _hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        import torch

        # Wrappers (accelerate's AcceleratedOptimizer) may forward to an inner optimizer: count one per step.
        if self._seen and id(optimizer) not in self._seen:
            return
        self._seen.add(id(optimizer))
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.threads.add(torch.get_num_threads())
        if not self.trainable:
            self.trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])

    def result(self, steps: int, system: str) -> dict[str, Any]:
        self._handle.remove()
        if len(self.wall) != steps:
            raise AssertionError(f"{system}: expected {steps} optimizer steps, timed {len(self.wall)}")
        return {
            "step_s": [b - a for a, b in zip(self.wall, self.wall[1:])],  # entry i is step i + 2 (1-based)
            "cpu_s": [b - a for a, b in zip(self.cpu, self.cpu[1:])],  # CPU seconds of all threads, same spans
            "threads": sorted(self.threads),
            "trainable": self.trainable,
        }


def worker_tuneforge(work: Path, adapter: str, steps: int, threads: int) -> dict[str, Any]:
    import tuneforge

    recipe = {
        "name": f"bench-{adapter}",
        "method": "cpt",
        "model": {"path": str(work / "model")},
        "data": {
            "sources": [{"path": str(work / "docs.jsonl")}],
            "packing": True,
            "max_length": SEQ_LEN,
            "val_fraction": 0,
        },
        "adapter": {"kind": adapter, **(LORA if adapter == "lora" else {})},
        "train": {
            "max_steps": steps,
            "global_batch_size": BATCH,
            "micro_batch_size": BATCH,
            "lr": LR,
            "schedule": "constant",
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "grad_clip": 1.0,
            "precision": "fp32",
            "num_threads": threads,
            "eval_every": 10_000,
            "device": "cpu",
        },
        "tracking": {"enabled": False},
        "output": {"dir": str(work / f"run-tuneforge-{adapter}-{os.getpid()}")},
    }
    clock = StepClock()
    result = tuneforge.train(recipe, progress=False)
    out = clock.result(steps, "tuneforge")
    hist = result.history
    bad = [h["tokens"] for h in hist if h["tokens"] != BATCH * SEQ_LEN]
    if len(hist) != steps or bad:
        raise AssertionError(
            f"tuneforge: expected {steps} steps of {BATCH * SEQ_LEN} tokens, got {len(hist)} "
            f"steps{f' and a step of {bad[0]} tokens' if bad else ''}"
        )
    return {**out, "inner_s": [h["step_s"] for h in hist], "mean_loss": statistics.fmean(h["loss"] for h in hist)}


def worker_trl(work: Path, adapter: str, steps: int, threads: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(threads)
    seqs = json.loads((work / "ids.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(work / "model"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32, attn_implementation="sdpa")
    peft_config = None
    if adapter == "lora":
        peft_config = LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"],
            bias="none",
            task_type="CAUSAL_LM",
        )
    args = SFTConfig(
        output_dir=str(work / f"run-trl-{adapter}-{os.getpid()}"),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        packing=False,
        padding_free=False,
        max_length=SEQ_LEN,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="steps",
        logging_steps=10_000,
        dataloader_num_workers=0,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )

    inner: list[float] = []

    class InStep(TrainerCallback):
        """Time inside a step (on_step_begin → on_step_end), which leaves out TRL's data loading."""

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            inner.append(time.perf_counter() - self.t0)

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": seqs}),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[InStep()],
    )
    _check_trl_rows(trainer.train_dataset, seqs)
    clock = StepClock()
    train_out = trainer.train()
    return {**clock.result(steps, "trl"), "inner_s": inner, "mean_loss": float(train_out.training_loss)}


def _check_trl_rows(dataset: Any, seqs: list[list[int]]) -> None:
    """TRL must train on exactly our ids, with every token a target (as tuneforge's cpt does)."""
    if len(dataset) != len(seqs):
        raise AssertionError(f"TRL kept {len(dataset)} of {len(seqs)} rows")
    for i, row in enumerate(dataset):
        if list(row["input_ids"]) != seqs[i]:
            raise AssertionError(f"TRL changed row {i}'s input_ids (re-tokenized or added tokens)")
        if list(row.get("labels") or []) != seqs[i]:
            raise AssertionError(f"TRL row {i}'s labels are not its input_ids")


# -- orchestration -------------------------------------------------------------------------------------
def run_worker(system: str, adapter: str, work: Path, steps: int, threads: int) -> dict[str, Any]:
    env = worker_env(work / "home", work, threads)
    out_file = work / f"result-{system}-{adapter}-{time.monotonic_ns()}.json"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        system,
        "--adapter",
        adapter,
        "--work",
        str(work),
        "--steps",
        str(steps),
        "--threads",
        str(threads),
        "--out",
        str(out_file),
    ]
    proc = run_child(cmd, env)
    if proc.returncode != 0:
        raise RuntimeError(f"{system}/{adapter} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out_file.read_text())


def tokens_per_s(step_seconds: list[float]) -> float:
    return BATCH * SEQ_LEN / statistics.median(step_seconds)


def timed(run: dict[str, Any], key: str, warmup: int) -> list[float]:
    """The entries of ``run[key]`` for steps ``warmup + 1 ..`` (``step_s``/``cpu_s`` start at step 2)."""
    return run[key][warmup - 1 :] if key in ("step_s", "cpu_s") else run[key][warmup:]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing (at least 1)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: all cores")
    p.add_argument("--repeats", type=int, default=5, help="interleaved pairs of runs per adapter")
    p.add_argument("--adapters", default=",".join(ADAPTERS), help="comma-separated subset of: full,lora")
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--adapter", choices=ADAPTERS, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        fn = worker_tuneforge if a.worker == "tuneforge" else worker_trl
        Path(a.out).write_text(json.dumps(fn(Path(a.work), a.adapter, a.steps, a.threads)))
        return
    if a.warmup < 1 or a.steps < a.warmup + 3:
        p.error(f"need --warmup >= 1 and --steps >= --warmup + 3 (got --warmup {a.warmup}, --steps {a.steps})")
    adapters = [x for x in a.adapters.split(",") if x]
    if not adapters or set(adapters) - set(ADAPTERS):
        p.error(f"--adapters: expected a comma-separated subset of {','.join(ADAPTERS)}, got {a.adapters!r}")

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tuneforge-sft-bench-") as tmp:
        work = Path(tmp)
        os.environ["TUNEFORGE_HOME"] = str(work / "home")
        os.environ["HF_HUB_OFFLINE"] = "1"
        info = prepare(work, n_docs=a.steps * BATCH)
        print(
            f"model: {info['params'] / 1e6:.2f} M parameters, vocab {info['vocab']}; data: {info['docs']} "
            f"documents × {SEQ_LEN} tokens over {info['words']} one-token words",
            flush=True,
        )
        print(
            f"batch {BATCH} × {SEQ_LEN} tokens, fp32, AdamW lr {LR}; {a.steps} steps per run, timing steps "
            f"{a.warmup + 1}..{a.steps} (optimizer step to optimizer step); {a.threads} thread(s); "
            f"{a.repeats} repeat(s)",
            flush=True,
        )

        runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for adapter in adapters:

            def one(system: str, rep: int, adapter: str = adapter) -> dict[str, Any]:
                t0 = time.perf_counter()
                r = run_worker(system, adapter, work, a.steps, a.threads)
                step = timed(r, "step_s", a.warmup)
                print(
                    f"  repeat {rep + 1} {adapter:4s} {system:9s}: {tokens_per_s(step):7.0f} tok/s  "
                    f"median step {statistics.median(step) * 1e3:6.1f} ms (cpu "
                    f"{statistics.median(timed(r, 'cpu_s', a.warmup)) * 1e3:6.1f} ms)  threads {r['threads']}  "
                    f"trainable {r['trainable']}  mean loss {r['mean_loss']:.3f}  "
                    f"[{time.perf_counter() - t0:.0f} s]",
                    flush=True,
                )
                return r

            runs[adapter] = interleaved(SYSTEMS, a.repeats, one)

    def per_run(adapter: str, system: str, key: str) -> list[float]:
        """Tokens/s of each repeat's median step, in repeat order."""
        return [tokens_per_s(timed(r, key, a.warmup)) for r in runs[adapter][system]]

    summary: dict[str, dict[str, Any]] = {}
    print("\nsummary: tokens/s = tokens per step / median step time; ratio = median over back-to-back pairs")
    for adapter in adapters:
        tf, trl = per_run(adapter, "tuneforge", "step_s"), per_run(adapter, "trl", "step_s")
        paired = paired_summary(tf, trl)
        summary[adapter] = {
            "tuneforge_tok_s": round(statistics.median(tf), 1),
            "trl_tok_s": round(statistics.median(trl), 1),
            "ratio": paired["ratio"],
            "ratio_spread": paired["spread"],
            "ratios": paired["ratios"],
        }
        cpu = paired_summary(per_run(adapter, "tuneforge", "cpu_s"), per_run(adapter, "trl", "cpu_s"))
        inner = {s: statistics.median(per_run(adapter, s, "inner_s")) for s in SYSTEMS}
        print(
            f"  {adapter:4s}: tuneforge {summary[adapter]['tuneforge_tok_s']:7.0f}  "
            f"TRL {summary[adapter]['trl_tok_s']:7.0f}  ratio {describe(paired)}\n"
            f"        per CPU-second of the process: ratio {describe(cpu)}\n"
            f"        inside the step only (TRL's data loading left out): tuneforge {inner['tuneforge']:.0f}  "
            f"TRL {inner['trl']:.0f}"
        )
    print(f"total {time.perf_counter() - t_all:.0f} s")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
