"""Multiple-choice throughput: tuneforge's log-likelihood engine against lm-evaluation-harness's HF backend.

Same model object (a small Llama built here: hidden 256, 4 layers, a BPE vocabulary trained on the demo world's
text), same task, same batch size (sequences per forward pass), same threads, fp32, one process.

The task is HellaSwag-shaped: a context of one generated document (the demo world's prose, median ~70 tokens) and
four candidate next sentences (~5-15 tokens each), plain text, so both engines score exactly the same token
sequences (the largest per-choice difference between them is printed as a check: float rounding).

* tuneforge: :func:`tuneforge.eval.runner.evaluate_task` — prompt rendering, tokenization, scoring and metrics,
  i.e. everything ``tuneforge eval`` does per task. The context runs once per item and its KV cache serves the
  four choices; logits are projected onto the vocabulary only where a choice token is predicted.
* lm-eval: ``HFLM.loglikelihood`` on the task's already-built requests — its backend alone (tokenization and
  scoring), without the task set-up ``simple_evaluate`` adds, which is lm-eval's cost too but not its engine's.
  Each (context, choice) pair is a row of its own; its one-token-continuation cache does not apply to
  multi-token choices.

Repeats are interleaved (tuneforge, lm-eval, then lm-eval, tuneforge…: ``benchmarks/common.py``); each pair gives
one ratio and the reported ratio is their median, with the spread.

    python benchmarks/eval_throughput.py --threads 1       # ~2 min on a busy 2-core machine
    python benchmarks/eval_throughput.py --items 64 --repeats 3 --threads 1

The last line is one JSON object: ``{"tuneforge_items_s", "lm_eval_items_s", "ratio", "ratio_spread", …}``
(items per second are medians over repeats; ``ratio`` = tuneforge / lm-eval, the median of the paired ratios).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import describe, interleaved, paired_summary

SIDES = ("tuneforge", "lm_eval")


def build_model(root: Path, vocab: int) -> Path:
    from tuneforge.demo import world
    from tuneforge.models.tiny import TinySpec, build_tiny

    texts = world.general_corpus(11, 1500)
    spec = TinySpec(
        hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=688, max_position_embeddings=1024
    )
    return build_tiny(root / "model", texts, vocab_size=vocab, spec=spec, seed=0)


def write_task(root: Path, n: int) -> Path:
    """Items: a document as context, its true next sentence and three from other documents as choices."""
    from tuneforge.demo import world

    rng = random.Random(0)
    docs = [d for d in world.general_corpus(12, 4 * n) if d.count(". ") >= 6]
    sentences = [s.strip() + "." for d in docs for s in d.split(". ") if len(s.split()) >= 4]
    rows = []
    for doc in docs[:n]:
        parts = [s.strip() for s in doc.split(". ") if s.strip()]
        context, answer = ". ".join(parts[:-1]) + ".", parts[-1].rstrip(".") + "."
        choices = [answer, *rng.sample([s for s in sentences if s != answer], 3)]
        rng.shuffle(choices)
        rows.append({"context": context, "choices": choices, "answer": choices.index(answer)})
    (root / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "task.yaml").write_text(
        "name: next-sentence\ntype: multiple_choice\ndata: items.jsonl\nchat: false\nprompt: '{{item.context}}'\n"
    )
    return root / "task.yaml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--vocab", type=int, default=4096)
    args = p.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.eval.harness import translate
    from tuneforge.eval.runner import evaluate_task
    from tuneforge.eval.tasks import load_tasks

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="tuneforge-eval-bench-") as tmp:
        root = Path(tmp)
        os.environ["TUNEFORGE_HOME"] = str(root / "home")  # the translated task's files go away with the run
        model_dir = build_model(root, args.vocab)
        (task,) = load_tasks([str(write_task(root, args.items))])
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, device="cpu", dtype="float32")
        config = translate(task).config
        assert config is not None
        lm_task = TaskManager(include_defaults=False).load([config])["tasks"][task.name]
        lm_task.build_all_requests()
        instances = lm_task.instances
        n_items = len(task.items)

        lengths = [len(tokenizer(r["context"])["input_ids"]) for r in task.items]
        outputs: dict[str, Any] = {}

        def run(side: str, i: int) -> float:
            t0 = time.perf_counter()
            if side == "tuneforge":
                outputs[side] = evaluate_task(model, tokenizer, task, batch_size=args.batch_size)
            else:
                outputs[side] = lm.loglikelihood(instances, disable_tqdm=True)
            return n_items / (time.perf_counter() - t0)

        run("tuneforge", -1), run("lm_eval", -1)  # warm-up: first calls pay one-off costs on both sides
        rates = interleaved(SIDES, args.repeats, run)
        ours = [ll for item in outputs["tuneforge"].items for ll in item["loglik"]]
        by_doc: dict[int, list[float]] = {}
        for inst, (ll, _) in zip(instances, outputs["lm_eval"]):
            by_doc.setdefault(inst.doc_id, []).append(ll)
        theirs = [ll for d in sorted(by_doc) for ll in by_doc[d]]
        summary = paired_summary(rates["tuneforge"], rates["lm_eval"])
        result = {
            "tuneforge_items_s": round(statistics.median(rates["tuneforge"]), 2),
            "lm_eval_items_s": round(statistics.median(rates["lm_eval"]), 2),
            "ratio": summary["ratio"],
            "ratio_spread": summary["spread"],
            "ratios": summary["ratios"],
            "items": n_items,
            "choices_per_item": 4,
            "context_tokens_median": statistics.median(lengths),
            "batch_size": args.batch_size,
            "threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "max_abs_loglik_diff": max(abs(a - b) for a, b in zip(ours, theirs)),
        }
    print(
        f"tuneforge {result['tuneforge_items_s']} items/s, lm-eval {result['lm_eval_items_s']} items/s: {describe(summary)}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
