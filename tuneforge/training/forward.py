"""Model forward passes that compute only what the objective needs: hidden states at chosen positions → a head.

A language model's vocabulary projection is often its single largest matmul, and most positions (prompts,
padding) carry no loss. Every task — SFT, DPO, KTO, GRPO, PPO, reward models, distillation — runs the decoder
once, keeps the hidden states at the positions it scores, and projects only those: through the LM head, a
reward model's scalar head or PPO's value head. Models whose head is more than a linear layer (logit
soft-capping) and prompt-learning adapters (virtual tokens prepended) take the full forward instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tuneforge.data.batching import IGNORE, Batch
from tuneforge.models.adapters import is_prompt_learning, unwrap
from tuneforge.objectives.logprobs import token_logprobs


def supports_selective_head(model: Any) -> bool:
    """Whether hidden states → LM head equals the model's own logits (see the module docstring)."""
    lm = unwrap(model)
    if is_prompt_learning(model) or getattr(lm.config, "final_logit_softcapping", None):
        return False
    return hasattr(lm, "get_decoder") and lm.get_output_embeddings() is not None


def attention_allows_masks(model: Any) -> bool:
    """FlashAttention-2 takes no arbitrary (block) masks; SDPA and eager do."""
    return getattr(unwrap(model).config, "_attn_implementation", "sdpa") in ("sdpa", "eager")


def _pick(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of a ``(B, T, …)`` tensor at `positions`: a ``(B, T)`` bool mask or flat indices into ``B · T``."""
    if positions.dtype == torch.bool:
        return states[positions]
    return states.reshape(-1, *states.shape[2:])[positions]


def hidden_at(
    model: Any,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    *,
    decoder: Any = None,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The decoder's last hidden states ``(K, H)`` at `positions` of the ``(B, T)`` input.

    `decoder` defaults to the causal LM's (``get_decoder()``); a reward model passes its trunk.
    """
    if decoder is None:
        decoder = unwrap(model).get_decoder()
    out = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return _pick(hidden, positions)


def lm_head(model: Any) -> torch.nn.Module:
    return unwrap(model).get_output_embeddings()


def logits_at(
    model: Any,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    *,
    selective: bool,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits ``(K, V)`` at `positions` (each predicts the token after it).

    Selective: decoder, then the LM head on the chosen hidden states only. Otherwise the model's own full forward
    (a custom mask or position ids are then not allowed: prompt-learning adapters prepend virtual tokens).
    """
    if selective:
        return lm_head(model)(
            hidden_at(model, input_ids, positions, position_ids=position_ids, attention_mask=attention_mask)
        )
    if attention_mask is not None:
        raise ValueError("a custom attention mask needs the selective forward")
    out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
    return _pick(out.logits[:, -input_ids.shape[1] :], positions)  # prompt tuning prepends virtual tokens


def supervised_logits(model: Any, batch: Batch, selective: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, V) at the supervised positions of a packed SFT batch and their targets (N,)."""
    keep = batch.labels != IGNORE
    logits = logits_at(
        model, batch.input_ids, keep, selective=selective, position_ids=batch.position_ids if selective else None
    )
    return logits, batch.labels[keep]


@dataclass
class SequenceBatch:
    """Prompt + completion rows, right-padded: causal attention needs no mask, padding only trails."""

    input_ids: torch.Tensor  # (B, T)
    rows: torch.Tensor  # (K,) row of each completion token
    cols: torch.Tensor  # (K,) its index within the completion
    positions: torch.Tensor  # (K,) flat index of the logits that predict it
    targets: torch.Tensor  # (K,)
    width: int  # completion width L of the (B, L) outputs


def sequence_batch(
    prompts: Sequence[Sequence[int]], tokens: torch.Tensor, mask: torch.Tensor, pad_id: int
) -> SequenceBatch:
    lengths = mask.sum(-1).tolist()
    total = [len(p) + n for p, n in zip(prompts, lengths)]
    width = max(max(total), 1)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    rows, cols, positions = [], [], []
    for r, (p, n) in enumerate(zip(prompts, lengths)):
        ids[r, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        ids[r, len(p) : len(p) + n] = tokens[r, :n].cpu()
        rows.append(torch.full((n,), r, dtype=torch.long))
        cols.append(torch.arange(n))
        positions.append(r * width + len(p) - 1 + torch.arange(n))  # logits at t-1 predict token t
    rows_t, cols_t = torch.cat(rows), torch.cat(cols)
    return SequenceBatch(ids, rows_t, cols_t, torch.cat(positions), tokens.cpu()[rows_t, cols_t], tokens.shape[1])


def sequence_forward(
    model: Any, batch: SequenceBatch, *, selective: bool, temperature: float, value_head: torch.nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs ``(B, L)`` of the completion tokens (at the sampling temperature), and values."""
    device = next(model.parameters()).device
    ids, positions = batch.input_ids.to(device), batch.positions.to(device)
    values = None
    if value_head is not None:  # one decoder pass feeds both heads
        picked = hidden_at(model, ids, positions)
        logits = lm_head(model)(picked)
        values = value_head(picked).squeeze(-1).float()
    else:
        logits = logits_at(model, ids, positions, selective=selective)
    per_token = token_logprobs(logits.float() / temperature, batch.targets.to(device))
    at = (batch.rows.to(device), batch.cols.to(device))
    shape = (batch.input_ids.shape[0], batch.width)
    dense = torch.zeros(shape, dtype=per_token.dtype, device=device).index_put(at, per_token)
    dense_values = (
        None if values is None else torch.zeros(shape, dtype=values.dtype, device=device).index_put(at, values)
    )
    return dense, dense_values
