"""One epoch of SFT on the demo's real chat data: tuneforge against TRL's ``SFTTrainer``, equal work on both sides.

The data is the demo's (``tuneforge demo``): support tickets (3000 chats, 120 leaf categories) mixed 75/25 by
supervised tokens with general-skills chat, chats of varying lengths (about 10 to 80 tokens), the loss on the
assistant's answer only. The model is the demo's base (a hidden-128 Llama pre-trained by the demo), full
fine-tuning, fp32, AdamW (lr 3e-3, cosine to 0 after 5 % warm-up, no weight decay, gradients clipped at 1.0),
8 rows of at most 256 tokens per optimizer step.

Equal work, concretely:

* Same tokens, same mixture. tuneforge tokenizes, masks and mixes the sources and plans the epoch (one pass over
  the tickets plus the general chat the 75/25 mix asks for). TRL is fed exactly the examples that plan realised —
  every (token ids, assistant mask) of the epoch, pre-tokenized — so both sides train on the same multiset of
  examples with the same supervised tokens (TRL's prepared rows are checked: token multiset and supervised-token
  count). TRL's assistant-only loss is its ``assistant_masks`` column, the mask ``assistant_only_loss=True``
  would build from a chat template with generation markers; here it is tuneforge's own mask, so neither side
  supervises a token the other does not.
* TRL at its best for this data on a CPU: fp32, no gradient checkpointing (its defaults, bf16 + checkpointing,
  are many times slower on a CPU), the fused AdamW, no logging, evaluation or saving inside the epoch, no
  dataloader workers, and the fastest of its batch layouts that learns as well (``--trl-layout``):

  - ``padded`` (the default): no packing, each batch padded to its longest chat, as many chats per step as
    tuneforge's packed rows hold on average (53). Measured here: the fastest that learns as well.
  - ``packed``: ``packing=True`` (best-fit decreasing into 256-token rows). TRL then trains padding-free: a
    batch is flattened into one sequence of ~2000 tokens whose documents are kept apart by position ids, which
    on a CPU (no varlen FlashAttention) means attention over the whole flattened sequence — about 2x slower
    than ``padded`` on this data.
  - ``padding_free``: no packing, each batch one padding-free sequence — the same cost as ``packed``.
  - ``padded_by_length``: ``padded`` with ``train_sampling_strategy="group_by_length"`` (batches of similar
    length: less padding). Faster than ``padded``, but its batches are of one kind of chat and the held-out loss
    after the epoch is about twice the others' — not equal work; there for reference.
* Equal results are checked too: after the epoch both models' loss on the same held-out chats (2 % of each
  source, assistant tokens only) is computed by one plain-PyTorch function, the same for both.
* Timing: from the first forward pass of training to the end of the last ``optimizer.step()`` (a global module
  hook and PyTorch's global optimizer-step hook, the same on both sides), so data loading, collation, forward,
  backward, clipping and updates count and model loading, tokenization and the final save do not. Repeats are
  interleaved (tuneforge, TRL, then TRL, tuneforge, … — ``benchmarks/common.py``); the ratio is the median of
  the back-to-back pairs' ratios, with its spread.

    python benchmarks/sft_realdata.py                        # ~6 min on 2 idle cores (3 pairs); builds the base once
    python benchmarks/sft_realdata.py --repeats 1 --home /tmp/tf-home
    python benchmarks/sft_realdata.py --threads 1            # on a machine busy with other work (see below)

On a machine other processes keep busy, use ``--threads 1``: a multi-threaded PyTorch op waits for all its
threads, and a thread the scheduler has parked makes the others spin — measured here, a 2-thread epoch took 7x
as long as a 1-thread one under load, on both sides, which says nothing about either.

``--home`` is a ``TUNEFORGE_HOME`` holding the demo's base (``$TUNEFORGE_HOME/demo/full/base``); without it,
``$TUNEFORGE_HOME`` is used when the base is there, else the base is built in a temporary home (~10 minutes).
Nothing is written to ``~/.tuneforge``: runs and caches live in a temporary directory.

The last line printed is one JSON object: ``{"tuneforge_s", "trl_s", "ratio", "tuneforge_val_loss",
"trl_val_loss", …}`` — seconds per epoch (medians over repeats), ``ratio`` = TRL seconds / tuneforge's (median
over pairs), and the spread, supervised tokens per second and optimizer steps of both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import describe, interleaved, paired_summary, run_child, worker_env

SYSTEMS = ("tuneforge", "trl")
BATCH = 8  # rows per optimizer step
LR = 3e-3
MAX_LENGTH = 256
WARMUP_RATIO = 0.05
LAYOUTS = ("packed", "padding_free", "padded", "padded_by_length")  # TRL's ways to batch (see the docstring)


# -- inputs -----------------------------------------------------------------------------------------
def demo_files(home: Path | None, work: Path) -> tuple[Path, Path]:
    """(the demo's data folder, its base model): the data written afresh (seeded), the base found or built.

    The base comes from `home` (built there if absent), else from ``$TUNEFORGE_HOME`` when the demo built it
    there, else it is built once in a temporary home under `work`.
    """
    from tuneforge.demo.run import FULL, build_base, write_data

    files = write_data(work / "demo", FULL)  # the same files every time
    env_home = os.environ.get("TUNEFORGE_HOME")
    if home is None and env_home and (Path(env_home) / "demo" / "full" / "base" / "tuneforge-demo.json").exists():
        return work / "demo" / "data", Path(env_home) / "demo" / "full" / "base"
    target = home or work / "demo-home"
    root = target / "demo" / "full"
    if not (root / "base" / "tuneforge-demo.json").exists():
        print(f"building the demo's base model under {target} (once; minutes)", flush=True)
    saved = os.environ.get("TUNEFORGE_HOME")
    os.environ["TUNEFORGE_HOME"] = str(target)  # the pre-training run's records go there, not to ~/.tuneforge
    try:
        base, _ = build_base(root, files, FULL, False, lambda text: print(text, flush=True))
    finally:
        os.environ["TUNEFORGE_HOME"] = saved or str(work / "home")
    return work / "demo" / "data", base


def recipe(data: Path, base: Path, work: Path, threads: int, name: str) -> dict[str, Any]:
    """The demo's mixed fine-tune, for exactly one epoch of the tickets (full fine-tuning, fp32)."""
    return {
        "name": name,
        "method": "sft",
        "model": {"path": str(base)},
        "data": {
            "sources": [
                {"path": str(data / "tickets.jsonl"), "name": "tickets", "weight": 0.75},
                {"path": str(data / "general_chat.jsonl"), "name": "general", "weight": 0.25},
            ],
            "max_length": MAX_LENGTH,
            "packing": True,
            "val_fraction": 0.02,
        },
        "adapter": {"kind": "full"},
        "train": {
            "epochs": 1,
            "global_batch_size": BATCH,
            "micro_batch_size": BATCH,
            "lr": LR,
            "schedule": "cosine",
            "warmup_ratio": WARMUP_RATIO,
            "min_lr_ratio": 0.0,
            "weight_decay": 0.0,
            "grad_clip": 1.0,
            "precision": "fp32",
            "num_threads": threads,
            "eval_every": 1_000_000,
            "log_every": 1_000_000,
            "device": "cpu",
        },
        "tracking": {"enabled": False},
        "output": {"dir": str(work / name)},
    }


def prepare(data: Path, base: Path, work: Path, threads: int) -> dict[str, Any]:
    """Plan tuneforge's epoch and write its realised examples (for TRL) and the held-out chats (for both)."""
    from tuneforge.config import load_recipe
    from tuneforge.training.build import prepare as prepare_recipe

    prepared = prepare_recipe(load_recipe(recipe(data, base, work, threads, "plan")))
    plan = prepared.plan
    sources = [t.train for t in prepared.tokens]
    examples = []
    for r in range(plan.num_steps * plan.global_batch_size):
        for s, i in plan.row(r):
            ids, mask = sources[s].example(int(i))
            examples.append({"input_ids": [int(t) for t in ids], "assistant_masks": [int(m) for m in mask]})
    val = {
        t.name: [[[int(x) for x in part] for part in t.val.example(i)] for i in range(len(t.val))]
        for t in prepared.tokens
        if t.val is not None
    }
    (work / "examples.json").write_text(json.dumps(examples))
    (work / "val.json").write_text(json.dumps(val))
    supervised = sum(sum(e["assistant_masks"][1:]) for e in examples)
    if supervised != plan.total_tokens:
        raise AssertionError(f"the examples hold {supervised} supervised tokens, the plan {plan.total_tokens}")
    return {
        "steps": plan.num_steps,
        "examples": len(examples),
        "tokens": sum(len(e["input_ids"]) for e in examples),
        "supervised": supervised,
        "longest": max(len(e["input_ids"]) for e in examples),
        "mix": plan.mix.summary(),
        "val": {k: len(v) for k, v in val.items()},
    }


# -- measuring -------------------------------------------------------------------------------------
class EpochClock:
    """The first forward pass of training and the end of every optimizer step, by PyTorch's global hooks."""

    def __init__(self) -> None:
        from torch.nn.modules.module import register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.start: float | None = None
        self.steps: list[float] = []
        self._seen: set[int] = set()
        self._forward = register_module_forward_pre_hook(self._on_forward)
        self._step = register_optimizer_step_post_hook(self._on_step)

    def _on_forward(self, module: Any, args: Any) -> None:
        self.start = time.perf_counter()
        self._forward.remove()  # only the first one: the hook costs nothing afterwards

    def _on_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._seen and id(optimizer) not in self._seen:  # a wrapper forwarding to an inner optimizer
            return
        self._seen.add(id(optimizer))
        self.steps.append(time.perf_counter())

    def result(self) -> dict[str, Any]:
        self._step.remove()
        if self.start is None or not self.steps:
            raise AssertionError("no training step was timed")
        return {"train_s": self.steps[-1] - self.start, "steps": len(self.steps)}


def heldout_loss(model: Any, val: dict[str, list[list[list[int]]]], batch: int = 32) -> dict[str, float]:
    """Mean loss per supervised (assistant) token on each held-out source and over all of them; plain PyTorch."""
    import torch
    import torch.nn.functional as F

    model.eval()
    sums: dict[str, tuple[float, int]] = {}
    with torch.no_grad():
        for name, docs in val.items():
            total, count = 0.0, 0
            for start in range(0, len(docs), batch):
                chunk = docs[start : start + batch]
                width = max(len(ids) for ids, _ in chunk)
                ids = torch.zeros((len(chunk), width), dtype=torch.long)
                attn = torch.zeros((len(chunk), width), dtype=torch.long)
                target = torch.full((len(chunk), width), -100, dtype=torch.long)
                for r, (doc, mask) in enumerate(chunk):
                    n = len(doc)
                    ids[r, :n] = torch.tensor(doc)
                    attn[r, :n] = 1
                    keep = torch.tensor(mask[1:]) > 0
                    target[r, : n - 1] = torch.where(keep, torch.tensor(doc[1:]), -100)  # position t predicts t + 1
                logits = model(input_ids=ids, attention_mask=attn).logits.float()
                total += float(F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum"))
                count += int((target != -100).sum())
            sums[name] = (total, count)
    out = {name: total / count for name, (total, count) in sums.items()}
    out["all"] = sum(t for t, _ in sums.values()) / sum(c for _, c in sums.values())
    return out


# -- workers (one per subprocess) -------------------------------------------------------------------
def worker_tuneforge(data: Path, base: Path, work: Path, threads: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    import tuneforge

    torch.set_num_threads(threads)
    clock = EpochClock()
    result = tuneforge.train(recipe(data, base, work, threads, f"run-tuneforge-{os.getpid()}"), progress=False)
    timed = clock.result()
    model = AutoModelForCausalLM.from_pretrained(str(result.output_dir), dtype=torch.float32)
    return {
        **timed,
        "inner_s": sum(h["step_s"] for h in result.history),  # tuneforge's own per-step clock, a cross-check
        "val": heldout_loss(model, json.loads((work / "val.json").read_text())),
    }


def worker_trl(base: Path, work: Path, threads: int, layout: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(threads)
    examples = json.loads((work / "examples.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, attn_implementation="sdpa")
    packed = layout == "packed"
    steps_tf = json.loads((work / "plan.json").read_text())["steps"]
    per_step = BATCH if packed else max(1, round(len(examples) / steps_tf))  # unpacked: examples per step
    args = SFTConfig(
        output_dir=str(work / f"run-trl-{os.getpid()}"),
        num_train_epochs=1,
        per_device_train_batch_size=per_step,
        gradient_accumulation_steps=1,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=WARMUP_RATIO,  # below 1: a fraction of the steps
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        packing=packed,
        packing_strategy="bfd",
        padding_free=layout == "padding_free",
        train_sampling_strategy="group_by_length" if layout == "padded_by_length" else "random",
        max_length=None if layout == "padding_free" else MAX_LENGTH,  # unpacked, every example is within it already
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="steps",
        logging_steps=1_000_000,
        dataloader_num_workers=0,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples), processing_class=tokenizer)
    check_trl_rows(trainer.train_dataset, examples)
    clock = EpochClock()
    trainer.train()
    timed = clock.result()
    return {**timed, "val": heldout_loss(trainer.model, json.loads((work / "val.json").read_text()))}


def check_trl_rows(dataset: Any, examples: list[dict[str, Any]]) -> None:
    """TRL's prepared rows hold exactly the epoch's documents and supervise exactly the same tokens."""
    docs: list[tuple[int, ...]] = []
    supervised = 0
    for row in dataset:
        ids, labels = list(row["input_ids"]), list(row["labels"])
        lengths = list(row.get("seq_lengths") or [len(ids)])
        at = 0
        for n in lengths:
            docs.append(tuple(ids[at : at + n]))
            supervised += sum(1 for x in labels[at + 1 : at + n] if x != -100)  # a document's first token: no loss
            at += n
    want = sorted(tuple(e["input_ids"]) for e in examples)
    if sorted(docs) != want:
        raise AssertionError(f"TRL's rows hold {len(docs)} documents that differ from the epoch's {len(want)}")
    expected = sum(sum(e["assistant_masks"][1:]) for e in examples)
    if supervised != expected:
        raise AssertionError(f"TRL supervises {supervised} tokens, tuneforge {expected}")


# -- orchestration ---------------------------------------------------------------------------------
def run_worker(system: str, data: Path, base: Path, work: Path, threads: int, layout: str) -> dict[str, Any]:
    env = worker_env(work / "home", work, threads)
    out = work / f"result-{system}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, __file__, "--worker", system, "--data", str(data), "--base", str(base), "--work", str(work)]
    cmd += ["--threads", str(threads), "--trl-layout", layout, "--out", str(out)]
    proc = run_child(cmd, env)
    if proc.returncode != 0:
        raise RuntimeError(f"{system} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="interleaved pairs of epochs")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: all cores")
    p.add_argument("--home", type=Path, help="a TUNEFORGE_HOME with the demo's base (built there if absent)")
    p.add_argument("--trl-layout", choices=LAYOUTS, default="padded")
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        if a.worker == "tuneforge":
            res = worker_tuneforge(a.data, a.base, a.work, a.threads)
        else:
            res = worker_trl(a.base, a.work, a.threads, a.trl_layout)
        a.out.write_text(json.dumps(res))
        return

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tuneforge-sft-realdata-") as tmp:
        work = Path(tmp)
        os.environ["TUNEFORGE_HOME"] = str(work / "home")  # caches and runs: never ~/.tuneforge
        os.environ["HF_HUB_OFFLINE"] = "1"
        data, base = demo_files(a.home, work)
        info = prepare(data, base, work, a.threads)
        (work / "plan.json").write_text(json.dumps(info))
        print(info["mix"], flush=True)
        print(
            f"one epoch: {info['examples']} chats, {info['tokens']} tokens ({info['supervised']} supervised), "
            f"longest {info['longest']}; tuneforge: {info['steps']} steps of {BATCH} packed rows of <= {MAX_LENGTH}; "
            f"TRL: {a.trl_layout}; held-out chats {info['val']}; {a.threads} thread(s), {a.repeats} pair(s)",
            flush=True,
        )

        def one(system: str, rep: int) -> dict[str, Any]:
            t0 = time.perf_counter()
            r = run_worker(system, data, base, work, a.threads, a.trl_layout)
            extra = f" (its own step clock {r['inner_s']:.1f} s)" if "inner_s" in r else ""
            print(
                f"  repeat {rep + 1} {system:9s}: epoch {r['train_s']:6.1f} s{extra}, {r['steps']} steps, "
                f"{info['supervised'] / r['train_s']:6.0f} supervised tok/s, held-out loss "
                f"{r['val']['all']:.4f} ({', '.join(f'{k} {v:.4f}' for k, v in r['val'].items() if k != 'all')})"
                f"  [{time.perf_counter() - t0:.0f} s]",
                flush=True,
            )
            return r

        runs = interleaved(SYSTEMS, a.repeats, one)

    secs = {s: [r["train_s"] for r in runs[s]] for s in SYSTEMS}
    paired = paired_summary(secs["trl"], secs["tuneforge"])
    med = {s: statistics.median(secs[s]) for s in SYSTEMS}
    loss = {s: statistics.median(r["val"]["all"] for r in runs[s]) for s in SYSTEMS}
    print(
        f"\nsummary: epoch tuneforge {med['tuneforge']:.1f} s, TRL {med['trl']:.1f} s; speedup {describe(paired)}; "
        f"held-out loss tuneforge {loss['tuneforge']:.4f}, TRL {loss['trl']:.4f}; total "
        f"{time.perf_counter() - t_all:.0f} s"
    )
    print(
        json.dumps(
            {
                "tuneforge_s": round(med["tuneforge"], 2),
                "trl_s": round(med["trl"], 2),
                "ratio": paired["ratio"],
                "tuneforge_val_loss": round(loss["tuneforge"], 4),
                "trl_val_loss": round(loss["trl"], 4),
                "ratio_spread": paired["spread"],
                "ratios": paired["ratios"],
                "tuneforge_sup_tok_s": round(info["supervised"] / med["tuneforge"], 1),
                "trl_sup_tok_s": round(info["supervised"] / med["trl"], 1),
                "tuneforge_steps": runs["tuneforge"][0]["steps"],
                "trl_steps": runs["trl"][0]["steps"],
                "supervised_tokens": info["supervised"],
                "trl_layout": a.trl_layout,
            }
        )
    )


if __name__ == "__main__":
    main()
