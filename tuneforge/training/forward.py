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

import numpy as np
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
    """Prompt + completion rows, right-padded: causal attention needs no mask, padding only trails.

    With a shared prompt (:func:`group_sequence_batch`) a row holds one prompt and several completions, and
    ``position_ids`` / ``attention_mask`` say where each token sits in its own sequence and what it may see.
    """

    input_ids: torch.Tensor  # (R, T)
    rows: torch.Tensor  # (K,) sequence (row of the (B, L) outputs) of each completion token
    cols: torch.Tensor  # (K,) its index within the completion
    positions: torch.Tensor  # (K,) flat index into R · T of the logits that predict it
    targets: torch.Tensor  # (K,)
    width: int  # completion width L of the (B, L) outputs
    sequences: int = 0  # B; 0: one sequence per row
    position_ids: torch.Tensor | None = None  # (R, T), shared-prompt rows only
    attention_mask: torch.Tensor | None = None  # (R, 1, T, T) bool, shared-prompt rows only

    @property
    def num_sequences(self) -> int:
        return self.sequences or self.input_ids.shape[0]


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


def prompt_groups(prompts: Sequence[Sequence[int]]) -> list[range]:
    """Runs of consecutive sequences with the same prompt (a GRPO group is one run)."""
    runs: list[range] = []
    start = 0
    for j in range(1, len(prompts) + 1):
        if j == len(prompts) or list(prompts[j]) != list(prompts[start]):
            runs.append(range(start, j))
            start = j
    return runs


def sharing_pays(prompt_len: int, completion_lens: Sequence[int], hidden_size: int) -> bool:
    """Whether one shared-prompt row costs fewer multiply-adds than one row per sequence.

    Per layer, a Llama-like block spends about 12·H² multiply-adds per token on its projections and MLP, and about
    2·H per (query, key) pair on attention. Separate causal rows attend to about half of their L² pairs; a
    shared row with its block mask computes all of its T² pairs. Sharing saves ``(n - 1)`` prompts' tokens and
    costs attention over a longer row: it pays for long prompts and short completions, not the other way round.
    """
    per_token = 6 * hidden_size  # (12·H²) / (2·H)
    shared = prompt_len + sum(completion_lens)
    cost_shared = per_token * shared + shared**2
    cost_rows = sum(per_token * (prompt_len + n) + (prompt_len + n) ** 2 / 2 for n in completion_lens)
    return cost_shared < cost_rows


def group_sequence_batch(
    prompts: Sequence[Sequence[int]], tokens: torch.Tensor, mask: torch.Tensor, pad_id: int
) -> SequenceBatch:
    """Like :func:`sequence_batch`, but consecutive sequences with the same prompt share one row.

    Row layout ``prompt · completion 1 · completion 2 · …``: the prompt is computed once for its whole group, each
    completion sees the prompt and itself (a block attention mask) and its position ids continue from the prompt,
    so every token has exactly the context it has in its own row. The first token of every completion is predicted
    by the prompt's last position, one hidden state shared by the group.
    """
    lengths = mask.sum(-1).tolist()
    groups = prompt_groups(prompts)
    totals = [len(prompts[g.start]) + sum(lengths[j] for j in g) for g in groups]
    width = max(max(totals), 1)
    ids = np.full((len(groups), width), pad_id, dtype=np.int64)
    pos = np.zeros((len(groups), width), dtype=np.int64)
    segment = np.full((len(groups), width), -1, dtype=np.int64)  # 0: prompt, k + 1: completion k, -1: padding
    rows, cols, positions = [], [], []
    toks = tokens.cpu().numpy()
    for r, g in enumerate(groups):
        p = np.asarray(prompts[g.start], dtype=np.int64)
        ids[r, : len(p)] = p
        pos[r, : len(p)] = np.arange(len(p))
        segment[r, : len(p)] = 0
        at = len(p)
        for k, j in enumerate(g):
            n = lengths[j]
            ids[r, at : at + n] = toks[j, :n]
            pos[r, at : at + n] = len(p) + np.arange(n)
            segment[r, at : at + n] = k + 1
            # token c is predicted at c - 1 of its completion; token 0 at the prompt's last position
            positions.append(r * width + np.concatenate([[len(p) - 1], at + np.arange(n - 1)])[:n])
            rows.append(np.full(n, j, dtype=np.int64))
            cols.append(np.arange(n))
            at += n
    q_seg, k_seg = segment[:, :, None], segment[:, None, :]
    causal = np.tril(np.ones((width, width), dtype=bool))[None]
    allowed = causal & ((k_seg == 0) | (k_seg == q_seg))  # padding sees the prompt and padding: no empty rows
    rows_t, cols_t = torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(cols))
    return SequenceBatch(
        torch.from_numpy(ids),
        rows_t,
        cols_t,
        torch.from_numpy(np.concatenate(positions)),
        tokens.cpu()[rows_t, cols_t],
        tokens.shape[1],
        sequences=len(prompts),
        position_ids=torch.from_numpy(pos),
        attention_mask=torch.from_numpy(allowed[:, None]),
    )


def completion_batch(
    prompts: Sequence[Sequence[int]], tokens: torch.Tensor, mask: torch.Tensor, pad_id: int, *, share: bool, hidden: int
) -> SequenceBatch:
    """Prompt + completion sequences as model input: with `share`, each group of sequences with one prompt in one
    shared-prompt row (:func:`group_sequence_batch`) when :func:`sharing_pays` for every group; else one row each."""
    if share:
        lengths = mask.sum(-1).tolist()
        groups = prompt_groups(prompts)
        if all(len(g) > 1 and sharing_pays(len(prompts[g.start]), [lengths[j] for j in g], hidden) for g in groups):
            return group_sequence_batch(prompts, tokens, mask, pad_id)
    return sequence_batch(prompts, tokens, mask, pad_id)


def sequence_forward(
    model: Any, batch: SequenceBatch, *, selective: bool, temperature: float, value_head: torch.nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs ``(B, L)`` of the completion tokens (at the sampling temperature), and values."""
    device = next(model.parameters()).device
    ids, positions = batch.input_ids.to(device), batch.positions.to(device)
    layout = {
        "position_ids": None if batch.position_ids is None else batch.position_ids.to(device),
        "attention_mask": None if batch.attention_mask is None else batch.attention_mask.to(device),
    }
    values = None
    if value_head is not None:  # one decoder pass feeds both heads
        picked = hidden_at(model, ids, positions, **layout)
        logits = lm_head(model)(picked)
        values = value_head(picked).squeeze(-1).float()
    else:
        logits = logits_at(model, ids, positions, selective=selective, **layout)
    per_token = token_logprobs(logits.float() / temperature, batch.targets.to(device))
    at = (batch.rows.to(device), batch.cols.to(device))
    shape = (batch.num_sequences, batch.width)
    dense = torch.zeros(shape, dtype=per_token.dtype, device=device).index_put(at, per_token)
    dense_values = (
        None if values is None else torch.zeros(shape, dtype=values.dtype, device=device).index_put(at, values)
    )
    return dense, dense_values


def shared_layout_agrees(model: torch.nn.Module, prompt: Sequence[int], pad_id: int) -> bool:
    """Whether a group in one shared-prompt row gets the log-probs of one row per completion (fp32, 1e-4).

    One tiny no-grad forward at set-up, on a real prompt and two made-up completions of different lengths.
    """
    prompt = list(prompt)[-32:]
    some = (prompt * 10)[:10]  # completions made of the prompt's own tokens
    tokens = torch.tensor([some[:6] + [pad_id] * 2, some[2:10]], dtype=torch.long)
    mask = torch.tensor([[1] * 6 + [0] * 2, [1] * 8], dtype=torch.long)
    was_training = model.training
    model.eval()  # dropout would make any two forwards differ
    try:
        with torch.no_grad():
            got = [
                sequence_forward(model, build([prompt, prompt], tokens, mask, pad_id), selective=True, temperature=1.0)
                for build in (group_sequence_batch, sequence_batch)
            ]
    finally:
        model.train(was_training)
    (shared, _), (plain, _) = got
    return bool(torch.allclose(shared.float() * mask, plain.float() * mask, atol=1e-4, rtol=1e-4))
