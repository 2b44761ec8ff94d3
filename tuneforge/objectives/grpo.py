"""Group-relative policy optimisation: GRPO and its DAPO / Dr. GRPO refinements.

``group_advantages`` turns one scalar reward per completion into an advantage relative to the other completions of
the same prompt (GRPO, Shao et al. 2024, arXiv:2402.03300, Sec. 4.1.2, outcome supervision):
``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)`` with the unbiased (n - 1) standard deviation and
``eps = 1e-4`` as in TRL. ``scale="none"`` keeps only the mean subtraction, as Dr. GRPO (Liu et al. 2025,
arXiv:2503.20783) recommends, because dividing by the std up-weights prompts that are too easy or too hard.

``grpo_loss`` is the clipped surrogate of PPO applied per token with the sequence's advantage:
``-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)`` with ``rho = exp(log pi - log pi_old)``. Options:

- ``clip_eps_high`` > ``clip_eps_low`` is DAPO's clip-higher (Yu et al. 2025, arXiv:2503.14476, Sec. 3.1).
- ``beta > 0`` adds the per-token KL penalty to a reference policy with the k3 estimator
  ``exp(ref - logp) - (ref - logp) - 1`` (Schulman 2020, "Approximating KL divergence"), as in the GRPO paper Eq. 4.
  ``kl_ratio_correction`` multiplies it by the (differentiable) importance ratio ``rho`` so its gradient is the
  unbiased reverse-KL gradient for tokens sampled from the old policy (DeepSeek-V3.2, arXiv:2512.02556;
  TRL's ``use_bias_correction_kl``).
- ``loss_type`` chooses how per-token losses are averaged:

  * ``"grpo"``: mean over each sequence's tokens, then over sequences (GRPO paper Eq. 3); long completions get a
    smaller per-token weight.
  * ``"bnpo"`` / ``"dapo"``: every token in the batch weighs the same (DAPO's token-level loss, Sec. 3.3). Pass
    ``num_items_in_batch`` (the token count over all micro-batches and ranks of one optimiser step) to make the
    normaliser global, as DAPO intends; otherwise the local token count is used and the two names are identical.
  * ``"dr_grpo"``: sum over tokens divided by ``batch * max_completion_length``, a constant, so no length bias
    (Dr. GRPO).

These reductions and the clip/KL metrics follow TRL's ``GRPOTrainer._compute_loss`` (token-level importance
sampling, no entropy masking, no vLLM correction).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tuneforge.objectives.logprobs import masked_mean, masked_sum

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
ADVANTAGE_SCALES = ("std", "none")


def group_advantages(rewards: Tensor, group_size: int, scale: str = "std", eps: float = 1e-4) -> Tensor:
    """Advantage of each completion relative to its group.

    ``rewards`` is ``(prompts * group_size,)`` with each prompt's completions contiguous
    (``[p0_c0, p0_c1, ..., p1_c0, ...]``). A group of one has advantage 0.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"group_advantages: scale must be one of {ADVANTAGE_SCALES}; got {scale!r}")
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"group_advantages: rewards must be 1-D with a length divisible by group_size={group_size}; "
            f"got shape {tuple(rewards.shape)}"
        )
    groups = rewards.reshape(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "std":
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred)
        centred = centred / (std + eps)
    return centred.reshape(-1)


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    beta: float = 0.0,
    kl_ratio_correction: bool = False,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: Tensor | int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped GRPO loss from per-token log-probs ``(batch, seq)`` of the sampled completion tokens.

    ``old_logps`` are the sampling policy's log-probs (``None``: a single on-policy step, so the ratio is 1 while
    the gradient still flows through ``logps``). ``ref_logps`` may be ``None`` when ``beta == 0``. ``advantages`` is
    ``(batch,)`` (one per sequence) or ``(batch, seq)``. ``clip_eps_high`` defaults to ``clip_eps_low``.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"grpo_loss: loss_type must be one of {GRPO_LOSS_TYPES}; got {loss_type!r}")
    if logps.shape != mask.shape:
        raise ValueError(f"grpo_loss: logps {tuple(logps.shape)} and mask {tuple(mask.shape)} must match")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("grpo_loss: beta > 0 needs ref_logps (the reference policy's per-token log-probs)")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("grpo_loss: loss_type='dr_grpo' needs max_completion_length (the generation budget)")
    eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    if old_logps is None:
        old_logps = logps.detach()
    mask = mask.to(logps.dtype)

    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + eps_high)
    per_token = -torch.min(ratio * advantages, clipped_ratio * advantages)
    if beta != 0.0:
        log_ref_ratio = ref_logps - logps
        per_token_kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0
        if kl_ratio_correction:
            per_token_kl = per_token_kl * ratio
        per_token = per_token + beta * per_token_kl

    if loss_type == "grpo":
        loss = masked_mean(per_token, mask, dim=-1).mean()
    elif loss_type == "dr_grpo":
        loss = masked_sum(per_token, mask) / (per_token.size(0) * max_completion_length)
    else:  # bnpo / dapo
        normaliser = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
        loss = masked_sum(per_token, mask) / normaliser.to(per_token).clamp(min=1.0)

    with torch.no_grad():
        low = ((ratio < 1.0 - clip_eps_low) & (advantages < 0)).to(logps.dtype)
        high = ((ratio > 1.0 + eps_high) & (advantages > 0)).to(logps.dtype)
        metrics = {
            "clip_ratio/low": masked_mean(low, mask),
            "clip_ratio/high": masked_mean(high, mask),
            "clip_ratio/region": masked_mean(torch.maximum(low, high), mask),
            "ratio/mean": masked_mean(ratio.detach(), mask),
        }
        if beta != 0.0:
            metrics["kl"] = masked_mean(per_token_kl.detach(), mask)
        elif ref_logps is not None:  # still worth watching when the penalty is off
            log_ref_ratio = ref_logps - logps.detach()
            metrics["kl"] = masked_mean(torch.exp(log_ref_ratio) - log_ref_ratio - 1.0, mask)
    return loss, metrics
