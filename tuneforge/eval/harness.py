"""lm-evaluation-harness as a second engine: its HF backend on the same model or adapter, local tasks, offline.

``tuneforge eval MODEL --harness lm-eval --tasks …`` hands the model to lm-eval 0.4 (``pip install
'tuneforge[eval]'``): the base weights as ``pretrained=``, the adapter as ``peft=``, the tokenizer tuneforge
trained with — and its chat template. Its results land in the same report, with a paired bootstrap against a
baseline for every per-item metric (``acc``, ``acc_norm``, ``exact_match``…); corpus-level ones lm-eval
aggregates itself (BLEU, F1) are reported without an interval.

A task is one of

* an lm-eval task YAML file (``task: …``), its directory put on lm-eval's include path (so ``include:`` works);
* a tuneforge ``multiple_choice`` task file or bundled name, translated into an lm-eval task over the same
  records — the same prompts and choices scored by an independent implementation (plain-text tasks agree with
  tuneforge's engine to float rounding; with a chat template lm-eval also scores the line break that ends the
  generation prompt, a per-item constant that leaves ``acc`` as it is);
* any other name, looked up among lm-eval's own tasks (whose data must already be in the local datasets cache:
  nothing is downloaded).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tuneforge.errors import TuneforgeError
from tuneforge.eval.results import ModelResults, TaskResult
from tuneforge.eval.scores import MetricStats, mean_of
from tuneforge.eval.tasks import MultipleChoiceTask, Task, TaskError, load_tasks

Say = Callable[[str], None]


@dataclass
class HarnessTask:
    """One task as lm-eval takes it: a name on the include path, or an inline config (translated)."""

    name: str
    spec: str
    config: dict[str, Any] | None = None  # an inline lm-eval config (translated from a tuneforge task)
    include: str | None = None  # the directory of an lm-eval YAML
    chat: bool = False
    system: str | None = None
    limit: int | None = None


@dataclass
class Prepared:
    tasks: list[HarnessTask] = field(default_factory=list)

    @property
    def include_paths(self) -> list[str]:
        return list(dict.fromkeys(t.include for t in self.tasks if t.include))


def _require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise TuneforgeError(
            "--harness lm-eval needs lm-evaluation-harness: pip install 'tuneforge[eval]' (lm_eval[hf] 0.4)"
        ) from None
    return lm_eval


def prepare_tasks(specs: Sequence[str], *, limit: int | None = None) -> Prepared:
    """Sort the task arguments into lm-eval YAMLs, translated tuneforge tasks and lm-eval names (no model needed)."""
    out = Prepared()
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_file() and _is_lm_eval_yaml(path):
            name = yaml.safe_load(path.read_text(encoding="utf-8"))["task"]
            out.tasks.append(HarnessTask(str(name), spec, include=str(path.resolve().parent), limit=limit))
            continue
        try:
            tasks = load_tasks([spec], limit=limit)
        except TaskError as e:
            if path.exists() or "unknown task" not in str(e):
                raise
            out.tasks.append(HarnessTask(spec, spec, limit=limit))  # an lm-eval task name
            continue
        out.tasks += [translate(t) for t in tasks]
    return out


def _is_lm_eval_yaml(path: Path) -> bool:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return False  # reported by the tuneforge loader, with the line
    return isinstance(raw, dict) and "task" in raw and "type" not in raw


def translate(task: Task) -> HarnessTask:
    """A tuneforge multiple-choice task as an inline lm-eval task over the same rendered prompts and choices."""
    c = task.config
    if not isinstance(c, MultipleChoiceTask):
        raise TaskError(
            f"task {task.name}: --harness lm-eval runs tuneforge's multiple_choice tasks and lm-eval's own task "
            f"YAMLs; run this {task.type} task with tuneforge's engine (without --harness)"
        )
    docs = []
    for i, item in enumerate(task.items):
        if c.chat:
            messages = task.messages(item)
            if [m["role"] for m in messages if m["role"] != "system"] != ["user"]:
                raise TaskError(
                    f"{task.data_path}:{task.lines[i]}: lm-eval renders one user message (and a system prompt); "
                    "this record has a longer conversation"
                )
            query = messages[-1]["content"]
        else:
            query = task.prompt_text(item)
        docs.append({"query": query, "choices": task.choices(item), "gold": task.gold(item)})
    from tuneforge.paths import cache_dir

    folder = cache_dir("lm-eval") / f"{task.name}-{task.fingerprint}"
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "docs.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    config = {
        "task": task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "datasets")},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{query}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "gold",
        "target_delimiter": c.delimiter(),
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in c.metrics],
        "metadata": {"version": 1},
    }
    systems = (
        {m[0]["content"] if m[0]["role"] == "system" else None for m in map(task.messages, task.items)}
        if c.chat
        else {None}
    )
    if len(systems) > 1:
        raise TaskError(f"task {task.name}: lm-eval takes one system prompt per run; the records have {len(systems)}")
    return HarnessTask(task.name, task.spec, config=config, chat=c.chat, system=systems.pop())


def make_lm(ref: Any, *, batch_size: int, device: str) -> Any:
    """lm-eval's HF model for a resolved reference: base + ``peft=`` adapter, tuneforge's tokenizer and template."""
    _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    from tuneforge.eval.api import pick_device

    try:
        lm = HFLM(
            pretrained=ref.base,
            peft=ref.adapter,
            tokenizer=ref.tokenizer,
            dtype="float32",
            device=pick_device(device),
            batch_size=batch_size,
        )
    except (OSError, ValueError) as e:
        raise TuneforgeError(f"lm-eval cannot load {ref.ref}: {e}") from None
    if ref.chat_template and lm.tokenizer.chat_template != ref.chat_template:
        lm.tokenizer.chat_template = ref.chat_template  # the registry's prompt version: what training used
    return lm


def run_lm_eval(
    ref: Any, prepared: Prepared, *, batch_size: int = 32, device: str = "auto", say: Say | None = None, lm: Any = None
) -> ModelResults:
    """Run every prepared task on one model with lm-eval; per-item metrics become tuneforge statistics."""
    lm_eval = _require_lm_eval()
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only; a missing one fails instead of downloading
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if say:
        say(f"lm-eval: loading {ref.label} ({ref.base}{' + peft=' + ref.adapter if ref.adapter else ''})")
    lm = lm or make_lm(ref, batch_size=batch_size, device=device)
    # lm-eval's own task index (thousands of files) is read only when a task is named from it
    builtin = any(t.config is None and t.include is None for t in prepared.tasks)
    manager = TaskManager(include_path=prepared.include_paths or None, include_defaults=builtin)
    out = ModelResults(ref.label, ref.ref, info={"base": ref.base, "adapter": ref.adapter, "engine": "lm-eval"})
    for chat in (False, True):  # lm-eval applies a chat template to a whole run, not per task
        group = [t for t in prepared.tasks if t.chat == chat]
        if not group:
            continue
        for t in group:
            if say:
                say(f"lm-eval: {ref.label}: {t.name}")
            try:
                raw = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=[t.config if t.config is not None else t.name],
                    task_manager=manager,
                    limit=t.limit,
                    log_samples=True,
                    apply_chat_template=chat,
                    system_instruction=t.system,
                    bootstrap_iters=0,
                )
            except (KeyError, ValueError, FileNotFoundError, ConnectionError) as e:
                raise TuneforgeError(f"lm-eval could not run task {t.name!r}: {type(e).__name__}: {e}") from None
            if raw is None:
                raise TuneforgeError(f"lm-eval returned no results for task {t.name!r}")
            for name in raw.get("samples", {}):
                if name in out.tasks:
                    raise TuneforgeError(f"two tasks are named {name!r}; rename one (its `task:` or `name:`)")
                out.tasks[name] = _task_result(name, t.spec, raw)
    return out


def _task_result(name: str, spec: str, raw: dict[str, Any]) -> TaskResult:
    samples = sorted(raw["samples"][name], key=lambda s: s["doc_id"])
    results = raw["results"].get(name, {})
    higher = raw.get("higher_is_better", {}).get(name, {})
    stats: dict[str, MetricStats] = {}
    values_only: dict[str, float] = {}
    for metric, better in higher.items():
        per_item = [s.get(metric) for s in samples]
        if per_item and all(isinstance(v, (int, float)) for v in per_item):
            stats[metric] = mean_of([float(v) for v in per_item], bool(better))
        else:
            key = next((k for k in results if k.split(",")[0] == metric), None)
            if key is not None and isinstance(results[key], (int, float)):
                values_only[metric] = float(results[key])
    digest = hashlib.sha256()
    for s in samples:
        digest.update(f"{s.get('doc_hash')}:{s.get('prompt_hash')}:{s.get('target_hash')}".encode())
    items = [
        {"id": str(s["doc_id"]), "target": s.get("target"), "responses": _responses(s.get("filtered_resps"))}
        for s in samples
    ]
    return TaskResult(
        name, "lm-eval", digest.hexdigest()[:16], stats, items, spec=spec, engine="lm-eval", values_only=values_only
    )


def _responses(resps: Any) -> Any:
    """``[(loglik, is_greedy), …]`` → ``[loglik, …]``; generated text as it is."""
    if isinstance(resps, list) and resps and all(isinstance(r, (tuple, list)) and len(r) == 2 for r in resps):
        return [float(r[0]) for r in resps]
    return resps
