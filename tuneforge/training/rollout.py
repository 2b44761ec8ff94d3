"""Sampling completions for online RL: batched, KV-cached, and each prompt's prefill shared by its group.

GRPO samples a *group* of completions per prompt. Every completion of a group starts from the same prompt, so
the prompt is run through the model once and its KV cache is repeated ``group_size`` times before decoding
(``DynamicCache.batch_repeat_interleave``) — the prefill costs one row per prompt, not one per completion.
Prompts are left-padded so every row's next token sits in the last column; position ids follow the real
tokens. Decoding stops as soon as every row has produced an end-of-sequence token.

The sampler is deterministic given its generators. The online tasks give every completion a generator of its own,
seeded by (seed, batch of rollouts, prompt's global index, sample in the group): a resumed run samples exactly what
the uninterrupted run sampled, and elastic replicas that each sample a share of a step's prompts sample exactly
what one process sampling them all would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    greedy: bool = False


@dataclass
class Completions:
    """``prompts × group`` completions, each prompt's group contiguous; ``tokens`` right-padded with ``pad_id``."""

    tokens: torch.Tensor  # (N, L) int64
    mask: torch.Tensor  # (N, L) 1 for generated tokens up to and including the first EOS
    finished: torch.Tensor  # (N,) bool: ended with EOS (not cut by the length budget)
    group_size: int

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask ``(B, W)`` with every prompt right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if len(p):
            ids[row, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            mask[row, width - len(p) :] = 1
    return ids, mask


Generators = torch.Generator | Sequence[torch.Generator] | None


def row_generators(
    seed: int, stream: int, rows: Sequence[int], group: int, device: torch.device
) -> list[torch.Generator]:
    """One generator per completion: a function of (seed, stream, global row, sample), never of the batch split."""
    dev = device if device.type in ("cpu", "cuda") else torch.device("cpu")
    return [
        torch.Generator(device=dev).manual_seed(hash_seed(seed, stream, row, k)) for row in rows for k in range(group)
    ]


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers (a fixed mix, so seeds do not change between Python runs)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def pick_tokens(
    logits: torch.Tensor, s: Sampling, generator: Generators, uniform: torch.Tensor | None = None
) -> torch.Tensor:
    """Next token per row: argmax, or a sample after temperature, top-k and nucleus (top-p) filtering.

    With ``uniform`` (one number in [0, 1) per row) the sample is the inverse of the row's cumulative
    distribution at that number, so a row's draw depends on its own randomness only, never on the other rows.
    """
    if s.greedy:
        return logits.argmax(-1)
    logits = logits.float() / s.temperature
    if s.top_k is not None and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already cover top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs > s.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    if uniform is not None:
        cdf = probs.cumsum(-1)
        picked = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)  # p > 0 only
        return picked.clamp(max=probs.shape[-1] - 1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    group_size: int,
    sampling: Sampling,
    eos_ids: Sequence[int],
    pad_id: int,
    generator: Generators = None,
) -> Completions:
    """``group_size`` completions of every prompt (``len(prompts) · group_size`` rows, groups contiguous).

    `generator`: one for the whole batch, or one per completion row (see :func:`row_generators`); with one per
    row, each row draws its ``max_new_tokens`` uniforms up front and samples by inverse CDF (:func:`pick_tokens`).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    from transformers import DynamicCache

    ids, attn = left_pad(prompts, pad_id)
    ids, attn = ids.to(device), attn.to(device)
    padded = len({len(p) for p in prompts}) > 1  # without padding the plain causal mask is right: skip building one
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(
        input_ids=ids,
        attention_mask=attn if padded else None,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    logits = out.logits[:, -1]
    cache = out.past_key_values
    if group_size > 1:  # the prompt's keys and values, computed once, serve the whole group
        cache.batch_repeat_interleave(group_size)
        logits = logits.repeat_interleave(group_size, dim=0)
        attn = attn.repeat_interleave(group_size, dim=0)
    n = logits.shape[0]
    next_pos = attn.sum(-1, keepdim=True)  # the position of the first generated token, per row
    eos = torch.as_tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    generated: list[torch.Tensor] = []
    ones = torch.ones((n, 1), dtype=attn.dtype, device=device)
    uniforms = None
    if isinstance(generator, Sequence) and not sampling.greedy:
        if len(generator) != n:
            raise ValueError(f"sample_completions: {len(generator)} generators for {n} completions")
        uniforms = torch.stack([torch.rand(sampling.max_new_tokens, generator=g, device=g.device) for g in generator])
        uniforms = uniforms.to(device)
    for t in range(sampling.max_new_tokens):
        token = pick_tokens(
            logits,
            sampling,
            None if uniforms is not None else generator,
            uniforms[:, t] if uniforms is not None else None,
        )
        token = torch.where(done, torch.full_like(token, pad_id), token)
        generated.append(token)
        done = done | torch.isin(token, eos)
        if t + 1 == sampling.max_new_tokens or bool(done.all()):
            break
        if padded:
            attn = torch.cat([attn, ones], dim=1)
        out = model(
            input_ids=token[:, None],
            attention_mask=attn if padded else None,
            position_ids=next_pos,
            past_key_values=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1]
        cache = out.past_key_values
        next_pos = next_pos + 1
    model.train(was_training)

    tokens = torch.stack(generated, dim=1) if generated else torch.zeros((n, 0), dtype=torch.long, device=device)
    is_eos = torch.isin(tokens, eos)
    # keep tokens up to and including the first EOS: a position is kept while no EOS came *before* it
    before = is_eos.long().cumsum(-1) - is_eos.long()
    mask = (before == 0).long()
    tokens = tokens.masked_fill(mask == 0, pad_id)
    return Completions(tokens=tokens, mask=mask, finished=is_eos.any(-1), group_size=group_size)


def truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text up to the first stop string (exclusive), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
