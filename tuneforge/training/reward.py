"""Reward models (``method: reward``): a scalar head trained with the Bradley–Terry loss on preference pairs.

The model is built by :mod:`tuneforge.models.reward` (the registry entry says ``sequence_classifier``); pairs,
batching and accumulation are shared with DPO (:mod:`tuneforge.training.pairs`); the loss is
:func:`tuneforge.objectives.reward.reward_loss`. Only the last position of each sequence goes through the head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tuneforge.config import Recipe
from tuneforge.data.preference import PairBatch, PairSource
from tuneforge.data.sampler import Plan
from tuneforge.models.reward import reward_model_parts
from tuneforge.objectives.reward import reward_loss
from tuneforge.training.forward import attention_allows_masks, hidden_at
from tuneforge.training.pairs import PairSpec, PairsPrepared, PairTask, layouts_agree, prepare_pairs
from tuneforge.training.precision import autocast


@dataclass
class RewardPrepared(PairsPrepared):
    def make_task(
        self, model: torch.nn.Module, micro_batch_size: int, precision: str, device: torch.device
    ) -> RewardTask:
        train, val = self.train_sources, self.val_sources
        spec = PairSpec(
            micro_batch_size=micro_batch_size,
            pad_id=self.tokenizer.pad_token_id,
            precision=precision,
            device=device,
            selective=reward_model_parts(model) is not None,
        )
        spec.share_prompt = (
            spec.selective
            and attention_allows_masks(model)
            and layouts_agree(model, lambda b: sequence_rewards(model, b), train, spec.pad_id, device)
        )
        return RewardTask(self.plan, train, val, spec, center_coeff=self.recipe.reward.center_coeff)


def prepare(recipe: Recipe) -> RewardPrepared:
    inputs, pairs, plan = prepare_pairs(recipe)
    return RewardPrepared(
        recipe,
        inputs.tokenizer,
        inputs.template,
        plan,
        inputs.data_hashes,
        data_info={p.name: p.stats for p in pairs},
        pairs=pairs,
    )


def sequence_rewards(model: Any, batch: PairBatch) -> torch.Tensor:
    """The scalar reward of each sequence, read at its last token (what HF's pooling picks), shape ``(2 · pairs,)``.

    Models without a plain ``score`` head take the full forward on the plain layout and pool themselves.
    """
    parts = reward_model_parts(model)
    if parts is None:
        if batch.attention_mask is not None:
            raise ValueError("the shared-prompt layout needs a model with a decoder and a `score` head")
        width = batch.input_ids.shape[1]
        ends = (batch.last % width)[:, None]
        mask = (torch.arange(width, device=ends.device)[None, :] <= ends).long()
        return model(input_ids=batch.input_ids, attention_mask=mask, use_cache=False).logits[:, 0].float()
    decoder, head = parts
    hidden = hidden_at(
        model,
        batch.input_ids,
        batch.last,
        decoder=decoder,
        position_ids=batch.position_ids,
        attention_mask=batch.attention_mask,
    )
    return head(hidden)[:, 0].float()


class RewardTask(PairTask):
    """A step's loss is the sum of its pairs' Bradley–Terry losses (normalised by pair count)."""

    def __init__(
        self,
        plan: Plan,
        sources: list[PairSource],
        val_sources: dict[str, PairSource],
        spec: PairSpec,
        center_coeff: float | None = None,
    ) -> None:
        super().__init__(plan, sources, val_sources, spec)
        self.center_coeff = center_coeff

    def pair_losses(
        self, model: torch.nn.Module, sources: Sequence[PairSource], refs: list[tuple[int, int]], split: str
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], PairBatch]:
        s = self.spec
        batch = s.batch(refs, sources)
        with autocast(s.precision, s.device):
            rewards = sequence_rewards(model, batch)
        loss, metrics = reward_loss(rewards[: batch.pairs], rewards[batch.pairs :], center_coeff=self.center_coeff)
        return loss, metrics, batch

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out Bradley–Terry loss, pairwise accuracy (chosen scored strictly higher) and mean margin."""
        return self.held_out(model, "accuracy", "margin")
