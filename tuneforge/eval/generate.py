"""Batched greedy generation for evaluation: left-padded prompts, KV cache, the training chat template.

Generation stops where serving stops: at the template's end-of-turn token (Llama 3's ``<|eot_id|>``, Phi's
``<|end|>``…, read off the template by :func:`tuneforge.data.templates.end_of_turn`) as well as at eos — a model
whose eos is another token would otherwise keep writing the next turn into its answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tuneforge.data.templates import end_of_turn, render_chat


def generate_answers(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[dict]],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    template: str | None = None,
    stop_token_ids: Sequence[int] | None = None,
) -> list[str]:
    """Greedy completions of the assistant turn for each conversation, decoded without special tokens.

    The prompt is the conversation rendered with the generation prompt, exactly as serving renders it.
    ``stop_token_ids`` defaults to :func:`stop_ids` of the template.
    """
    template = template or tokenizer.chat_template
    prompts = [render_chat(tokenizer, conv, template, add_generation_prompt=True) for conv in conversations]
    stops = list(stop_token_ids) if stop_token_ids is not None else stop_ids(tokenizer, template)
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    return generate_from_ids(
        model, tokenizer, encoded, max_new_tokens=max_new_tokens, batch_size=batch_size, stops=stops
    )


@torch.no_grad()
def generate_from_ids(
    model: Any,
    tokenizer: Any,
    encoded: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    stops: Sequence[int],
) -> list[str]:
    """Greedy completions of tokenized prompts, stopping at any of ``stops``.

    Prompts are sorted by length (ties in input order) so each batch pads little; the output order is the input's.
    """
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (list(stops) or [0])[0]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = encoded[i]
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=list(stops),
        )
        stop_set = set(stops)
        for row, i in enumerate(idx):
            new = generated[row, width:].tolist()
            end = next((k for k, t in enumerate(new) if t in stop_set), len(new))  # the stop token is not the answer
            out[i] = tokenizer.decode(new[:end], skip_special_tokens=True).strip()
    return out


def stop_ids(tokenizer: Any, template: str | None = None) -> list[int]:
    """Token ids that end an answer: the template's end-of-turn token and the tokenizer's eos."""
    ids = []
    eot = end_of_turn(tokenizer, template or tokenizer.chat_template) if (template or tokenizer.chat_template) else None
    for token in (eot, tokenizer.eos_token):
        if token is not None:
            tid = tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
                ids.append(tid)
    return ids
