"""Token-level knowledge distillation: forward KL, reverse KL, and the generalised Jensen–Shannon divergence.

For teacher ``T`` and student ``S`` next-token distributions at each masked position (both softened by the same
``temperature``):

- ``"forward_kl"``: ``KL(T || S)``, the classic word-level KD objective (Hinton et al. 2015; Kim & Rush 2016);
  mass-covering.
- ``"reverse_kl"``: ``KL(S || T)``, mode-seeking, as in MiniLLM (Gu et al. 2024, arXiv:2306.08543).
- ``"jsd"``: the generalised JSD of GKD (Agarwal et al. 2024, arXiv:2306.13649, Eq. 1) with ``M = beta T +
  (1 - beta) S``: ``beta KL(T || M) + (1 - beta) KL(S || M)`` for ``0 < beta < 1``. ``beta = 0.5`` is the symmetric
  JSD; the limits ``beta -> 0`` / ``beta -> 1`` behave like (scaled) forward / reverse KL, which is why TRL's
  ``GKDTrainer.generalized_jsd_loss`` maps ``beta = 0`` and ``beta = 1`` to those two kinds.

The loss is the divergence summed over the vocabulary and averaged over masked tokens, matching TRL's
``"batchmean"`` reduction with labels. Like GKD/TRL, it is **not** multiplied by ``temperature**2`` (Hinton's
gradient-scale correction); a caller mixing it with a hard-label loss can scale it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DISTILL_KINDS = ("forward_kl", "reverse_kl", "jsd")


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q)`` per row from log-probabilities (finite logits assumed, so no ``0 * log 0`` terms)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    num_items_in_batch: Tensor | int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean per-token divergence between student and teacher over the positions where ``mask`` is non-zero.

    ``student_logits`` and ``teacher_logits`` are ``(batch, seq, vocab)`` over the same vocabulary and positions;
    ``mask`` is ``(batch, seq)``. ``beta`` is used by ``kind="jsd"`` only. Only the masked positions are
    normalised, so padding costs no softmax. ``num_items_in_batch`` (the masked-token count of the whole
    optimiser step, over micro-batches and ranks) replaces the local count as the divisor, so accumulated
    micro-batches of different sizes weigh every token the same.
    """
    if kind not in DISTILL_KINDS:
        raise ValueError(f"distill_loss: kind must be one of {DISTILL_KINDS}; got {kind!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"distill_loss: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must match (same positions, same vocabulary)"
        )
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"distill_loss: mask {tuple(mask.shape)} must be {tuple(student_logits.shape[:-1])}")
    if temperature <= 0:
        raise ValueError(f"distill_loss: temperature must be > 0; got {temperature}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"distill_loss: kind='jsd' needs 0 < beta < 1; got {beta} (use forward_kl / reverse_kl)")

    keep = mask.bool()
    compute_dtype = torch.float32 if student_logits.dtype in (torch.float16, torch.bfloat16) else student_logits.dtype
    log_s = F.log_softmax(student_logits[keep].to(compute_dtype) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits[keep].to(compute_dtype) / temperature, dim=-1)

    if kind == "forward_kl":
        per_token = _kl(log_t, log_s)
    elif kind == "reverse_kl":
        per_token = _kl(log_s, log_t)
    else:
        log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log1p(-beta)]), dim=0)
        per_token = beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)

    local_count = keep.sum().clamp(min=1)
    divisor = local_count if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
    loss = per_token.sum() / divisor.to(per_token).clamp(min=1)
    with torch.no_grad():
        agree = (log_s.argmax(-1) == log_t.argmax(-1)).to(compute_dtype)
        metrics = {
            "distill/divergence": per_token.detach().sum() / local_count,
            "distill/top1_agreement": agree.sum() / local_count,
        }
    return loss, metrics
