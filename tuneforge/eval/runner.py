"""``evaluate(model, tokenizer, tasks)`` — every task's metrics with per-item statistics, one model at a time.

Prompts go through the training chat template (``template``, default the tokenizer's, which a tuneforge result
saves with the one it trained with), so the model is measured on exactly what it learned and what serving feeds
it. Multiple choice and perplexity are log-likelihoods (:mod:`tuneforge.eval.loglik`); generation is greedy and
stops at the template's end-of-turn token (:mod:`tuneforge.eval.generate`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tuneforge.data.templates import render_chat
from tuneforge.eval import loglik, metrics
from tuneforge.eval.generate import generate_from_ids, stop_ids
from tuneforge.eval.results import ModelResults, TaskResult
from tuneforge.eval.scores import MetricStats, bits_per_byte_of, macro_f1_of, mean_of, perplexity_of
from tuneforge.eval.tasks import GenerationTask, MultipleChoiceTask, PerplexityTask, Task, TaskError

Say = Callable[[str], None]


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[Task],
    *,
    template: str | None = None,
    batch_size: int = 32,
    label: str = "model",
    ref: str = "",
    info: dict[str, Any] | None = None,
    say: Say | None = None,
) -> ModelResults:
    """Evaluate one loaded model (eval mode, any device) on every task."""
    out = ModelResults(label=label, ref=ref or label, info=dict(info or {}))
    for task in tasks:
        if say:
            say(f"{label}: {task.name} ({len(task.items)} {task.type.replace('_', ' ')} items)")
        out.tasks[task.name] = evaluate_task(model, tokenizer, task, template=template, batch_size=batch_size)
    return out


def evaluate_task(
    model: Any, tokenizer: Any, task: Task, *, template: str | None = None, batch_size: int = 32
) -> TaskResult:
    t0 = time.perf_counter()
    template = template or getattr(tokenizer, "chat_template", None)
    config = task.config
    if getattr(config, "chat", False) and not template:
        raise TaskError(
            f"task {task.name}: chat prompts need a chat template, and this model's tokenizer has none "
            "(set `chat: false` in the task, or evaluate a model that ships one)"
        )
    if isinstance(config, MultipleChoiceTask):
        result = _multiple_choice(model, tokenizer, task, config, template, batch_size)
    elif isinstance(config, GenerationTask):
        result = _generation(model, tokenizer, task, config, template, batch_size)
    else:
        result = _perplexity(model, tokenizer, task, config, batch_size)
    if config.group_by is not None:
        _add_groups(task, result)
    result.seconds = time.perf_counter() - t0
    return result


def _result(task: Task, stats: dict[str, MetricStats], items: list[dict[str, Any]], notes: list[str]) -> TaskResult:
    return TaskResult(task.name, task.type, task.fingerprint, stats, items, spec=task.spec, notes=notes)


def _add_groups(task: Task, result: TaskResult) -> None:
    """Each metric again over each group's items (``exact_match/add``), groups in order of first appearance."""
    groups = [task.group(item) for item in task.items]
    for i, g in enumerate(groups):
        result.items[i]["group"] = g
    headline = dict(result.metrics)
    for g in dict.fromkeys(groups):
        mask = np.array([x == g for x in groups])
        for name, stats in headline.items():
            result.metrics[f"{name}/{g}"] = stats.restrict(mask)


# ---------------------------------------------------------------------------------- multiple choice


def encode_pair(tokenizer: Any, context: str, continuations: Sequence[str], *, chat: bool) -> loglik.Request:
    """Token ids of a context and its continuations, split as the model reads them.

    After a chat prompt, the prompt is tokenized alone — exactly what serving feeds — and each continuation is what
    follows it in the tokenization of the whole, or is tokenized on its own where the tokenizer merges across the
    boundary (as training does). Plain text follows lm-evaluation-harness: trailing whitespace moves from the
    context to the continuations, the tokenizer adds its own special tokens (bos), and an empty context is bos.
    """
    if chat:
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        wholes = tokenizer([context + c for c in continuations], add_special_tokens=False)["input_ids"]
        conts = [
            w[len(ctx) :] if w[: len(ctx)] == ctx else tokenizer(c, add_special_tokens=False)["input_ids"]
            for w, c in zip(wholes, continuations)
        ]
        return loglik.Request(ctx, conts)
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return loglik.Request([prefix], [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuations = [context[-spaces:] + c for c in continuations]
        context = context[:-spaces]
    special = not (tokenizer.bos_token and context.startswith(tokenizer.bos_token))
    ctx = tokenizer(context, add_special_tokens=special)["input_ids"]
    wholes = tokenizer([context + c for c in continuations], add_special_tokens=special)["input_ids"]
    return loglik.Request(ctx, [w[len(ctx) :] for w in wholes])


def _multiple_choice(
    model: Any, tokenizer: Any, task: Task, c: MultipleChoiceTask, template: str | None, batch_size: int
) -> TaskResult:
    requests = []
    for item in task.items:
        context = (
            render_chat(tokenizer, task.messages(item), template, add_generation_prompt=True)
            if c.chat
            else task.prompt_text(item)
        )
        requests.append(encode_pair(tokenizer, context, [c.delimiter() + x for x in task.choices(item)], chat=c.chat))
    _check_nonempty(task, requests)
    max_length = loglik.model_max_length(model)
    truncated = sum(len(r.context) + max(map(len, r.continuations)) - 1 > max_length for r in requests)
    scored = loglik.score(model, requests, batch_size=batch_size, max_length=max_length)
    items, hits, hits_norm = [], [], []
    for i, (item, row) in enumerate(zip(task.items, scored)):
        lls = np.array([s.logprob for s in row])
        lengths = np.array([float(len(x)) for x in task.choices(item)])  # characters, as lm-evaluation-harness
        gold, pred, pred_norm = task.gold(item), int(np.argmax(lls)), int(np.argmax(lls / lengths))
        hits.append(float(pred == gold))
        hits_norm.append(float(pred_norm == gold))
        items.append(
            {"id": task.item_id(i), "gold": gold, "pred": pred, "pred_norm": pred_norm, "loglik": lls.tolist()}
        )
    stats = {"acc": mean_of(hits), "acc_norm": mean_of(hits_norm)}
    notes = (
        [f"{truncated} item(s) longer than the model's {max_length} tokens were cut from the left"] if truncated else []
    )
    return _result(task, {m: stats[m] for m in c.metrics}, items, notes)


def _check_nonempty(task: Task, requests: Sequence[loglik.Request]) -> None:
    for i, r in enumerate(requests):
        if any(not x for x in r.continuations):
            raise TaskError(
                f"{task.data_path}:{task.lines[i]}: a choice tokenizes to nothing (expected non-empty choices)"
            )


# ---------------------------------------------------------------------------------------- generation


def _generation(
    model: Any, tokenizer: Any, task: Task, c: GenerationTask, template: str | None, batch_size: int
) -> TaskResult:
    if c.chat:
        prompts = [
            render_chat(tokenizer, task.messages(item), template, add_generation_prompt=True) for item in task.items
        ]
        encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        stops = stop_ids(tokenizer, template)
    else:
        encoded = tokenizer([task.prompt_text(item) for item in task.items])["input_ids"]
        stops = stop_ids(tokenizer, None)
    preds = generate_from_ids(
        model, tokenizer, encoded, max_new_tokens=c.max_new_tokens, batch_size=batch_size, stops=stops
    )
    refs = [task.reference(item) for item in task.items]
    stats: dict[str, MetricStats] = {}
    notes: list[str] = []
    for spec in c.metrics:
        name = spec.name or spec.type
        if name in stats:
            raise TaskError(f"task {task.name}: two metrics are named {name!r}; give one a `name:`")
        stats[name] = generation_metric(spec, preds, refs, task, notes)
    items = [
        {
            "id": task.item_id(i),
            "prediction": p,
            "reference": r,
            "scores": {k: s for k, s in ((k, m.item_scores()[i]) for k, m in stats.items()) if s is not None},
        }
        for i, (p, r) in enumerate(zip(preds, refs))
    ]
    return _result(task, stats, items, notes)


def generation_metric(spec: Any, preds: list[str], refs: list[str], task: Task, notes: list[str]) -> MetricStats:
    """One generation metric's per-item statistics (``spec`` is a metric entry of the task file)."""
    kind = spec.type
    if kind == "exact_match":
        return mean_of([float(metrics.exact_match(p, r, lowercase=spec.lowercase)) for p, r in zip(preds, refs)])
    if kind == "regex":
        return mean_of(metrics.regex_scores(preds, refs, spec.pattern, lowercase=spec.lowercase))
    if kind == "macro_f1":
        labels = _labels(spec.labels, task)
        norm = metrics.normalize_answer
        refs_n = [norm(r) for r in refs]
        if labels is not None:
            labels = [norm(x) for x in labels]
            unknown = sorted(set(refs_n) - set(labels))
            if unknown:
                raise TaskError(f"task {task.name}: macro_f1: references not in the label set: {unknown[:5]}")
        return macro_f1_of([norm(p) for p in preds], refs_n, labels)
    if kind.startswith("rouge_"):
        return mean_of(
            metrics.rouge_scores(preds, refs, {"rouge_1": "rouge1", "rouge_2": "rouge2", "rouge_l": "rougeL"}[kind])
        )
    if kind == "bleu":
        return MetricStats("bleu", np.asarray(metrics.bleu_statistics(preds, refs), dtype=np.float64))
    return _grader_metric(spec, preds, task, notes)


def _labels(labels: list[str] | str | None, task: Task) -> list[str] | None:
    if labels is None or isinstance(labels, list):
        return labels
    path = task.base_dir / labels
    if not path.is_file():
        raise TaskError(f"task {task.name}: macro_f1.labels: no such file {path} (expected one label per line)")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _grader_metric(spec: Any, preds: list[str], task: Task, notes: list[str]) -> MetricStats:
    """Any grader of the grader engine scores each answer against its record (``{{item.…}}``, ``{{sample.…}}``)."""
    from tuneforge.rewards.graders import load_grader

    config = spec.grader
    if isinstance(config, str):
        config = str(task.base_dir / config)
    grader = load_grader(
        config, origin=f"task {task.name}: metrics.{spec.name or 'grader'}.grader" if isinstance(config, dict) else None
    )
    results = grader.evaluate_batch([{"output_text": p} for p in preds], task.items)
    errors = [r.error for r in results if r.error is not None]
    if errors:
        notes.append(f"{spec.name or grader.name}: {len(errors)} item(s) scored 0 on a grader error, e.g. {errors[0]}")
    return mean_of([r.score for r in results])


# ---------------------------------------------------------------------------------------- perplexity


def _perplexity(model: Any, tokenizer: Any, task: Task, c: PerplexityTask, batch_size: int) -> TaskResult:
    """Every token of each text, conditioned on bos (or eos when there is none), in model-length windows."""
    max_length = loglik.model_max_length(model)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    texts = [task.text(item) for item in task.items]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    requests, owner = [], []
    for i, ids in enumerate(encoded):
        windows = loglik.rolling_requests(ids, prefix, max_length)
        requests += windows
        owner += [i] * len(windows)
    scored = loglik.score(model, requests, batch_size=batch_size, max_length=max_length)
    nll = np.zeros(len(texts))
    for i, row in zip(owner, scored):
        nll[i] -= row[0].logprob
    tokens = [len(ids) for ids in encoded]
    n_bytes = [len(t.encode("utf-8")) for t in texts]
    stats = {"perplexity": perplexity_of(nll, tokens), "bits_per_byte": bits_per_byte_of(nll, n_bytes)}
    items = [{"id": task.item_id(i), "nll": float(nll[i]), "tokens": tokens[i]} for i in range(len(texts))]
    return _result(task, {m: stats[m] for m in c.metrics}, items, [])
