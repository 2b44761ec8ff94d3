"""Offline preference losses on (chosen, rejected) pairs: DPO and its variants, SimPO, ORPO.

All three take sequence log-probabilities (see ``logprobs.sequence_logprobs``), one value per pair, and return
``(loss, metrics)`` with the loss averaged over pairs.

- ``dpo_loss`` — DPO (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7) on the log-ratio margin
  ``h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))``:

  * ``"sigmoid"``: ``-log sigmoid(beta * h)``; with ``label_smoothing = eps > 0`` it is conservative DPO (cDPO,
    Mitchell 2023), ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``, i.e. labels flipped with
    probability ``eps``.
  * ``"ipo"``: IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17), ``(h - 1 / (2 beta))^2``. Pass length-averaged
    log-probs (``sequence_logprobs(..., average=True)``): the IPO authors' results use the per-token normalisation,
    as TRL's DPO trainer does.
  * ``"hinge"``: SLiC-HF calibration loss (Zhao et al. 2023, arXiv:2305.10425), ``relu(1 - beta h)``.

- ``simpo_loss`` — SimPO (Meng et al. 2024, arXiv:2405.14734, Eq. 6): reference-free,
  ``-log sigmoid(beta (avg log pi(y_w) - avg log pi(y_l)) - gamma)`` on length-averaged log-probs, with the
  cDPO-style label smoothing TRL's CPO trainer also applies.
- ``orpo_loss`` — ORPO (Hong et al. 2024, arXiv:2403.07691, Eqs. 4-7): ``NLL(y_w) - beta * log sigmoid(log OR)``
  where ``log OR = log odds(y_w) - log odds(y_l)`` and ``odds(y) = p / (1 - p)`` on length-averaged probabilities.
  ``beta`` is the paper's lambda.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def _pair_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, Tensor]:
    """Implicit-reward statistics every preference loss logs (detached means over the batch)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
    }


def _check_pairs(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"preference loss: log-prob tensors need one shape (one value per pair); got {shapes}")


def _smoothed_logistic(logits: Tensor, label_smoothing: float) -> Tensor:
    """``-log sigmoid(x)`` with labels flipped with probability ``label_smoothing`` (cDPO)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5); got {label_smoothing}")
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO-family loss from policy and reference sequence log-probs of shape ``(pairs,)``.

    The implicit rewards ``beta * (log pi - log ref)`` are reported as ``rewards/*`` metrics together with the
    policy's ``logps/chosen`` and ``logps/rejected``.
    """
    _check_pairs(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: loss_type must be one of {DPO_LOSS_TYPES}; got {loss_type!r}")
    if loss_type != "sigmoid" and label_smoothing != 0.0:
        raise ValueError(f"dpo_loss: label_smoothing applies to the 'sigmoid' loss only, not {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta must be > 0; got {beta}")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    margin = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = _smoothed_logistic(beta * margin, label_smoothing)
    elif loss_type == "ipo":
        losses = (margin - 1.0 / (2.0 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1.0 - beta * margin)

    metrics = _pair_metrics(beta * chosen_logratios, beta * rejected_logratios)
    metrics["logps/chosen"] = policy_chosen_logps.detach().mean()
    metrics["logps/rejected"] = policy_rejected_logps.detach().mean()
    return losses.mean(), metrics


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SimPO loss from the policy's **length-averaged** log-probs, shape ``(pairs,)``; no reference model.

    ``gamma`` is the target reward margin of the paper (TRL's ``simpo_gamma``), subtracted after scaling by
    ``beta``. Rewards in the metrics are ``beta * avg log pi``.
    """
    _check_pairs(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    if beta <= 0:
        raise ValueError(f"simpo_loss: beta must be > 0; got {beta}")
    logits = beta * (policy_chosen_logps - policy_rejected_logps) - gamma
    losses = _smoothed_logistic(logits, label_smoothing)
    metrics = _pair_metrics(beta * policy_chosen_logps, beta * policy_rejected_logps)
    metrics["logps/chosen"] = policy_chosen_logps.detach().mean()
    metrics["logps/rejected"] = policy_rejected_logps.detach().mean()
    return losses.mean(), metrics


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, switching formula at ``-log 2`` to avoid cancellation (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_nll: Tensor,
    chosen_logps_avg: Tensor,
    rejected_logps_avg: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """ORPO: the chosen response's SFT loss plus ``beta`` times the odds-ratio penalty.

    ``chosen_nll`` is the scalar SFT negative log-likelihood of the chosen responses (the loop decides which
    tokens count; TRL's trainer uses prompt and response). ``*_logps_avg`` are length-averaged log-probs of shape
    ``(pairs,)``, strictly negative (a probability of exactly 1 has infinite odds).
    """
    _check_pairs(chosen_logps_avg=chosen_logps_avg, rejected_logps_avg=rejected_logps_avg)
    if chosen_nll.dim() != 0:
        raise ValueError(f"orpo_loss: chosen_nll must be a scalar; got shape {tuple(chosen_nll.shape)}")
    # log odds(p) = log p - log(1 - p), with log p given
    log_odds = (chosen_logps_avg - rejected_logps_avg) - (_log1mexp(chosen_logps_avg) - _log1mexp(rejected_logps_avg))
    log_sigmoid_odds = F.logsigmoid(log_odds)
    loss = chosen_nll - beta * log_sigmoid_odds.mean()

    metrics = _pair_metrics(beta * chosen_logps_avg, beta * rejected_logps_avg)
    metrics["logps/chosen"] = chosen_logps_avg.detach().mean()
    metrics["logps/rejected"] = rejected_logps_avg.detach().mean()
    metrics["nll_loss"] = chosen_nll.detach()
    metrics["log_odds_ratio"] = log_sigmoid_odds.detach().mean()
    metrics["log_odds_chosen"] = log_odds.detach().mean()
    return loss, metrics
