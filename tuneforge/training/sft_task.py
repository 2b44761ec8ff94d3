"""The SFT / CPT step as a task: which samples exist, how much each weighs, forward + backward.

The single-process loop and the elastic replicas drive the same object, so both compute exactly the same
gradients. Other methods (DPO, reward models, …) plug in by providing the same four methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tuneforge.data.batching import collate
from tuneforge.data.sampler import Plan
from tuneforge.data.token_cache import TokenizedSource
from tuneforge.objectives.sft import sft_loss
from tuneforge.training.forward import supervised_logits
from tuneforge.training.precision import autocast


@dataclass
class BatchShape:
    micro_batch_size: int
    max_length: int
    packing: bool
    pad_id: int
    precision: str
    device: torch.device
    selective_head: bool


class SFTTask:
    """Samples are the plan's packed rows; a step's loss is its token-loss sum over its supervised tokens."""

    def __init__(self, plan: Plan, sources: list[TokenizedSource], val_sources: dict[str, TokenizedSource],
                 shape: BatchShape) -> None:
        self.plan = plan
        self.sources = sources
        self.val_sources = val_sources
        self.shape = shape

    def num_samples(self) -> int:
        return self.plan.num_steps * self.plan.global_batch_size

    def loss_tokens(self, indices: Sequence[int]) -> int:
        return int(self.plan.row_tokens[np.asarray(indices, dtype=np.int64)].sum()) if len(indices) else 0

    def forward_backward(self, model: torch.nn.Module, indices: Sequence[int], scale: float) -> dict[str, torch.Tensor]:
        """Accumulate gradients of ``scale · Σ token losses`` over the rows `indices`, in micro-batches.

        Returns the unscaled loss sum and the tokens fed, as tensors (no host sync here).
        """
        s = self.shape
        loss_acc = torch.zeros((), device=s.device)
        fed = 0
        rows = list(indices)
        for i in range(0, len(rows), s.micro_batch_size):
            batch = collate([self.plan.row(r) for r in rows[i : i + s.micro_batch_size]], self.sources, s.pad_id,
                            s.max_length if s.packing else None).to(s.device)
            with autocast(s.precision, s.device):
                logits, targets = supervised_logits(model, batch, s.selective_head)
            loss_sum, _ = sft_loss(logits, targets)
            (loss_sum * scale).backward()
            loss_acc += loss_sum.detach()
            fed += batch.num_tokens
        return {"loss_sum": loss_acc, "tokens_fed": torch.tensor(fed)}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, max_examples: int = 512) -> dict[str, float]:
        """Mean token loss on each validation source (documents unpacked, dynamic padding)."""
        s = self.shape
        model.eval()
        out: dict[str, float] = {}
        total_loss = total_tok = 0.0
        for name, src in self.val_sources.items():
            n = min(len(src), max_examples)
            loss_sum = torch.zeros((), device=s.device)
            tokens = 0
            for start in range(0, n, s.micro_batch_size):
                rows = [np.array([[0, i]]) for i in range(start, min(start + s.micro_batch_size, n))]
                batch = collate(rows, [src], s.pad_id).to(s.device)
                with autocast(s.precision, s.device):
                    logits, targets = supervised_logits(model, batch, s.selective_head)
                part, _ = sft_loss(logits, targets)
                loss_sum += part
                tokens += targets.numel()
            out[f"val/{name}_loss"] = float(loss_sum) / max(tokens, 1)
            total_loss += float(loss_sum)
            total_tok += tokens
        if out:
            out["val/loss"] = total_loss / max(total_tok, 1)
        model.train()
        return out
