"""Log-likelihood of continuations given a context: multiple choice and perplexity, batched and KV-cached.

A multiple-choice item asks for ``log p(choice | context)`` of each of its choices. The choices share the context,
so it runs through the model once: the context's keys and values are cached, copied to one row per choice, and
only the choices' own tokens go through the model again. For four choices after a 100-token question that is
about a quarter of the work of scoring each (context, choice) pair on its own, as lm-evaluation-harness does; and
logits are projected onto the vocabulary only where a continuation token is predicted.

What is computed is exactly lm-evaluation-harness's definition (checked against it in tests): the sum of the
continuation tokens' log-probabilities, whether each is the greedy choice, and the same left truncation when
context + continuation exceed the model's length.

Order is canonical — requests sorted by length, longest first, ties by position — so a run is reproducible
bit for bit at a given batch size; across batch sizes only the padding changes, which moves results by float
rounding (≈1e-6), never an accuracy.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Request:
    """Continuations to score after one shared context (token ids; the context is at least one token)."""

    context: Sequence[int]
    continuations: Sequence[Sequence[int]]


@dataclass(frozen=True)
class Scored:
    """``log p(continuation | context)``, whether greedy decoding would have written it, and its length."""

    logprob: float
    greedy: bool
    tokens: int


def model_max_length(model: Any, default: int = 2048) -> int:
    """The longest input the model takes, from its config (lm-evaluation-harness's order of attributes)."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def _base(model: Any) -> Any:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def shares_context(model: Any) -> bool:
    """Whether the context's KV cache can be reused: not for PEFT prompt learning, which owns the cache."""
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict):
        active = peft_config.get(getattr(model, "active_adapter", "default"))
        if active is not None and getattr(active, "is_prompt_learning", False):
            return False
    return True


def _keeps_logits(model: Any) -> bool:
    return "logits_to_keep" in inspect.signature(_base(model).forward).parameters


def _truncate(request: Request, max_length: int) -> tuple[list[int], list[list[int]]]:
    """Keep the last ``max_length + 1`` tokens of context + longest continuation (the model sees all but the last)."""
    conts = [list(c) for c in request.continuations]
    if not conts or any(len(c) == 0 for c in conts):
        raise ValueError("every request needs at least one continuation, and continuations at least one token")
    if not request.context:
        raise ValueError("a request needs at least one context token (use the bos token for none)")
    longest = max(len(c) for c in conts)
    if longest > max_length:
        raise ValueError(f"a continuation of {longest} tokens is longer than the model's {max_length}")
    return list(request.context)[-(max_length + 1 - longest) :], conts


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``targets`` under ``logits`` (..., V) and whether each target is the argmax, in fp32."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1), logits.argmax(dim=-1) == targets


@torch.no_grad()
def score(
    model: Any,
    requests: Sequence[Request],
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    share_context: bool | None = None,
) -> list[list[Scored]]:
    """Score every continuation of every request; one list per request, in input order.

    ``batch_size`` is the number of continuations per forward pass (lm-evaluation-harness's meaning). With
    ``share_context`` (default: whenever the model allows it) each context runs once and is reused from the cache.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    model.eval()
    max_length = max_length or model_max_length(model)
    shared = shares_context(model) if share_context is None else share_context
    prepared = [_truncate(r, max_length) for r in requests]
    order = sorted(range(len(prepared)), key=lambda i: (-(len(prepared[i][0]) + max(map(len, prepared[i][1]))), i))
    out: list[list[Scored]] = [[] for _ in prepared]
    batch: list[int] = []
    for i in [*order, None]:
        full = i is None or (batch and sum(len(prepared[j][1]) for j in batch) + len(prepared[i][1]) > batch_size)
        if full and batch:
            fn = _score_shared if shared else _score_flat
            for j, scored in zip(batch, fn(model, [prepared[j] for j in batch])):
                out[j] = scored
            batch = []
        if i is not None:
            batch.append(i)
    return out


def _score_shared(model: Any, batch: list[tuple[list[int], list[list[int]]]]) -> list[list[Scored]]:
    """Contexts once (left-padded, cached), then every continuation on a copy of its context's cache."""
    device = next(model.parameters()).device
    keep = {"logits_to_keep": 1} if _keeps_logits(model) else {}
    lengths = torch.tensor([len(c) for c, _ in batch], device=device)
    width = int(lengths.max())
    ids = torch.zeros((len(batch), width), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for b, (ctx, _) in enumerate(batch):
        ids[b, width - len(ctx) :] = torch.tensor(ctx, device=device)
        mask[b, width - len(ctx) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each row starts at position 0, whatever its padding
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep)
    next_logits = out.logits[:, -1]  # (B, V): what follows each context

    rows = [(b, cont) for b, (_, conts) in enumerate(batch) for cont in conts]
    owner = torch.tensor([b for b, _ in rows], device=device)
    first = torch.tensor([cont[0] for _, cont in rows], device=device)
    lp, greedy = _token_logprobs(next_logits[owner], first)
    total, all_greedy = lp.double(), greedy.clone()

    tail = max(len(cont) for _, cont in rows) - 1
    if tail > 0:  # continuations longer than one token: their remaining tokens, on the shared cache
        cache = out.past_key_values
        cache.reorder_cache(owner)  # one cache row per continuation (index_select on the batch axis)
        inp = torch.zeros((len(rows), tail), dtype=torch.long, device=device)
        targets = torch.zeros_like(inp)
        valid = torch.zeros((len(rows), tail), dtype=torch.bool, device=device)
        for r, (_, cont) in enumerate(rows):
            n = len(cont) - 1
            if n:
                inp[r, :n] = torch.tensor(cont[:-1], device=device)
                targets[r, :n] = torch.tensor(cont[1:], device=device)
                valid[r, :n] = True
        attention = torch.cat([mask[owner], valid.long()], dim=1)
        pos = lengths[owner, None] + torch.arange(tail, device=device)
        logits = model(input_ids=inp, attention_mask=attention, position_ids=pos, past_key_values=cache).logits
        lp, greedy = _token_logprobs(logits, targets)
        total += (lp.double() * valid).sum(-1)
        all_greedy &= (greedy | ~valid).all(-1)
    return _regroup(batch, rows, total, all_greedy)


def _score_flat(model: Any, batch: list[tuple[list[int], list[list[int]]]]) -> list[list[Scored]]:
    """Each (context, continuation) as its own right-padded row: for models whose cache is not ours to reuse."""
    device = next(model.parameters()).device
    rows = [(b, cont) for b, (_, conts) in enumerate(batch) for cont in conts]
    seqs = [batch[b][0] + cont[:-1] for b, cont in rows]
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s, device=device)
        mask[r, : len(s)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits
    offset = logits.shape[1] - width  # prompt tuning prepends virtual tokens to the logits
    total = torch.zeros(len(rows), dtype=torch.float64, device=device)
    all_greedy = torch.ones(len(rows), dtype=torch.bool, device=device)
    for r, (b, cont) in enumerate(rows):
        start = offset + len(batch[b][0]) - 1
        lp, greedy = _token_logprobs(logits[r, start : start + len(cont)], torch.tensor(cont, device=device))
        total[r] = lp.double().sum()
        all_greedy[r] = bool(greedy.all())
    return _regroup(batch, rows, total, all_greedy)


def _regroup(
    batch: list[tuple[list[int], list[list[int]]]],
    rows: list[tuple[int, list[int]]],
    total: torch.Tensor,
    greedy: torch.Tensor,
) -> list[list[Scored]]:
    out: list[list[Scored]] = [[] for _ in batch]
    for (b, cont), lp, g in zip(rows, total.tolist(), greedy.tolist()):
        out[b].append(Scored(float(lp), bool(g), len(cont)))
    return out


def rolling_requests(tokens: Sequence[int], prefix: int, max_length: int) -> list[Request]:
    """A long text as windows that together score every token once, as lm-evaluation-harness's rolling
    log-likelihood does: the first window follows ``prefix`` (bos), each full later one the token before it, and
    the last, shorter one as many earlier tokens as fit in ``max_length``."""
    t = list(tokens)
    if not t:
        return []
    first = min(max_length, len(t))
    out = [Request([prefix], [t[:first]])]
    done = first
    while done < len(t):
        end = done + min(len(t) - done, max_length)
        out.append(Request(t[end - max_length - 1 : done], [t[done:end]]))
        done = end
    return out
