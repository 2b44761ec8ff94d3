"""Supervised fine-tuning and continued pre-training: token-level cross-entropy on supervised tokens.

The loss is returned as a *sum* over tokens; the loop divides by the number of supervised tokens in the
whole global batch. That makes the gradient independent of how the batch is split into micro-batches or
replicas — a long example weighs the same wherever it lands.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sft_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy summed over tokens; `logits` (N, V) only at supervised positions, `targets` (N,)."""
    loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss_sum, {"loss_sum": loss_sum.detach(), "tokens": torch.tensor(targets.numel())}
