"""Method throughput: tuneforge's DPO, KTO, reward-model and GRPO steps against TRL's DPOTrainer / KTOTrainer /
RewardTrainer / GRPOTrainer.

Both sides train the same tiny Llama (``TinySpec()``, ~1.2 M parameters, 1k vocabulary) on the same preference pairs,
4 pairs per optimizer step (8 sequences of at most 160 tokens), fp32, AdamW (lr 1e-4, constant, no weight decay,
gradients clipped at 1.0), full fine-tuning.

Fairness, concretely:

* Data: chat pairs (one user turn, one assistant answer each side) over a word list in which every word is one token
  of the trained tokenizer, rendered with the model's ChatML template. TRL tokenizes the same records itself; the
  worker checks that every TRL row holds exactly tuneforge's token ids, so both sides compute on the same tokens.
* Same work per step. DPO: sigmoid loss, beta 0.1, and a reference forward pass every step on both sides — TRL's
  default (a second copy of the base model) and tuneforge with ``dpo.precompute_ref: false`` (the same frozen copy).
  ``--precomputed`` adds the variant where both precompute reference log-probs before training
  (``precompute_ref_log_probs=True`` / tuneforge's default for full fine-tuning).
* TRL is set up for a CPU as a careful user would: fp32 and no gradient checkpointing (TRL 1.16 defaults to bf16 +
  checkpointing, many times slower on a CPU), the fused AdamW kernel (as tuneforge uses), one micro-batch per step,
  no logging, saving or evaluation inside the measured steps, no dataloader workers, dropout off on both sides.
* Timing: wall time from one ``optimizer.step()`` to the next (PyTorch's global optimizer hook, the same on both
  sides), so data loading, collation and bookkeeping count. Warm-up steps are left out; a run's figure is the median
  of its measured steps. Repeats are interleaved (tuneforge, TRL, then TRL, tuneforge, …: ``benchmarks/common.py``)
  and each back-to-back pair gives one speedup; the reported speedup is the median over the pairs, with its spread,
  so load drifting on a shared machine slows both halves of a pair rather than one side. Every (system, method,
  repeat) runs in a fresh subprocess with the same thread count.
* KTO: the same pairs unpaired (each pair's chosen answer desirable, its rejected one undesirable: 8 examples per
  step, the same 8 sequences as DPO), beta 0.1, a frozen reference copy on both sides, and on both sides the KL
  reference point from mismatched (prompt, other completion) pairs of the step — two more no-grad forward passes.
  TRL's dataset is built from the same records in the same order; the worker checks TRL's prompt and completion
  token ids against tuneforge's.
* GRPO: one prompt of 50-80 words per step, a group of 8 completions of up to 32 new tokens sampled at temperature 1
  (the untrained model almost never emits EOS, so both sides decode ~32 tokens per completion — the mean completion
  length is printed for each side), a keyword reward that costs nothing on either side (a ``string_check`` grader /
  the equivalent Python reward function), beta 0 (no reference model, TRL's default), one optimizer step per
  generation (``steps_per_generation=1``, ``num_iterations=1``), the token-level ``dapo`` loss on both sides. TRL
  generates with ``model.generate`` (KV cache); tuneforge prefills the prompt once for its whole group and decodes
  with its own KV-cached sampler, then trains on the group as one row (the prompt once, each completion behind a
  block mask: 1.3x faster steps than one row per completion, measured here) and projects only completion
  positions to the vocabulary.
* What differs is how the step is computed: tuneforge feeds each pair as one row with the prompt computed once and
  projects only answer positions to the vocabulary; TRL feeds prompt + chosen and prompt + rejected as two rows and
  computes log-probs and logging statistics (entropy, mean logits, top-1 accuracy) at every position.

    python benchmarks/methods_throughput.py                  # ~7 min on 2 idle cores
    python benchmarks/methods_throughput.py --only grpo --repeats 5
    python benchmarks/methods_throughput.py --steps 40 --repeats 3 --threads 1 --precomputed

The last line printed is one JSON object ``{"dpo": {"tuneforge_s_per_step", "trl_s_per_step", "speedup",
"speedup_spread", "speedups"}, "grpo": {...}, "reward": {...}, "kto": {...}}``: seconds per step are medians over
repeats, ``speedup`` (TRL seconds per step / tuneforge's) the median over interleaved pairs, ``speedup_spread`` its
``{n, min, q1, median, q3, max, iqr}``.
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

PAIRS = 4
MAX_LEN = 160
LR = 1e-4
BETA = 0.1
SYSTEMS = ("tuneforge", "trl")
METHODS = ("dpo", "grpo", "reward", "kto", "dpo_precomputed")
GROUP = 8
NEW_TOKENS = 32
KEYWORD = "apple"


# -- shared inputs ------------------------------------------------------------------------------------
def _candidate_words(rng: random.Random, n: int = 300) -> list[str]:
    cons, vowels = "bdfgklmnprstvz", "aeiou"
    words: set[str] = set()
    while len(words) < n:
        words.add(rng.choice(cons) + rng.choice(vowels) + rng.choice(cons) + rng.choice(vowels))
    return sorted(words)


def prepare(work: Path, n_pairs: int, seed: int = 0) -> dict[str, Any]:
    """Build the tiny model and write ``pairs.jsonl``: prompts of 50-80 words, answers of 30-60 words."""
    from tuneforge.data.preference import encode_pairs
    from tuneforge.models.loading import load_tokenizer
    from tuneforge.models.tiny import build_tiny

    rng = random.Random(seed)
    candidates = _candidate_words(rng)
    corpus = [" ".join(rng.choice(candidates) for _ in range(30)) for _ in range(3000)]
    model_dir = build_tiny(work / "model", corpus, vocab_size=1024, seed=seed)
    tok = load_tokenizer(str(model_dir))

    def one_token(text: str) -> bool:
        return len(tok(text, add_special_tokens=False)["input_ids"]) == 1

    words = [w for w in candidates if one_token(w) and one_token(" " + w)]

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    records = []
    for _ in range(n_pairs):
        prompt = [{"role": "user", "content": text(50, 80)}]
        records.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": text(30, 60)}],
                "rejected": [{"role": "assistant", "content": text(30, 60)}],
            }
        )
    encoded = encode_pairs(tok, records, tok.chat_template)
    longest = max(len(ids) for ids, _ in encoded)
    assert longest <= MAX_LEN, f"a sequence is {longest} tokens, more than {MAX_LEN}"
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    unpaired = [
        {"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
        for r in records
        for side in ("chosen", "rejected")
    ]
    (work / "unpaired.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unpaired))
    prompts = [{"messages": r["prompt"], "keyword": KEYWORD} for r in records]
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    (work / "ids.json").write_text(json.dumps([[int(t) for t in ids] for ids, _ in encoded]))
    from transformers import AutoConfig, AutoModelForCausalLM

    n_params = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).num_parameters()
    mean_len = sum(len(ids) for ids, _ in encoded) / len(encoded)
    return {"params": n_params, "vocab": len(tok), "pairs": n_pairs, "mean_len": mean_len, "longest": longest}


# -- workers (one per subprocess) ----------------------------------------------------------------------
class StepClock:
    """Timestamps at the end of every ``optimizer.step()`` through PyTorch's global hook (both systems alike)."""

    def __init__(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._seen: set[int] = set()
        self._handle = register_optimizer_step_post_hook(self._hook)

    def _hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._seen and id(optimizer) not in self._seen:  # a wrapper forwarding to an inner optimizer
            return
        self._seen.add(id(optimizer))
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def result(self, steps: int, system: str) -> dict[str, list[float]]:
        """Wall and CPU (all threads) seconds of each step; entry i is step i + 2 (1-based)."""
        self._handle.remove()
        if len(self.wall) != steps:
            raise AssertionError(f"{system}: expected {steps} optimizer steps, timed {len(self.wall)}")
        return {
            "step_s": [b - a for a, b in zip(self.wall, self.wall[1:])],
            "cpu_s": [b - a for a, b in zip(self.cpu, self.cpu[1:])],
        }


def worker_tuneforge(work: Path, method: str, steps: int, threads: int) -> dict[str, Any]:
    import tuneforge

    if method == "grpo":
        return worker_tuneforge_grpo(work, steps, threads)

    kto = method == "kto"
    batch = 2 * PAIRS if kto else PAIRS  # KTO: each pair's two answers are two examples
    recipe = {
        "name": f"bench-{method}",
        "method": "dpo" if method == "dpo_precomputed" else method,
        "model": {"path": str(work / "model")},
        "data": {
            "sources": [{"path": str(work / ("unpaired.jsonl" if kto else "pairs.jsonl"))}],
            "max_length": MAX_LEN,
            "val_fraction": 0,
            "sanitize": {"dedup": False},
        },
        "adapter": {"kind": "full"},
        "dpo": {"loss_type": "sigmoid", "beta": BETA, "precompute_ref": method == "dpo_precomputed"},
        "kto": {"beta": BETA},
        "train": {
            "max_steps": steps,
            "global_batch_size": batch,
            "micro_batch_size": batch,
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
        "output": {"dir": str(work / f"run-tuneforge-{method}-{os.getpid()}")},
    }
    clock = StepClock()
    result = tuneforge.train(recipe, progress=False)
    return {**clock.result(steps, "tuneforge"), "mean_loss": statistics.fmean(h["loss"] for h in result.history)}


def worker_tuneforge_grpo(work: Path, steps: int, threads: int) -> dict[str, Any]:
    import tuneforge

    grader = {
        "type": "string_check",
        "name": "keyword",
        "input": "{{sample.output_text}}",
        "reference": "{{item.keyword}}",
        "operation": "like",
    }
    recipe = {
        "name": "bench-grpo",
        "method": "grpo",
        "model": {"path": str(work / "model")},
        "data": {
            "sources": [{"path": str(work / "prompts.jsonl")}],
            "max_length": MAX_LEN + NEW_TOKENS,
            "val_fraction": 0,
        },
        "adapter": {"kind": "full"},
        "grpo": {"graders": grader, "group_size": GROUP, "loss_type": "dapo", "beta": 0.0},
        "generation": {"max_new_tokens": NEW_TOKENS, "temperature": 1.0},
        "train": {
            "max_steps": steps,
            "global_batch_size": 1,
            "micro_batch_size": 1,
            "lr": LR,
            "schedule": "constant",
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "grad_clip": 1.0,
            "precision": "fp32",
            "num_threads": threads,
            "eval_every": 10_000,
            "device": "cpu",
            "log_every": 1,
        },
        "tracking": {"enabled": False},
        "output": {"dir": str(work / f"run-tuneforge-grpo-{os.getpid()}")},
    }
    clock = StepClock()
    result = tuneforge.train(recipe, progress=False)
    return {
        **clock.result(steps, "tuneforge"),
        "mean_loss": statistics.fmean(h["loss"] for h in result.history),
        "completion_length": statistics.fmean(h["completion_length"] for h in result.history),
    }


def worker_trl_grpo(work: Path, steps: int, threads: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(threads)
    records = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["messages"], "keyword": r["keyword"]} for r in records])
    tokenizer = AutoTokenizer.from_pretrained(str(work / "model"))
    lengths: list[float] = []

    def keyword_reward(completions: list, keyword: list, completion_ids: list, **_: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        lengths.append(statistics.fmean(len(ids) for ids in completion_ids))
        return [float(k in t) for t, k in zip(texts, keyword)]

    args = GRPOConfig(
        output_dir=str(work / f"run-trl-grpo-{os.getpid()}"),
        max_steps=steps,
        per_device_train_batch_size=GROUP,
        num_generations=GROUP,
        steps_per_generation=1,
        num_iterations=1,
        gradient_accumulation_steps=1,
        max_completion_length=NEW_TOKENS,
        temperature=1.0,
        top_p=1.0,
        beta=0.0,
        loss_type="dapo",
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="steps",
        logging_steps=10_000,
        dataloader_num_workers=0,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        disable_dropout=True,
        shuffle_dataset=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32, attn_implementation="sdpa")
    trainer = GRPOTrainer(
        model=model, reward_funcs=keyword_reward, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    clock = StepClock()
    out = trainer.train()
    return {
        **clock.result(steps, "trl"),
        "mean_loss": float(out.training_loss),
        "completion_length": statistics.fmean(lengths) if lengths else 0.0,
    }


def worker_trl(work: Path, method: str, steps: int, threads: int) -> dict[str, Any]:
    if method == "grpo":
        return worker_trl_grpo(work, steps, threads)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(threads)
    kto = method == "kto"
    records = [
        json.loads(line) for line in (work / ("unpaired.jsonl" if kto else "pairs.jsonl")).read_text().splitlines()
    ]
    dataset = Dataset.from_list(records)
    tokenizer = AutoTokenizer.from_pretrained(str(work / "model"))
    common = dict(
        output_dir=str(work / f"run-trl-{method}-{os.getpid()}"),
        max_steps=steps,
        per_device_train_batch_size=PAIRS,
        gradient_accumulation_steps=1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        max_length=MAX_LEN,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="steps",
        logging_steps=10_000,
        dataloader_num_workers=0,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        disable_dropout=True,
    )
    torch.manual_seed(0)
    if method == "reward":
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(
            str(work / "model"), num_labels=1, dtype=torch.float32, attn_implementation="sdpa"
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        trainer = RewardTrainer(
            model=model, args=RewardConfig(**common), train_dataset=dataset, processing_class=tokenizer
        )
    elif kto:
        from trl import KTOConfig, KTOTrainer

        model = AutoModelForCausalLM.from_pretrained(
            str(work / "model"), dtype=torch.float32, attn_implementation="sdpa"
        )
        args = KTOConfig(**{**common, "per_device_train_batch_size": 2 * PAIRS}, beta=BETA)
        trainer = KTOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    else:
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(
            str(work / "model"), dtype=torch.float32, attn_implementation="sdpa"
        )
        args = DPOConfig(
            **common, beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=method == "dpo_precomputed"
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    _check_trl_rows(trainer.train_dataset, json.loads((work / "ids.json").read_text()), method)
    clock = StepClock()
    out = trainer.train()
    return {**clock.result(steps, "trl"), "mean_loss": float(out.training_loss)}


def _check_trl_rows(dataset: Any, ids: list[list[int]], method: str) -> None:
    """TRL must train on exactly tuneforge's token ids (prompt + chosen, prompt + rejected of every pair)."""
    if method == "kto":  # one row per answer, in the pairs' order: chosen, rejected, chosen, …
        if len(dataset) != len(ids):
            raise AssertionError(f"TRL kept {len(dataset)} of {len(ids)} KTO examples")
        for i, row in enumerate(dataset):
            if list(row["prompt_ids"]) + list(row["completion_ids"]) != ids[i]:
                raise AssertionError(f"TRL's tokens of KTO example {i} differ from tuneforge's")
        return
    if len(dataset) != len(ids) // 2:
        raise AssertionError(f"TRL kept {len(dataset)} of {len(ids) // 2} pairs")
    for i, row in enumerate(dataset):
        if method == "reward":
            got = [list(row["chosen_ids"]), list(row["rejected_ids"])]
        else:
            prompt = list(row["prompt_ids"])
            got = [prompt + list(row["chosen_ids"]), prompt + list(row["rejected_ids"])]
        if got != [ids[2 * i], ids[2 * i + 1]]:
            raise AssertionError(f"TRL's tokens of pair {i} differ from tuneforge's ({method})")


# -- orchestration -------------------------------------------------------------------------------------
def run_worker(system: str, method: str, work: Path, steps: int, threads: int) -> dict[str, Any]:
    env = worker_env(work / f"home-{system}-{method}-{time.monotonic_ns()}", work, threads)
    out_file = work / f"result-{system}-{method}-{time.monotonic_ns()}.json"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        system,
        "--method",
        method,
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
        raise RuntimeError(f"{system}/{method} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out_file.read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing (at least 1)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: all cores")
    p.add_argument("--repeats", type=int, default=3, help="interleaved pairs of runs per method")
    p.add_argument("--precomputed", action="store_true", help="also time DPO with precomputed reference log-probs")
    p.add_argument("--only", nargs="+", choices=METHODS, help="time only these methods")
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        fn = worker_tuneforge if a.worker == "tuneforge" else worker_trl
        Path(a.out).write_text(json.dumps(fn(Path(a.work), a.method, a.steps, a.threads)))
        return
    if a.warmup < 1 or a.steps < a.warmup + 3:
        p.error(f"need --warmup >= 1 and --steps >= --warmup + 3 (got --warmup {a.warmup}, --steps {a.steps})")
    methods = a.only or ["dpo", "kto", "grpo", "reward"] + (["dpo_precomputed"] if a.precomputed else [])

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tuneforge-methods-bench-") as tmp:
        work = Path(tmp)
        os.environ["TUNEFORGE_HOME"] = str(work / "home")
        os.environ["HF_HUB_OFFLINE"] = "1"
        info = prepare(work, n_pairs=a.steps * PAIRS)
        print(
            f"model: {info['params'] / 1e6:.2f} M parameters, vocab {info['vocab']}; data: {info['pairs']} pairs, "
            f"sequences of {info['mean_len']:.0f} tokens on average (longest {info['longest']})",
            flush=True,
        )
        print(
            f"{PAIRS} pairs per step, fp32, AdamW lr {LR}; {a.steps} steps per run, timing steps {a.warmup + 1}.."
            f"{a.steps}; {a.threads} thread(s); {a.repeats} repeat(s)",
            flush=True,
        )
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for method in methods:

            def one(system: str, rep: int, method: str = method) -> dict[str, Any]:
                t0 = time.perf_counter()
                r = run_worker(system, method, work, a.steps, a.threads)
                timed, cpu = r["step_s"][a.warmup - 1 :], r["cpu_s"][a.warmup - 1 :]
                print(
                    f"  repeat {rep + 1} {method:15s} {system:9s}: median step "
                    f"{statistics.median(timed) * 1e3:6.1f} ms (cpu {statistics.median(cpu) * 1e3:6.1f} ms)  "
                    f"mean loss {r['mean_loss']:.4f}"
                    + (f"  completion {r['completion_length']:.1f} tokens" if "completion_length" in r else "")
                    + f"  [{time.perf_counter() - t0:.0f} s]",
                    flush=True,
                )
                return r

            runs[method] = interleaved(SYSTEMS, a.repeats, one)

    summary: dict[str, dict[str, Any]] = {}
    print("\nsummary: seconds per optimizer step (each run's median step; median over repeats); speedup = median over")
    print("back-to-back pairs of TRL's seconds per step / tuneforge's")
    for method in methods:

        def per_run(system: str, key: str, method: str = method) -> list[float]:
            """Each repeat's median step (seconds), in repeat order."""
            return [statistics.median(r[key][a.warmup - 1 :]) for r in runs[method][system]]

        tf, trl = per_run("tuneforge", "step_s"), per_run("trl", "step_s")
        paired = paired_summary(trl, tf)
        summary[method] = {
            "tuneforge_s_per_step": round(statistics.median(tf), 5),
            "trl_s_per_step": round(statistics.median(trl), 5),
            "speedup": paired["ratio"],
            "speedup_spread": paired["spread"],
            "speedups": paired["ratios"],
        }
        cpu = paired_summary(per_run("trl", "cpu_s"), per_run("tuneforge", "cpu_s"))
        print(
            f"  {method:15s}: tuneforge {statistics.median(tf) * 1e3:6.1f} ms  TRL {statistics.median(trl) * 1e3:6.1f} "
            f"ms  speedup {describe(paired)}\n"
            f"  {'':15s}  CPU seconds per step (less sensitive to other load): speedup {describe(cpu)}"
        )
    print(f"total {time.perf_counter() - t_all:.0f} s")
    print(json.dumps(summary))  # "dpo", "kto", "grpo", "reward" (and "dpo_precomputed" with --precomputed)


if __name__ == "__main__":
    main()
