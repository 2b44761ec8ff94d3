"""What the pair methods share (``method: dpo`` and ``method: reward``): prepared pairs, batching, accumulation.

A *sample* is one (chosen, rejected) pair with a global index, and it weighs 1: ``loss_tokens(indices)`` is the
number of pairs, so a step's loss is the mean over its pairs however they are split into micro-batches or
replicas. Both answers of a pair go through the model in one row with the prompt computed once (a block
attention mask keeps each answer blind to the other; checked against two separate rows when the task is
built), and only the scored positions are projected. See ``benchmarks/methods_throughput.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from tuneforge.config import Recipe
from tuneforge.data.preference import PairBatch, PairSource, PairTokens, collate_pairs, tokenize_preference_sources
from tuneforge.data.sampler import build_plan
from tuneforge.objectives.logprobs import token_logprobs
from tuneforge.training.build import load_inputs
from tuneforge.training.forward import logits_at
from tuneforge.training.task import MetricSums, PreparedBase, StepOutput, TaskBase, held_out_means

MAX_EVAL_PAIRS = 512  # validation pairs scored per source


@dataclass
class PairsPrepared(PreparedBase):
    """Validated, tokenized pairs and their plan (no model yet); each method family adds ``make_task``."""

    pairs: list[PairTokens] = field(default_factory=list)

    @property
    def train_sources(self) -> list[PairSource]:
        return [p.train for p in self.pairs]

    @property
    def val_sources(self) -> dict[str, PairSource]:
        return {p.name: p.val for p in self.pairs if p.val is not None}


def prepare_pairs(recipe: Recipe) -> tuple[Any, list[PairTokens], Any]:
    """Validate every record, tokenize pairs (through the cache) and plan every step: (inputs, pairs, plan)."""
    inputs = load_inputs(recipe)
    pairs = tokenize_preference_sources(inputs.loaded, inputs.tokenizer, inputs.template, recipe)
    # One pair is one sample of cost 1: sources mix by pairs, never packed.
    plan = build_plan(
        [p.train for p in pairs],
        [p.weight for p in pairs],
        mix_by="examples",
        seed=recipe.train.seed,
        max_length=recipe.data.max_length,
        packing=False,
        global_batch_size=recipe.train.global_batch_size,
        epochs=recipe.train.epochs,
        max_steps=recipe.train.max_steps,
    )
    for s, p in enumerate(pairs):  # report response tokens, not the unit cost the plan mixed by
        plan.mix.tokens[s] = int(p.train.completion_tokens[plan.refs[plan.refs[:, 0] == s, 1]].sum())
    return inputs, pairs, plan


@dataclass
class PairSpec:
    """How a task feeds pairs to the model: batch size, padding, precision, device and layout."""

    micro_batch_size: int  # pairs per forward pass (two sequences each)
    pad_id: int
    precision: str
    device: torch.device
    selective: bool = True  # project only scored positions (see ``completion_logps``)
    share_prompt: bool = True  # one row per pair, prompt computed once (see ``data.preference.collate_pairs``)

    def batch(self, refs: Sequence[tuple[int, int]], sources: Sequence[PairSource]) -> PairBatch:
        return collate_pairs(refs, sources, self.pad_id, share_prompt=self.share_prompt).to(self.device)


class PairLogps(NamedTuple):
    """Summed completion log-probs and completion token counts of each pair's two sides, shape ``(pairs,)``."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def averaged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Length-normalised log-probs (what IPO, SimPO and ORPO use)."""
        return self.chosen / self.chosen_tokens.clamp(min=1), self.rejected / self.rejected_tokens.clamp(min=1)


def completion_logps(model: Any, batch: PairBatch, selective: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each sequence's completion tokens and their count, shape ``(2 · pairs,)`` each.

    With `selective`, only the scored positions are projected to the vocabulary; otherwise (prompt-learning
    adapters, soft-capped heads) the full forward runs on the plain layout.
    """
    n = 2 * batch.pairs
    logits = logits_at(
        model,
        batch.input_ids,
        batch.positions,
        selective=selective,
        position_ids=batch.position_ids if selective else None,
        attention_mask=batch.attention_mask,
    )
    per_token = token_logprobs(logits, batch.targets)
    sums = torch.zeros(n, dtype=per_token.dtype, device=per_token.device).index_add(0, batch.seq, per_token)
    return sums, torch.bincount(batch.seq, minlength=n)


def split_pairs(sums: torch.Tensor, counts: torch.Tensor) -> PairLogps:
    n = sums.shape[0] // 2
    return PairLogps(sums[:n], sums[n:], counts[:n].to(sums.dtype), counts[n:].to(sums.dtype))


def layouts_agree(
    model: torch.nn.Module,
    score: Callable[[PairBatch], torch.Tensor],
    sources: Sequence[PairSource],
    pad_id: int,
    device: torch.device,
) -> bool:
    """Whether the shared-prompt layout scores a real pair as two separate rows do (fp32, tolerance 1e-4).

    A decoder that ignored custom 4-D masks or position ids would silently compute something else; one tiny
    forward at set-up rules that out, and training falls back to the plain layout.
    """
    src = next((i for i, s in enumerate(sources) if len(s)), None)
    if src is None:
        return False
    was_training = model.training
    model.eval()  # dropout would make any two forwards differ
    try:
        with torch.no_grad():
            shared = score(collate_pairs([(src, 0)], sources, pad_id, share_prompt=True).to(device))
            plain = score(collate_pairs([(src, 0)], sources, pad_id, share_prompt=False).to(device))
    finally:
        model.train(was_training)
    return bool(torch.allclose(shared.float(), plain.float(), atol=1e-4, rtol=1e-4))


class PairTask(TaskBase):
    """Samples are pairs; a step's loss is the sum of its pairs' losses (normalised by the step's pair count).

    Subclasses implement ``pair_losses(sources, refs, split)``: the mean loss and metrics of the pairs `refs`.
    """

    def __init__(
        self, plan: Any, sources: list[PairSource], val_sources: dict[str, PairSource], spec: PairSpec
    ) -> None:
        super().__init__(plan)
        self.sources = sources
        self.val_sources = val_sources
        self.spec = spec
        self.model: torch.nn.Module | None = None

    def pair_losses(
        self, model: torch.nn.Module, sources: Sequence[PairSource], refs: list[tuple[int, int]], split: str
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], PairBatch]:
        raise NotImplementedError

    def loss_tokens(self, indices: Sequence[int]) -> int:
        """Pairs in `indices` (each plan row is one pair of cost 1)."""
        return int(self.plan.row_tokens[np.asarray(indices, dtype=np.int64)].sum()) if len(indices) else 0

    def forward_backward(self, model: torch.nn.Module, indices: Sequence[int], scale: float) -> StepOutput:
        """Gradients of ``scale · Σ pair losses`` over `indices` in micro-batches, metrics weighted by pairs."""
        s = self.spec
        loss_acc = torch.zeros((), device=s.device)
        sums = MetricSums()
        fed = 0
        rows = list(indices)
        for i in range(0, len(rows), s.micro_batch_size):
            refs = self.refs(rows[i : i + s.micro_batch_size])
            loss, metrics, batch = self.pair_losses(model, self.sources, refs, "train")
            loss_sum = loss * len(refs)  # the objectives return means over pairs
            (loss_sum * scale).backward()
            loss_acc += loss_sum.detach()
            sums.add_means(metrics, len(refs))
            fed += batch.num_tokens
        return StepOutput(loss_acc, fed, sums.metrics)

    def held_out(
        self, model: torch.nn.Module, accuracy_key: str, margin_key: str, max_examples: int = MAX_EVAL_PAIRS
    ) -> dict[str, float]:
        """Loss, pairwise accuracy and margin on each validation source and over all of them (pair-weighted)."""
        s = self.spec
        model.eval()
        parts = {}
        for name, src in self.val_sources.items():
            n = min(len(src), max_examples)
            part = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
            for start in range(0, n, s.micro_batch_size):
                refs = [(0, i) for i in range(start, min(start + s.micro_batch_size, n))]
                loss, metrics, _ = self.pair_losses(model, [src], refs, name)
                part["loss"] += float(loss) * len(refs)
                part["accuracy"] += float(metrics[accuracy_key]) * len(refs)
                part["margin"] += float(metrics[margin_key]) * len(refs)
            parts[name] = (part, float(n))
        model.train()
        return held_out_means(parts)
