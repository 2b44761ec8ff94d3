"""PPO for RLHF: per-token rewards with a KL penalty, GAE, and the clipped policy and value losses.

This is the classic recipe of Ziegler et al. 2019 (arXiv:1909.08593) and InstructGPT (Ouyang et al. 2022), in the
form of "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024, arXiv:2403.17031) and TRL's former
``PPOTrainer``:

- ``kl_penalized_rewards``: reward at token t is ``-kl_coef * (log pi(a_t) - log ref(a_t))`` (the k1 KL estimate),
  and the scalar score of the reward model is added at the completion's last token.
- ``gae``: Generalised Advantage Estimation (Schulman et al. 2016, arXiv:1506.02438, Eq. 16),
  ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, returns ``A_t + V_t``; the value
  after the last token is 0 (episode ends).
- ``ppo_policy_loss``: clipped surrogate (Schulman et al. 2017, arXiv:1707.06347, Eq. 7),
  ``max(-A rho, -A clip(rho, 1 - eps, 1 + eps))`` averaged over masked tokens.
- ``ppo_value_loss``: clipped value loss ``0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``.
- ``masked_whiten``: advantage normalisation over the real tokens of the batch, done before the policy loss.

Masks are ``(batch, seq)`` over completion tokens and **right-padded** (ones, then zeros), which is what GAE's
"value after the last token is 0" relies on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tuneforge.objectives.logprobs import masked_mean


def _check_right_padded(mask: Tensor, fn: str) -> None:
    step_up = mask[:, 1:].bool() & ~mask[:, :-1].bool()
    if bool(step_up.any()):
        raise ValueError(f"{fn}: mask must be right-padded (each row ones then zeros); found a 0 followed by a 1")


def kl_penalized_rewards(score: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards ``(batch, seq)``: KL penalty on every token, ``score`` ``(batch,)`` added at the last one.

    Masked positions are 0; a row with no completion token gets nothing (its score has nowhere to go).
    """
    if logps.shape != ref_logps.shape or logps.shape != mask.shape:
        raise ValueError(
            f"kl_penalized_rewards: logps {tuple(logps.shape)}, ref_logps {tuple(ref_logps.shape)} and mask "
            f"{tuple(mask.shape)} must match"
        )
    if score.shape != logps.shape[:1]:
        raise ValueError(
            f"kl_penalized_rewards: score must have shape {tuple(logps.shape[:1])}; got {tuple(score.shape)}"
        )
    _check_right_padded(mask, "kl_penalized_rewards")
    mask = mask.to(logps.dtype)
    rewards = -kl_coef * (logps - ref_logps) * mask
    lengths = mask.sum(-1).long()
    has_tokens = lengths > 0
    last = (lengths - 1).clamp(min=0)
    bonus = torch.zeros_like(rewards).scatter(1, last.unsqueeze(1), (score * has_tokens).to(rewards.dtype).unsqueeze(1))
    return rewards + bonus


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Advantages and returns ``(batch, seq)`` by GAE over the masked (right-padded) completion tokens."""
    if rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(
            f"gae: rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask {tuple(mask.shape)} must match"
        )
    _check_right_padded(mask, "gae")
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask  # past the end: no reward and a terminal value of 0
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        next_value = values[:, t + 1] if t + 1 < values.size(1) else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise to unit variance (and zero mean if ``shift_mean``) over the masked entries; unbiased variance."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    var = masked_mean((values - mean) ** 2, mask) * count / (count - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def ppo_policy_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped PPO surrogate over masked tokens; ``advantages`` already whitened if wanted."""
    if not (logps.shape == old_logps.shape == advantages.shape == mask.shape):
        raise ValueError(
            f"ppo_policy_loss: logps {tuple(logps.shape)}, old_logps {tuple(old_logps.shape)}, advantages "
            f"{tuple(advantages.shape)} and mask {tuple(mask.shape)} must match"
        )
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "policy/clipfrac": masked_mean((clipped > unclipped).to(logps.dtype), mask),
            # k3 estimate of KL(old || new): non-negative and low-variance
            "policy/approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),
            "policy/ratio": masked_mean(ratio, mask),
        }
    return loss, metrics


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_value: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value-function loss over masked tokens (the 0.5 makes its gradient ``V - R``)."""
    if not (values.shape == old_values.shape == returns.shape == mask.shape):
        raise ValueError(
            f"ppo_value_loss: values {tuple(values.shape)}, old_values {tuple(old_values.shape)}, returns "
            f"{tuple(returns.shape)} and mask {tuple(mask.shape)} must match"
        )
    clipped_values = old_values + torch.clamp(values - old_values, -clip_value, clip_value)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        metrics = {
            "value/clipfrac": masked_mean((clipped_err > unclipped_err).to(values.dtype), mask),
            "value/mean": masked_mean(values, mask),
        }
    return loss, metrics
