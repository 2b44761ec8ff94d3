"""``tuneforge demo``: the whole product on an embedded default, offline, on a laptop CPU.

1. Build a base model once (cached): a BPE tokenizer trained here and a small Llama pre-trained with
   tuneforge's own ``cpt`` method on a generated general-skills corpus.
2. Fine-tune it on a generated support-ticket task (120 leaf categories) three times: fully on domain data
   alone, fully on domain data mixed 75/25 with general data, and with LoRA on the same mixture (the adapter of
   ``recipes/sft-lora.yaml``). The fully fine-tuned mixed model is also kept at ``demo/<size>/mixed``, a fixed
   path recipes can name (the distillation example's teacher).
3. Evaluate the base and every result (domain macro-F1, general-skill accuracy), print the table, write a
   report with plots, log everything to MLflow and register the mixed model.

Every number is measured in this run; the report's verdict is read off them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tuneforge.demo import tickets, world
from tuneforge.paths import runs_dir, state_dir

# 2: a smaller base (hidden 128) trained with more, smaller steps, so the demo fits its time budget.
# 3: help centre page paths in the corpus (world.page_indexes): the base can write the tokens labels are made of.
DEMO_VERSION = 3


@dataclass(frozen=True)
class DemoSize:
    """How big each part of the demo is; ``quick`` is for smoke tests.

    The full size must run, first time included, in under ten minutes on a two-core CPU (about two of them go to
    the install), and nearly all of it is training: tokens times parameters. Measured on this demo: general
    recall comes with optimizer steps more than with tokens (800 steps of 8 rows reach about 0.8 general
    accuracy at hidden size 128; 300 steps of 16 reached 0.4 at 192, 1000 steps of 4 reached 0.6), and a
    hidden-128 model costs about 0.6 of a 192 one per token. Fine-tuning it needs a higher learning rate: 250
    steps of 8 at 3e-3 reach about 0.95 ticket macro-F1, 150 steps of 16 at 1e-3 only 0.2. LoRA (rank 16, all
    linear layers) on the same steps learned best at the same 3e-3 (0.20; 1e-3: 0.00, 1e-2: 0.01) and matched
    full fine-tuning only once it trained the embedding too (``LORA``: 0.97).
    """

    corpus_docs: int = 6000
    page_docs: int = 200  # help centre page indexes in the corpus (world.page_indexes): paths the base can write
    general_chat: int = 6000
    ticket_train: int = 3000
    general_eval: int = 300
    ticket_eval: int = 600
    ticket_pairs: int = 2000  # preference pairs for the DPO and reward-model recipes
    ticket_prompts: int = 1200  # prompt-only records for the GRPO and PPO recipes
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 4
    pretrain_steps: int = 800
    pretrain_batch: int = 8
    pretrain_lr: float = 6e-3
    finetune_steps: int = 250
    finetune_batch: int = 8
    finetune_lr: float = 3e-3
    lora_lr: float = 3e-3
    max_length: int = 256


FULL = DemoSize()
QUICK = DemoSize(
    corpus_docs=300,
    page_docs=10,
    general_chat=300,
    ticket_train=300,
    general_eval=40,
    ticket_eval=60,
    ticket_pairs=240,
    ticket_prompts=120,
    vocab_size=512,
    hidden_size=64,
    num_layers=2,
    pretrain_steps=20,
    pretrain_batch=8,
    finetune_steps=10,
    finetune_batch=8,
)

MIXED_MODEL_NAME = "tuneforge-demo-tickets"
ROW_LABELS = {"base": "base", "domain_only": "domain only", "mixed": "mixed 75/25", "lora_mixed": "LoRA, mixed 75/25"}
GENERAL_TASK, TICKETS_TASK = "general-skills", "tickets"  # the evaluation's task names (eval_tasks)
# What the verdict claims, each checked with a paired bootstrap over the evaluation items: (candidate, baseline,
# task, metric) — mixing kept more general skill than domain-only fine-tuning, and LoRA against full fine-tuning
# on the same mixture, on tickets and on general skills.
CLAIMS = (
    ("mixed", "domain_only", GENERAL_TASK, "exact_match"),
    ("lora_mixed", "mixed", TICKETS_TASK, "macro_f1"),
    ("lora_mixed", "mixed", GENERAL_TASK, "exact_match"),
)
# What the base model does not depend on (fine-tuning, evaluation and the data only later steps read): left out
# of its cache key, so changing one of them rebuilds nothing.
NOT_IN_BASE_KEY = (
    "ticket_train",
    "general_eval",
    "ticket_eval",
    "ticket_pairs",
    "ticket_prompts",
    "finetune_steps",
    "finetune_batch",
    "finetune_lr",
    "lora_lr",
)
# The LoRA row's adapter: the one recipes/sft-lora.yaml ships (tests/test_demo.py keeps the two the same). It also
# trains the embedding (tied to the LM head): on this hidden-128 base, rank-16 LoRA alone reached 0.20 ticket
# macro-F1 in the demo's 250 steps (rank 64: 0.73) against full fine-tuning's 0.97; with the embedding, 0.97.
LORA = {
    "kind": "lora",
    "r": 16,
    "alpha": 32,
    "dropout": 0.05,
    "target_modules": "all-linear",
    "modules_to_save": ["embed_tokens"],
}


def _write_jsonl(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def write_data(root: Path, size: DemoSize) -> dict[str, Path]:
    """Generate the bundled data sets as ordinary JSONL files a user can open and reuse in recipes."""
    data = root / "data"
    return {
        "general_corpus": _write_jsonl([{"text": t} for t in pretraining_corpus(size)], data / "general_corpus.jsonl"),
        "general_chat": _write_jsonl(world.general_chat_examples(2, size.general_chat), data / "general_chat.jsonl"),
        "tickets": _write_jsonl(tickets.ticket_examples(3, size.ticket_train), data / "tickets.jsonl"),
        "general_eval": _write_jsonl(world.general_eval_items(4, size.general_eval), data / "general_eval.jsonl"),
        "tickets_eval": _write_jsonl(tickets.ticket_eval_items(5, size.ticket_eval), data / "tickets_eval.jsonl"),
        "tickets_preferences": _write_jsonl(
            tickets.ticket_preferences(6, size.ticket_pairs), data / "tickets_preferences.jsonl"
        ),
        "tickets_prompts": _write_jsonl(tickets.ticket_prompts(7, size.ticket_prompts), data / "tickets_prompts.jsonl"),
    }


def pretraining_corpus(size: DemoSize) -> list[str]:
    """The base's raw-text corpus: the general-skills documents with help centre page indexes spread among them."""
    pages = iter(world.page_indexes(8, size.page_docs))
    every = max(1, size.corpus_docs // max(1, size.page_docs))
    docs = []
    for i, doc in enumerate(world.general_corpus(1, size.corpus_docs), 1):
        docs.append(doc)
        if i % every == 0:
            docs.extend(itertools.islice(pages, 1))
    return docs + list(pages)


def tokenizer_texts(corpus: list[str], chats: list[dict]) -> list[str]:
    """What the base's BPE tokenizer is trained on: the corpus, some general chats and some tickets' text."""
    texts = list(corpus)
    texts += [" ".join(m["content"] for m in c["messages"]) for c in chats[:2000]]
    texts += [" ".join(m["content"] for m in c["messages"]) for c in tickets.ticket_examples(99, 500)]
    return texts


def base_key(size: DemoSize) -> str:
    fields = {k: v for k, v in asdict(size).items() if k not in NOT_IN_BASE_KEY}
    return hashlib.sha256(json.dumps({"v": DEMO_VERSION, **fields}, sort_keys=True).encode()).hexdigest()[:12]


def keep_mixed(model_dir: Path, root: Path) -> Path:
    """Copy the mixed fine-tuned model to ``root/mixed``, replacing the previous run's, and return that path."""
    target = root / "mixed"
    staging = root / "mixed.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(model_dir, staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def demo_recipe(
    name: str,
    base: Path,
    sources: list[dict],
    out: Path,
    size: DemoSize,
    *,
    method: str,
    steps: int,
    batch: int,
    lr: float,
    register: str | None = None,
    adapter: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The recipe of one of the demo's training runs: pre-training (``cpt``) or a table row's fine-tune (``sft``)."""
    return {
        "name": name,
        "method": method,
        "model": {"path": str(base)},
        "data": {"sources": sources, "max_length": size.max_length, "val_fraction": 0.02},
        "adapter": adapter or {"kind": "full"},
        "train": {
            "max_steps": steps,
            "global_batch_size": batch,
            "lr": lr,
            "warmup_steps": max(1, steps // 20),
            "schedule": "cosine",
            "min_lr_ratio": 0.1,
            "log_every": max(1, steps // 10),
            "eval_every": max(1, steps // 3),
            "weight_decay": 0.01,
        },
        "tracking": {"experiment": "tuneforge-demo", "run_name": name, "register_as": register},
        # an adapter is also saved merged into its base: the evaluation loads plain full weights for every row
        "output": {"dir": str(out), "merge": adapter is not None},
    }


def build_base(root: Path, files: dict[str, Path], size: DemoSize, rebuild: bool, say: Any) -> tuple[Path, Any]:
    """Train the tokenizer and pre-train the base once; later runs reuse it (keyed by the demo's sizes)."""
    import tuneforge
    from tuneforge.models.tiny import TinySpec, build_tiny

    key = base_key(size)
    base = root / "base"
    marker = base / "tuneforge-demo.json"
    if marker.exists() and json.loads(marker.read_text()).get("key") == key and not rebuild:
        say(f"base model: cached at {base}")
        return base, None
    shutil.rmtree(base, ignore_errors=True)
    say("base model: training a BPE tokenizer and pre-training a small Llama on the general-skills corpus")
    corpus = [json.loads(line)["text"] for line in files["general_corpus"].read_text().splitlines()]
    chats = [json.loads(line) for line in files["general_chat"].read_text().splitlines()]
    texts = tokenizer_texts(corpus, chats)
    spec = TinySpec(
        hidden_size=size.hidden_size,
        num_layers=size.num_layers,
        num_heads=max(2, size.hidden_size // 32),
        num_kv_heads=max(1, size.hidden_size // 96),
        intermediate_size=size.hidden_size * 8 // 3 // 16 * 16,
        max_position_embeddings=size.max_length,
    )
    init = build_tiny(root / f"init-{key}", texts, vocab_size=size.vocab_size, spec=spec, seed=0)
    sources = [
        {"path": str(files["general_corpus"]), "name": "corpus", "weight": 0.5},
        {"path": str(files["general_chat"]), "name": "general_chat", "weight": 0.5},
    ]
    result = tuneforge.train(
        demo_recipe(
            "demo-pretrain",
            init,
            sources,
            root / f"pretrain-{key}",
            size,
            method="cpt",
            steps=size.pretrain_steps,
            batch=size.pretrain_batch,
            lr=size.pretrain_lr,
        ),
        progress=True,
    )
    shutil.copytree(result.output_dir, base)
    shutil.rmtree(init, ignore_errors=True)
    marker.write_text(json.dumps({"key": key, "size": asdict(size), "pretrain_run": str(result.run_dir)}))
    return base, result


def eval_tasks(files: dict[str, Path], size: DemoSize) -> list[Any]:
    """What every row is measured on, with tuneforge's evaluation: general skills and the held-out tickets.

    The general items are the bundled ``general-skills`` task's first ``size.general_eval`` (the same stream the
    demo writes to ``general_eval.jsonl``), so ``tuneforge eval MODEL --tasks general-skills`` scores the items of
    the full demo's general column; they are grouped by skill for the per-skill accuracy.
    """
    from tuneforge.eval.bundled import SKILLS_ITEMS
    from tuneforge.eval.tasks import load_tasks, task_from_config

    if size.general_eval > SKILLS_ITEMS:
        raise ValueError(f"general_eval={size.general_eval}: the bundled general-skills task has {SKILLS_ITEMS} items")
    ticket_task = {
        "name": TICKETS_TASK,
        "type": "generation",
        "data": str(files["tickets_eval"]),
        "max_new_tokens": 12,
        "metrics": [{"type": "macro_f1", "labels": tickets.leaf_labels()}, "exact_match"],
    }
    return [
        *load_tasks([GENERAL_TASK], limit=size.general_eval),
        task_from_config(ticket_task, base_dir=files["tickets_eval"].parent),
    ]


def table_row(role: str, results: Any) -> dict[str, Any]:
    """A row of the demo's table from a model's evaluation results (:class:`tuneforge.eval.results.ModelResults`):
    general-skill accuracy (overall and per skill), ticket macro-F1 over all 120 leaf labels and exact match."""
    values = results.flat_values()
    per_skill = f"{GENERAL_TASK}/exact_match/"
    return {
        "model": ROW_LABELS[role],
        "role": role,
        "general_accuracy": values[f"{GENERAL_TASK}/exact_match"],
        "domain_macro_f1": values[f"{TICKETS_TASK}/macro_f1"],
        "domain_accuracy": values[f"{TICKETS_TASK}/exact_match"],
        "skills": {k.removeprefix(per_skill): v for k, v in values.items() if k.startswith(per_skill)},
    }


def claim_comparisons(results: dict[str, Any], seed: int = 0) -> list[tuple[str, str, Any]]:
    """The paired bootstraps behind the verdict's claims, as ``(candidate role, baseline role, Comparison)``."""
    from tuneforge.eval.bootstrap import paired

    out = []
    for cand, base, task, metric in CLAIMS:
        if cand in results and base in results:
            a, b = results[cand].tasks[task].metrics[metric], results[base].tasks[task].metrics[metric]
            out.append((cand, base, paired(a, b, task=task, metric=metric, seed=seed)))
    return out


def run_demo(quick: bool = False, rebuild: bool = False) -> dict[str, Any]:
    """Run the demo end to end; returns the table and where the report is."""
    from rich.console import Console

    import tuneforge
    from tuneforge.demo.report import comparison_sentence, format_table, verdict, write_report

    console = Console(stderr=True)
    say = lambda text: console.print(f"[bold cyan]demo[/] {text}")  # noqa: E731
    t0 = time.perf_counter()
    size = QUICK if quick else FULL
    root = state_dir() / "demo" / ("quick" if quick else "full")
    files = write_data(root, size)
    run_dir = runs_dir() / f"demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    base, pretrain = build_base(root, files, size, rebuild, say)
    from tuneforge.service.base_models import add_model

    add_model("tuneforge-demo", base)  # the service's short name for it: `model="tuneforge-demo"`

    domain_src = {"path": str(files["tickets"]), "name": "tickets"}
    mixed_sources = [
        dict(domain_src, weight=0.75),
        {"path": str(files["general_chat"]), "name": "general", "weight": 0.25},
    ]
    runs = {}
    for name, sources, register, adapter, lr in (
        ("domain_only", [domain_src], None, None, size.finetune_lr),
        ("mixed", mixed_sources, MIXED_MODEL_NAME, None, size.finetune_lr),
        ("lora_mixed", mixed_sources, None, LORA, size.lora_lr),
    ):
        say(f"fine-tuning: {ROW_LABELS[name]}")
        runs[name] = tuneforge.train(
            demo_recipe(
                f"demo-{name}",
                base,
                sources,
                run_dir / name,
                size,
                method="sft",
                steps=size.finetune_steps,
                batch=size.finetune_batch,
                lr=lr,
                register=register,
                adapter=adapter,
            ),
            progress=True,
        )

    mixed_dir = keep_mixed(Path(runs["mixed"].output_dir), root)

    say("evaluating the base and the fine-tuned models")
    from tuneforge.eval.api import build_report, evaluate_model
    from tuneforge.eval.report import write_report as write_eval_report

    tasks = eval_tasks(files, size)
    models = {"base": base, **{role: Path(r.merged_dir or r.output_dir) for role, r in runs.items()}}
    results = {
        role: evaluate_model(str(path), tasks, batch_size=64, label=ROW_LABELS[role], say=say)
        for role, path in models.items()
    }
    table = [table_row(role, res) for role, res in results.items()]
    comparisons = claim_comparisons(results)

    curves = {f"fine-tune: {ROW_LABELS[role]}": [(h["step"], h["loss"]) for h in r.history] for role, r in runs.items()}
    if pretrain is not None:
        curves = {"pre-training (cpt)": [(h["step"], h["loss"]) for h in pretrain.history], **curves}
    # tuneforge eval's own report of every fine-tune against the base (intervals, verdicts, chart, per-item results)
    eval_report = build_report(
        [results[role] for role in runs], results["base"], title="tuneforge demo: every fine-tune against the base"
    )
    eval_paths = write_eval_report(eval_report, run_dir / "eval")
    paths = write_report(
        run_dir,
        table,
        curves,
        title="tuneforge demo: fine-tuning with and without data mixing, fully and with LoRA",
        comparisons=[(ROW_LABELS[c], ROW_LABELS[b], r) for c, b, r in comparisons],
        eval_report=eval_paths["markdown"].relative_to(run_dir),
    )
    (run_dir / "table.json").write_text(json.dumps(table, indent=2))
    _log_demo(run_dir, table, paths, runs, comparisons, eval_paths)
    console.print(format_table(table))
    console.print(verdict(table))
    for cand, base_role, r in comparisons:
        console.print(comparison_sentence(ROW_LABELS[cand], ROW_LABELS[base_role], r))
    say(f"report: {paths['report']}  ({time.perf_counter() - t0:.0f} s)")
    return {
        "table": table,
        "report": paths["report"],
        "eval_report": eval_paths["json"],
        "comparisons": comparisons,
        "run_dir": run_dir,
        "base_cached": pretrain is None,
        "token_cache_hits": {k: all(d["cache_hit"] for d in r.data.values()) for k, r in runs.items()},
        "mixed_version": runs["mixed"].model_version,
        "mix": runs["mixed"].mix,
        "mixed_dir": mixed_dir,
        "data": files,
        "seconds": time.perf_counter() - t0,
    }


def _log_demo(
    run_dir: Path,
    table: list[dict],
    paths: dict[str, Path],
    runs: dict[str, Any],
    comparisons: list[tuple[str, str, Any]],
    eval_paths: dict[str, Path],
) -> None:
    """One MLflow run holds the comparison: the table's numbers and the claims' paired differences (with their
    95 % intervals) as metrics, the demo's report and tuneforge eval's report (under ``eval/``) as artifacts."""
    import math

    from tuneforge.tracking.mlflow_tracker import Tracker

    params = {"runs": {k: str(v.run_dir) for k, v in runs.items()}}
    with Tracker.start(
        experiment="tuneforge-demo",
        run_name=f"{run_dir.name}-report",
        params=params,
        tags={"tuneforge.kind": "demo-report"},
    ) as tracker:
        for row in table:
            metrics = {f"{row['role']}/{k}": float(v) for k, v in row.items() if isinstance(v, (int, float))}
            metrics.update({f"{row['role']}/skill/{k}": float(v) for k, v in row["skills"].items()})
            tracker.log_metrics(metrics, step=0)
        for cand, base, r in comparisons:
            key = f"{cand}_vs_{base}/{r.task}/{r.metric}"
            deltas = {f"delta/{key}": r.delta, f"delta_low/{key}": r.low, f"delta_high/{key}": r.high}
            tracker.log_metrics({k: v for k, v in deltas.items() if math.isfinite(v)}, step=0)
        for path in paths.values():
            tracker.log_artifact(path)
        tracker.log_artifact(run_dir / "table.json")
        for path in eval_paths.values():
            tracker.log_artifact(path, "eval")
