"""What a recipe's step puts through the model — tokens, supervised positions, trainable and frozen weights — read
from the registry entry, the recipe and, when the data is prepared, the data itself (the longest sample, not a
guess); the memory and time models (:mod:`~tuneforge.planning.memory`, :mod:`~tuneforge.planning.timing`) take it
from here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.config import Recipe
from tuneforge.methods import PROMPT_LEARNING, MethodSpec, method_spec
from tuneforge.planning.memory import FP32, MemoryForecast, Workload, forecast_memory
from tuneforge.planning.shape import ModelShape, model_shape
from tuneforge.planning.timing import StepWork
from tuneforge.training.forward import sharing_pays


@dataclass(frozen=True)
class SampleSize:
    """One sample's tokens through the trained model and its positions that reach the vocabulary."""

    tokens: int
    supervised: int
    prompt: int = 0  # online methods: the longest prompt (the completion comes on top)
    source: str = "data.max_length"  # where the numbers came from
    rows: int = 0  # rows of a forward pass one sample takes (0: one per sequence)
    causal: bool = True  # False: a row's attention is a block mask, every (query, key) pair computed


def sample_size(recipe: Recipe, spec: MethodSpec, prepared: Any = None) -> SampleSize:
    """The largest sample of the prepared data, or the recipe's length bound when there is none yet.

    Packed rows are always padded to ``data.max_length``; preference pairs share their prompt (one row of prompt,
    chosen and rejected answer); online methods train on ``group`` sequences of prompt + ``max_new_tokens`` —
    in one row, the prompt computed once, where the rollout's layout shares it (:func:`shares_prompt`).
    """
    length = recipe.data.max_length
    seqs = spec.sequences_per_sample(recipe)
    if spec.generates:
        new = recipe.generation.max_new_tokens
        prompt = length - new
        sets = getattr(prepared, "train_sets", None)
        if sets:
            prompt = max(max((len(x) for x in s.ids), default=1) for s in sets)
        source = "data" if sets else "data.max_length"
        if shares_prompt(recipe, prompt, new, seqs):
            return SampleSize(prompt + seqs * new, seqs * new, prompt, source, rows=1, causal=False)
        return SampleSize(seqs * (prompt + new), seqs * new, prompt, source)
    pairs = getattr(prepared, "train_sources", None) if spec.sample == "pair" else None
    if pairs:
        sizes = []
        for p in pairs:
            lengths = p.seqs.lengths.reshape(-1, 2)
            sup = p.completion_tokens
            sizes.append(np.stack([lengths[:, 0] + sup[:, 1], sup.sum(1)], axis=1))
        both = np.concatenate(sizes)
        shared = recipe.model.attn_implementation in ("sdpa", "eager")  # one row, a block mask (training.pairs)
        rows = 1 if shared else 2
        return SampleSize(int(both[:, 0].max()), int(both[:, 1].max()), source="data", rows=rows, causal=not shared)
    plan = getattr(prepared, "plan", None)
    if spec.sample == "sequence" and plan is not None and len(plan.row_tokens):
        return SampleSize(length, int(plan.row_tokens.max()), source="data")
    return SampleSize(seqs * length, seqs * length)


def shares_prompt(recipe: Recipe, prompt: int, new: int, group: int) -> bool:
    """Whether a group's completions train in one row behind one copy of their prompt: the rollout does so where
    the attention takes block masks and one row costs less (``training.forward.sharing_pays``, at full length)."""
    if group < 2 or recipe.model.attn_implementation not in ("sdpa", "eager"):
        return False
    return sharing_pays(prompt, [new] * group, policy_shape(recipe).hidden)


def trainable_params(recipe: Recipe, spec: MethodSpec, shape: ModelShape) -> int:
    a = recipe.adapter
    head = shape.hidden + 1 if spec.value_head or spec.model == "sequence_classifier" else 0
    if a.kind == "full":
        return shape.params + (head if spec.value_head else 0)
    if a.kind in PROMPT_LEARNING:
        per_token = 2 * shape.layers * shape.kv_dim if a.kind == "prefix_tuning" else shape.hidden
        return a.num_virtual_tokens * per_token
    return shape.lora_params(a.r, a.target_modules, dora=a.kind == "dora") + head


def frozen_params(recipe: Recipe, spec: MethodSpec, shape: ModelShape) -> int:
    """Weights of frozen models held next to the policy: a reference copy (full fine-tuning), teachers, reward models."""
    total = shape.params if spec.reference(recipe) and recipe.adapter.kind == "full" else 0
    for path, classifier in spec.frozen_models(recipe):
        total += model_shape(path, classifier=classifier).params
    return total


def policy_shape(recipe: Recipe, spec: MethodSpec | None = None) -> ModelShape:
    spec = spec or method_spec(recipe.method)
    return model_shape(recipe.model.path, classifier=spec.model == "sequence_classifier")


def workload(
    recipe: Recipe,
    shape: ModelShape,
    *,
    micro: int,
    grad_accumulation: int,
    gradient_checkpointing: bool,
    precision: str,
    prepared: Any = None,
    data_parallel: int = 1,
    device: str = "cpu",
) -> Workload:
    """``device``: the device kind the run trains on (a CPU maps the checkpoint into memory while QLoRA quantizes)."""
    spec = method_spec(recipe.method)
    size = sample_size(recipe, spec, prepared)
    kv_tokens = rows = 0
    if spec.generates:
        per_replica = recipe.train.global_batch_size // data_parallel
        rows = min(recipe.generation.batch_size, per_replica * spec.sequences_per_sample(recipe))
        kv_tokens = rows * (size.prompt + recipe.generation.max_new_tokens)
    quantized = shape.linears if recipe.adapter.kind == "qlora" else ()  # the decoder's linears, in 4 bits
    return Workload(
        tokens=micro * size.tokens,
        supervised=micro * size.supervised,
        trainable=trainable_params(recipe, spec, shape),
        grad_accumulation=grad_accumulation,
        gradient_checkpointing=gradient_checkpointing,
        act_bytes=FP32 if precision == "fp32" else 2,
        frozen_params=frozen_params(recipe, spec, shape),
        generation_kv_tokens=kv_tokens,
        generation_rows=rows,
        frozen_base=recipe.adapter.kind != "full",
        quantized=sum(i * o for _, i, o in quantized),
        quantized_layers=len(quantized),
        largest_quantized=max((i * o for _, i, o in quantized), default=0),
        mapped_checkpoint=checkpoint_file_bytes(recipe.model.path, shape) if quantized and device == "cpu" else 0,
    )


def checkpoint_file_bytes(path: str, shape: ModelShape) -> int:
    """Size of the model's weight files (what loading maps into memory); fp32 weights when there are none here."""
    root = Path(path).expanduser()
    files = [f for f in root.iterdir() if f.suffix in (".safetensors", ".bin")] if root.is_dir() else []
    return sum(f.stat().st_size for f in files) or shape.params * FP32


def memory(recipe: Recipe, shape: ModelShape, **kw: Any) -> MemoryForecast:
    return forecast_memory(shape, workload(recipe, shape, **kw))


def step_work(
    recipe: Recipe,
    shape: ModelShape,
    *,
    per_replica: int,
    gradient_checkpointing: bool,
    prepared: Any = None,
    micro: int | None = None,
) -> StepWork:
    """One replica's optimizer step, `per_replica` samples in micro-batches of `micro` (default: one)."""
    spec = method_spec(recipe.method)
    size = sample_size(recipe, spec, prepared)
    seq_len = size.tokens / (size.rows or max(spec.sequences_per_sample(recipe), 1))
    extra = 1 if spec.reference(recipe) else 0
    extra += len(spec.frozen_models(recipe))  # a teacher's or reward model's forward (same size: an estimate)
    decode_tokens = decode_steps = 0
    if spec.generates:
        new = recipe.generation.max_new_tokens
        seqs = per_replica * spec.sequences_per_sample(recipe)
        decode_tokens = seqs * new
        decode_steps = -(-seqs // recipe.generation.batch_size) * new
    return StepWork(
        tokens=per_replica * size.tokens,
        supervised=per_replica * size.supervised,
        context=max(int(seq_len if not size.causal else seq_len // 2), 1),
        full_backward=recipe.adapter.kind == "full",
        gradient_checkpointing=gradient_checkpointing,
        extra_forwards=extra,
        decode_tokens=decode_tokens,
        decode_steps=decode_steps,
        adapter_params=adapter_params(recipe, shape),
        passes=-(-per_replica // micro) if micro else 1,
        trainable=trainable_params(recipe, spec, shape),
    )


def adapter_params(recipe: Recipe, shape: ModelShape) -> int:
    a = recipe.adapter
    if a.kind in ("lora", "dora", "qlora"):
        return shape.lora_params(a.r, a.target_modules, dora=a.kind == "dora")
    return 0
