"""Reward models: a transformers ``…ForSequenceClassification`` with one scalar output.

``method: reward`` builds one from a base model (:func:`load_scalar_head_model`, then an adapter with PEFT's
``SEQ_CLS`` task so the head trains and saves with it); PPO and evaluation load a trained one
(:func:`load_reward_model`) and score whole conversations with it (:func:`score_conversations`). Results load
with plain ``AutoModelForSequenceClassification``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tuneforge.data.templates import render_chat
from tuneforge.errors import ModelError
from tuneforge.models.adapters import peft_quietly, unwrap
from tuneforge.models.loading import check_model_path, load_tokenizer, quiet_transformers


def load_scalar_head_model(
    path: str,
    device: torch.device,
    *,
    tokenizer: str | None = None,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
) -> Any:
    """The base with a fresh scalar head (``num_labels=1``) in fp32 on `device`."""
    from transformers import AutoModelForSequenceClassification

    check_model_path(path)
    quiet_transformers()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=1,
            dtype=torch.float32,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load {path} with a scalar (sequence-classification) head: {e}") from None
    if model.config.pad_token_id is None:  # HF pooling finds the last real token by the pad id
        model.config.pad_token_id = load_tokenizer(tokenizer or path, None, trust_remote_code).pad_token_id
    return model.to(device)


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """A trained reward model (full model or PEFT adapter directory) and its tokenizer, frozen, ready to score."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    quiet_transformers()
    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForSequenceClassification

        with peft_quietly():
            model = AutoPeftModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=torch.float32)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval().requires_grad_(False), tokenizer


def reward_model_parts(model: Any) -> tuple[Any, Any] | None:
    """The decoder and scalar head of a sequence classifier (inside PEFT), if it has both."""
    lm = unwrap(model)
    decoder = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    head = getattr(lm, "score", None)
    return (decoder, head) if decoder is not None and head is not None else None


@torch.no_grad()
def score_conversations(
    model: Any, tokenizer: Any, conversations: Sequence[Sequence[dict]], batch_size: int = 16
) -> torch.Tensor:
    """Rewards of whole conversations (prompt + response), rendered with the reward model's own chat template."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(conversations), batch_size):
        texts = [render_chat(tokenizer, conv, None) for conv in conversations[start : start + batch_size]]
        enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
        out.append(model(**enc).logits[:, 0].float().cpu())
    return torch.cat(out) if out else torch.zeros(0)
