"""SFT and continued pre-training (``method: sft`` / ``cpt``): the family's ``prepare`` and its task.

Samples are the plan's packed rows; a step's loss is its token-loss sum over its supervised tokens. The
single-process loop and the elastic replicas drive the same object, so both compute exactly the same gradients.
Distillation reuses both (``training/distill.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tuneforge.config import Recipe
from tuneforge.data.batching import collate
from tuneforge.data.pipeline import LoadedSource, SourceTokens, ahead_factory, tokenize_sources
from tuneforge.data.sampler import Plan, build_plan
from tuneforge.data.stream import release, scan_sources
from tuneforge.data.token_cache import TokenizedSource
from tuneforge.methods import PROMPT_LEARNING, method_spec
from tuneforge.objectives.sft import sft_loss
from tuneforge.training.build import load_inputs, load_tokenizer_for
from tuneforge.training.forward import supervised_logits, supports_selective_head
from tuneforge.training.precision import autocast
from tuneforge.training.task import PreparedBase, StepOutput, TaskBase, held_out_means


@dataclass
class SFTPrepared(PreparedBase):
    """Validated, tokenized data and its plan of packed rows (no model yet)."""

    tokens: list[SourceTokens] = field(default_factory=list)
    packing: bool = True

    def batch_shape(
        self, model: torch.nn.Module, micro_batch_size: int, precision: str, device: torch.device
    ) -> BatchShape:
        return BatchShape(
            micro_batch_size=micro_batch_size,
            max_length=self.recipe.data.max_length,
            packing=self.packing,
            pad_id=self.tokenizer.pad_token_id,
            precision=precision,
            device=device,
            selective_head=supports_selective_head(model),
        )

    def make_task(self, model: torch.nn.Module, micro_batch_size: int, precision: str, device: torch.device) -> SFTTask:
        val = {t.name: t.val for t in self.tokens if t.val is not None}
        return SFTTask(
            self.plan, [t.train for t in self.tokens], val, self.batch_shape(model, micro_batch_size, precision, device)
        )


def prepare(recipe: Recipe, loaded: Sequence[LoadedSource] | None = None) -> SFTPrepared:
    """SFT / CPT data: every record checked, tokenized through the cache and planned into packed rows.

    The sources are streamed (``data.stream``: bounded memory at any size; on a warm start only their manifests
    are read). ``loaded`` (from ``data.pipeline.load_sources``) skips reading them — distillation passes records
    its teacher wrote.
    """
    if loaded is None:
        spec = method_spec(recipe.method)
        extra = "*" if spec.allow_extra_keys else ()
        # Chats are tokenized while they are scanned (data.ahead): the tokenizer loads once the scan needs it.
        ahead = ahead_factory(recipe, spec.formats, lambda: _local_tokenizer(recipe))
        scanned = scan_sources(
            recipe, default_format=spec.default_format, allow_extra=extra, verify=recipe.data.verify, ahead=ahead
        )
        try:
            inputs = load_inputs(recipe, loaded=scanned)
        except BaseException:
            release(scanned)
            raise
    else:
        inputs = load_inputs(recipe, loaded=loaded)
    tokens = tokenize_sources(inputs.loaded, inputs.tokenizer, inputs.template, recipe)
    packing = recipe.data.packing and recipe.adapter.kind not in PROMPT_LEARNING  # virtual tokens are per row
    plan = build_plan(
        [t.train for t in tokens],
        [t.weight for t in tokens],
        mix_by=recipe.data.mix_by,
        seed=recipe.train.seed,
        max_length=recipe.data.max_length,
        packing=packing,
        global_batch_size=recipe.train.global_batch_size,
        epochs=recipe.train.epochs,
        max_steps=recipe.train.max_steps,
        cache=recipe.data.cache,
    )
    return SFTPrepared(
        recipe,
        inputs.tokenizer,
        inputs.template,
        plan,
        inputs.data_hashes,
        data_info={t.name: t.stats for t in tokens},
        tokens=tokens,
        packing=packing,
    )


def _local_tokenizer(recipe: Recipe) -> tuple[Any, str | None]:
    """The recipe's tokenizer and template for tokenizing during the scan — only from a local directory: data
    that turns out bad must not have cost a download."""
    name = recipe.model.tokenizer or recipe.model.path
    if not Path(name).expanduser().is_dir():
        raise FileNotFoundError(name)
    return load_tokenizer_for(recipe, True)


@dataclass
class BatchShape:
    micro_batch_size: int
    max_length: int
    packing: bool
    pad_id: int
    precision: str
    device: torch.device
    selective_head: bool


class SFTTask(TaskBase):
    """Samples are the plan's packed rows; a step's loss is its token-loss sum over its supervised tokens."""

    def __init__(
        self, plan: Plan, sources: list[TokenizedSource], val_sources: dict[str, TokenizedSource], shape: BatchShape
    ) -> None:
        super().__init__(plan)
        self.sources = sources
        self.val_sources = val_sources
        self.shape = shape

    def loss_tokens(self, indices: Sequence[int]) -> int:
        return int(self.plan.row_tokens[np.asarray(indices, dtype=np.int64)].sum()) if len(indices) else 0

    def batches(self, rows: Sequence[int]):
        """Collated micro-batches of the plan rows `rows`, on the device."""
        s = self.shape
        rows = list(rows)
        for i in range(0, len(rows), s.micro_batch_size):
            yield collate(
                [self.plan.row(r) for r in rows[i : i + s.micro_batch_size]],
                self.sources,
                s.pad_id,
                s.max_length if s.packing else None,
            ).to(s.device)

    def val_batches(self, src: TokenizedSource, max_examples: int):
        """Validation documents unpacked, one per row, dynamic padding."""
        s = self.shape
        n = min(len(src), max_examples)
        for start in range(0, n, s.micro_batch_size):
            rows = [np.array([[0, i]]) for i in range(start, min(start + s.micro_batch_size, n))]
            yield collate(rows, [src], s.pad_id).to(s.device)

    def forward_backward(self, model: torch.nn.Module, indices: Sequence[int], scale: float) -> StepOutput:
        """Accumulate gradients of ``scale · Σ token losses`` over the rows `indices`, in micro-batches.

        Returns the unscaled loss sum (a tensor: no host sync here) and the tokens fed.
        """
        s = self.shape
        loss_acc = torch.zeros((), device=s.device)
        fed = 0
        for batch in self.batches(indices):
            with autocast(s.precision, s.device):
                logits, targets = supervised_logits(model, batch, s.selective_head)
            loss_sum, _ = sft_loss(logits, targets)
            (loss_sum * scale).backward()
            loss_acc += loss_sum.detach()
            fed += batch.num_tokens
        return StepOutput(loss_acc, fed)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, max_examples: int = 512) -> dict[str, float]:
        """Mean token loss on each validation source and over all of them (token-weighted)."""
        s = self.shape
        model.eval()
        parts = {}
        for name, src in self.val_sources.items():
            loss_sum = torch.zeros((), device=s.device)
            tokens = 0
            for batch in self.val_batches(src, max_examples):
                with autocast(s.precision, s.device):
                    logits, targets = supervised_logits(model, batch, s.selective_head)
                loss_sum += sft_loss(logits, targets)[0]
                tokens += targets.numel()
            parts[name] = ({"loss": float(loss_sum)}, float(tokens))
        model.train()
        return held_out_means(parts)
