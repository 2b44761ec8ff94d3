"""Reward-model training loss: the Bradley–Terry pairwise objective.

``reward_loss`` is ``-log sigmoid(r(x, y_w) - r(x, y_l) - m)`` averaged over pairs, the pairwise ranking loss of
InstructGPT (Ouyang et al. 2022, arXiv:2203.02155, Eq. 1). Two optional terms:

- ``margin`` ``m`` per pair: Llama 2's margin component (Touvron et al. 2023, arXiv:2307.09288, Eq. 2), so pairs
  rated far apart must be separated by more.
- ``center_coeff`` ``c``: adds ``c * mean((r_w + r_l)^2)``, the auxiliary centering term of Eisenstein et al. 2023
  (arXiv:2312.09244), which pins the (otherwise shift-invariant) rewards near zero.

The formula and both options match TRL's ``RewardTrainer.compute_loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _as_pair_vector(name: str, rewards: Tensor) -> Tensor:
    """Accept ``(pairs,)`` or a scalar head's ``(pairs, 1)``; return ``(pairs,)``."""
    if rewards.dim() == 2 and rewards.size(-1) == 1:
        return rewards.squeeze(-1)
    if rewards.dim() != 1:
        raise ValueError(f"reward_loss: {name} must have shape (pairs,) or (pairs, 1); got {tuple(rewards.shape)}")
    return rewards


def pairwise_accuracy(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """Fraction of pairs where the chosen response scores strictly higher (a tie counts as wrong)."""
    chosen = _as_pair_vector("chosen_rewards", chosen_rewards).detach()
    rejected = _as_pair_vector("rejected_rewards", rejected_rewards).detach()
    return (chosen > rejected).to(chosen.dtype).mean()


def reward_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | None = None,
    center_coeff: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley–Terry loss for scalar rewards of the chosen and rejected response of each pair."""
    chosen = _as_pair_vector("chosen_rewards", chosen_rewards)
    rejected = _as_pair_vector("rejected_rewards", rejected_rewards)
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"reward_loss: chosen_rewards {tuple(chosen.shape)} and rejected_rewards {tuple(rejected.shape)} "
            "must pair up"
        )
    diff = chosen - rejected
    if margin is not None:
        if margin.shape != diff.shape:
            raise ValueError(f"reward_loss: margin must have shape {tuple(diff.shape)}; got {tuple(margin.shape)}")
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coeff:
        loss = loss + center_coeff * ((chosen + rejected) ** 2).mean()

    with torch.no_grad():
        both = torch.cat([chosen, rejected])
        metrics = {
            "accuracy": pairwise_accuracy(chosen, rejected),
            "margin": (chosen - rejected).mean(),
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "mean_reward": both.mean(),
            "min_reward": both.min(),
            "max_reward": both.max(),
        }
    return loss, metrics
