"""KTO: Kahneman-Tversky Optimization on unpaired thumbs-up / thumbs-down examples.

KTO (Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 7) scores each example's implied reward
``r = log pi(y|x) - log ref(y|x)`` against a reference point ``z0``, an estimate of ``KL(pi || ref)``:

- desirable: ``desirable_weight * (1 - sigmoid(beta * (r - z0)))``
- undesirable: ``undesirable_weight * (1 - sigmoid(beta * (z0 - r)))``

``z0 = max(0, mean_j [log pi(y'_j | x_j) - log ref(y'_j | x_j)])`` over *mismatched* pairs: prompt ``x_j`` with the
completion ``y'_j`` of another example of the same batch. It is a constant: no gradient flows through it.

How TRL 1.16 does it (``trl/trainer/kto_trainer.py``, ``KTOTrainer``):

- pairs: ``_prepare_dataset`` maps ``add_kl_completion_ids`` over the dataset in chunks of
  ``per_device_train_batch_size`` consecutive rows, rotating completions by one inside each chunk
  (``kto_mismatched_indices``); sampling is forced to be sequential, so a chunk is exactly one per-device micro-batch.
- ``z0``: ``_compute_loss`` takes ``(KL_logps - ref_KL_logps).mean().detach()`` over the device's micro-batch,
  ``accelerator.gather_for_metrics`` of those per-device means, their mean, then ``clamp(min=0)``
  (``kto_reference_point`` on one process; on several, it is the all-gathered global mean when devices hold equally
  many rows). Both the pairing and ``z0`` therefore depend on the per-device batch size.
- loss: per-example losses of the micro-batch concatenated (desirable first) and averaged, ``losses.nanmean()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kto_mismatched_indices(n: int, chunk_size: int | None = None) -> Tensor:
    """TRL's KL pairing: row ``i`` is scored on the completion of row ``src[i]``; returns ``src``, shape ``(n,)``.

    Completions are rotated by +1 within consecutive chunks of ``chunk_size`` rows (TRL's
    ``per_device_train_batch_size``; ``None`` means one chunk of all ``n``): ``(x_1, y_k), (x_2, y_1), ...,
    (x_k, y_{k-1})``. A final, shorter chunk rotates on its own; a chunk of one row pairs it with itself, as in TRL.
    """
    if n < 0 or (chunk_size is not None and chunk_size < 1):
        raise ValueError(f"kto_mismatched_indices: need n >= 0 and chunk_size >= 1; got n={n}, chunk_size={chunk_size}")
    size = chunk_size or max(n, 1)
    idx = torch.arange(n)
    start = idx - idx % size
    end = torch.clamp(start + size, max=n)  # exclusive end of each row's chunk
    return torch.where(idx == start, end - 1, idx - 1)


def kto_step_mismatched_indices(n: int, *, offset: int = 1) -> Tensor:
    """Split-invariant KL pairing over an optimizer step of ``n`` examples: ``src[i] = (i - offset) mod n``.

    ``i`` is the example's global index in the step (all devices, all micro-batches), so the pairs, and the ``z0``
    computed from all of them, do not change with how the step is split into micro-batches. This differs from TRL,
    which rotates within each per-device micro-batch; the two agree when the step is a single micro-batch
    (``kto_mismatched_indices(n)`` with ``offset=1``). Needs ``offset % n != 0`` so no example is paired with itself.
    """
    if n < 2 or offset % n == 0:
        raise ValueError(f"kto_step_mismatched_indices: need n >= 2 and offset % n != 0; got n={n}, offset={offset}")
    return (torch.arange(n) - offset) % n


def kto_reference_point(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """The reference point ``z0 = max(0, mean(policy_kl_logps - ref_kl_logps))``, detached, as a 0-dim tensor.

    Inputs are the sequence log-probs of the mismatched pairs, shape ``(m,)``. Pass every pair of the step (gathered
    across devices by the caller) for one ``z0`` per step; TRL computes it per micro-batch (module docstring).
    """
    if policy_kl_logps.shape != ref_kl_logps.shape or policy_kl_logps.dim() != 1 or policy_kl_logps.numel() == 0:
        raise ValueError(
            "kto_reference_point: need two non-empty (m,) tensors of one shape; got "
            f"{tuple(policy_kl_logps.shape)} and {tuple(ref_kl_logps.shape)}"
        )
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO loss **summed** over the ``N`` examples (not averaged), and summed metrics.

    ``policy_logps`` and ``ref_logps`` are ``(N,)`` summed completion log-probs, ``desirable`` an ``(N,)`` bool label,
    ``kl`` the scalar reference point ``z0`` (see ``kto_reference_point``; it is detached here). Divide the loss by
    the global example count of the step: with one ``kl`` per step the result is then exact under any micro-batch
    split. Divided by ``N`` it is TRL's loss on one micro-batch.

    Metrics (detached 0-dim tensors): ``rewards/{chosen,rejected}_sum`` (sums of ``beta * r`` over desirable /
    undesirable examples), ``logps/{chosen,rejected}_sum`` (sums of ``policy_logps``), ``count/{chosen,rejected}``
    (the example counts; sum/count is TRL's ``rewards/chosen`` etc.) and ``kl``, which is ``z0`` itself, not a sum.
    """
    shapes = {tuple(t.shape) for t in (policy_logps, ref_logps, desirable)}
    if len(shapes) != 1 or policy_logps.dim() != 1:
        raise ValueError(
            "kto_loss: policy_logps, ref_logps and desirable need one (N,) shape; got "
            f"{[tuple(t.shape) for t in (policy_logps, ref_logps, desirable)]}"
        )
    if desirable.dtype != torch.bool:
        raise ValueError(f"kto_loss: desirable must be a bool tensor; got {desirable.dtype}")
    if kl.numel() != 1:
        raise ValueError(f"kto_loss: kl must be a scalar; got shape {tuple(kl.shape)}")
    if beta <= 0:
        raise ValueError(f"kto_loss: beta must be > 0; got {beta}")

    z0 = kl.detach().reshape(()).to(policy_logps.dtype)
    logratios = policy_logps - ref_logps
    # 1 - sigmoid(x) written as sigmoid(-x): same value, no cancellation for large x
    losses = torch.where(
        desirable,
        desirable_weight * F.sigmoid(-beta * (logratios - z0)),
        undesirable_weight * F.sigmoid(-beta * (z0 - logratios)),
    )

    rewards, logps, zero = beta * logratios.detach(), policy_logps.detach(), torch.zeros_like(logratios.detach())
    metrics = {
        "rewards/chosen_sum": torch.where(desirable, rewards, zero).sum(),
        "rewards/rejected_sum": torch.where(desirable, zero, rewards).sum(),
        "logps/chosen_sum": torch.where(desirable, logps, zero).sum(),
        "logps/rejected_sum": torch.where(desirable, zero, logps).sum(),
        "count/chosen": desirable.sum().to(rewards.dtype),
        "count/rejected": (~desirable).sum().to(rewards.dtype),
        "kl": z0,
    }
    return losses.sum(), metrics
