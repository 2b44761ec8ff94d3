"""Chat templates → token ids and loss masks.

The tokenizer's own chat template (or a named built-in one) renders each conversation once; the loss mask
comes from character spans of the assistant turns, mapped onto tokens through the fast tokenizer's offsets.
That works for any template that renders conversations prefix-consistently, without needing the
template to carry `{% generation %}` markers — and the check below says so plainly when one does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tuneforge.errors import TuneforgeError


def render_chat(
    tokenizer: Any, messages: Sequence[dict], template: str | None, add_generation_prompt: bool = False
) -> str:
    """Render messages to text with `template` (or the tokenizer's own) — the one path used for train and serve."""
    clean = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    return tokenizer.apply_chat_template(
        clean, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
    )


def assistant_spans(
    tokenizer: Any, messages: Sequence[dict], template: str | None, loss_on: str = "assistant"
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans that carry loss.

    An assistant turn's span runs from the end of the prompt that precedes it (rendered with the generation
    prompt) to the end of the conversation rendered through that turn, so the end-of-turn token is learned.
    Messages with ``weight: 0`` carry no loss, as in OpenAI's fine-tuning format.
    """
    text = render_chat(tokenizer, messages, template)
    if loss_on == "all":
        return text, [(0, len(text))]
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or message.get("weight", 1) == 0:
            continue
        before = render_chat(tokenizer, messages[:i], template, add_generation_prompt=True) if i else ""
        through = render_chat(tokenizer, messages[: i + 1], template)
        if not (text.startswith(through) and through.startswith(before)):
            raise TuneforgeError(
                "the chat template does not render conversations prefix-consistently (an earlier turn "
                "changes when later turns are added), so assistant-only loss masks cannot be derived; "
                "set model.chat_template to a built-in template such as 'chatml' or set data.loss_on: all"
            )
        spans.append((len(before), len(through)))
    return text, spans


def mask_from_offsets(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """1 for each token whose character range overlaps a span, else 0 (vectorised)."""
    mask = np.zeros(len(offsets), dtype=np.uint8)
    if not spans or len(offsets) == 0:
        return mask
    starts = np.array([s for s, _ in spans])
    ends = np.array([e for _, e in spans])
    tok_start, tok_end = offsets[:, 0], offsets[:, 1]
    idx = np.searchsorted(ends, tok_start, side="right")  # first span that ends after the token starts
    valid = idx < len(spans)
    idx_c = np.minimum(idx, len(spans) - 1)
    overlap = valid & (starts[idx_c] < np.maximum(tok_end, tok_start + 1))
    mask[overlap] = 1
    return mask


def encode_chats(
    tokenizer: Any, conversations: Sequence[Sequence[dict]], template: str | None, loss_on: str = "assistant"
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token ids and loss masks for many conversations (one batched call into the Rust tokenizer)."""
    rendered = [assistant_spans(tokenizer, conv, template, loss_on) for conv in conversations]
    enc = tokenizer([t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for (_, spans), ids, offs in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        offsets = np.asarray(offs, dtype=np.int64).reshape(-1, 2)
        out.append((np.asarray(ids, dtype=np.int32), mask_from_offsets(offsets, spans)))
    return out


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Raw text for continued pre-training: ``bos + text + eos``, cut into chunks of `max_length`."""
    enc = tokenizer(list(texts), add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for ids in enc["input_ids"]:
        full = np.asarray(bos + list(ids) + eos, dtype=np.int32)
        for start in range(0, len(full), max_length):
            chunk = full[start : start + max_length]
            if len(chunk) >= 2:
                out.append((chunk, np.ones(len(chunk), dtype=np.uint8)))
    return out
