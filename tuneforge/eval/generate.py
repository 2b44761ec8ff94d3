"""Batched greedy generation for evaluation: left-padded prompts, KV cache, the training chat template."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tuneforge.data.templates import render_chat


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[dict]],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    template: str | None = None,
) -> list[str]:
    """Greedy completions of the assistant turn for each conversation, decoded without special tokens.

    Prompts are sorted by length so each batch pads little; the output order matches the input order.
    """
    model.eval()
    device = next(model.parameters()).device
    prompts = [
        render_chat(tokenizer, conv, template or tokenizer.chat_template, add_generation_prompt=True)
        for conv in conversations
    ]
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(encoded)
    pad = tokenizer.pad_token_id
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
            eos_token_id=tokenizer.eos_token_id,
        )
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).strip()
    return out
