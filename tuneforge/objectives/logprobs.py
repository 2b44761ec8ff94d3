"""Per-token and per-sequence log-probabilities from logits.

Alignment convention (one rule for every objective): **labels are already aligned with the logits.**
``logits[..., t, :]`` is the distribution that scores ``labels[..., t]``; this module never shifts. For a causal
LM the caller shifts once, where it knows the layout::

    logits = model(input_ids).logits[:, :-1]   # position t predicts token t + 1
    labels = input_ids[:, 1:]
    mask = completion_mask[:, 1:]

Positions whose label is ``ignore_index`` (-100, the Hugging Face convention) get log-prob 0, so a gather never
indexes out of range and a masked sum ignores them.

Memory: the full ``log_softmax`` of a ``(batch, seq, vocab)`` tensor is never built. The label's logit is gathered
and the log-normaliser (``logsumexp``) is computed a few rows at a time, in float32 for half-precision inputs so
bf16 rounding does not leak into the log-probs (the same approach as TRL's ``selective_log_softmax``).
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


def token_logprobs(
    logits: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX, chunk_tokens: int = 512
) -> Tensor:
    """``log p(labels[..., t] | logits[..., t, :])`` for every position; 0 where the label is ``ignore_index``.

    ``logits`` is ``(..., vocab)`` and ``labels`` is ``(...)``, already aligned (see the module docstring). The result
    is float32 for half-precision logits, otherwise the logits' dtype. ``chunk_tokens`` positions are normalised at a
    time, so the extra memory of the forward pass is one ``(chunk_tokens, vocab)`` block.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"token_logprobs: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree; expected "
            "logits of shape labels.shape + (vocab,), already aligned (shift before calling)"
        )
    out_dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    valid = labels != ignore_index
    # (rows, seq, vocab) views: merging only the leading dims keeps a sliced ``logits[:, :-1]`` a view, not a copy
    rows = logits.reshape(-1, *logits.shape[-2:]) if logits.dim() >= 2 else logits.view(1, 1, -1)
    row_labels = labels.masked_fill(~valid, 0).reshape(rows.shape[:-1])
    pieces = []
    for row, targets in zip(rows, row_labels):
        for block, block_targets in zip(row.split(chunk_tokens), targets.split(chunk_tokens)):
            block = block.to(out_dtype)
            picked = block.gather(-1, block_targets.unsqueeze(-1)).squeeze(-1)
            pieces.append(picked - torch.logsumexp(block, dim=-1))
    if not pieces:  # zero rows or zero positions
        return torch.zeros(labels.shape, dtype=out_dtype, device=logits.device)
    logps = torch.cat(pieces).reshape(labels.shape)
    return logps.masked_fill(~valid, 0.0)


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is non-zero (masked entries contribute exactly 0, even if they are NaN)."""
    picked = torch.where(mask.bool(), values, torch.zeros_like(values))
    return picked.sum() if dim is None else picked.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over the non-zero entries of ``mask``; 0 (not NaN) where the mask is empty."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1).to(values.dtype)


def sequence_logprobs(
    logits: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    average: bool = False,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Log-probability of each sequence: the masked sum over positions, or the masked mean if ``average``.

    ``logits`` is ``(batch, seq, vocab)``, ``labels`` and ``mask`` are ``(batch, seq)`` and already aligned. Without
    ``mask`` every position whose label is not ``ignore_index`` counts. The sum is what DPO uses; the average
    (length-normalised log-prob) is what IPO, SimPO and ORPO use.
    """
    if mask is None:
        mask = labels != ignore_index
    if mask.shape != labels.shape:
        raise ValueError(f"sequence_logprobs: mask {tuple(mask.shape)} must match labels {tuple(labels.shape)}")
    per_token = token_logprobs(logits, labels, ignore_index=ignore_index)
    return masked_mean(per_token, mask, dim=-1) if average else masked_sum(per_token, mask, dim=-1)
