"""Model forward passes that compute only what the objective needs.

A language model's vocabulary projection is often its single largest matmul, and in SFT most positions
(prompts, padding) carry no loss. We run the decoder, keep the hidden states at supervised positions and
project only those — the same loss, a fraction of the work. Models whose head is more than a linear layer
(e.g. logit soft-capping) and prompt-learning adapters take the full forward instead.
"""

from __future__ import annotations

from typing import Any

import torch

from tuneforge.data.batching import IGNORE, Batch


def _causal_lm(model: Any) -> Any:
    """The transformers CausalLM inside a PEFT wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_selective_head(model: Any) -> bool:
    lm = _causal_lm(model)
    peft_cfg = getattr(model, "active_peft_config", None)
    if peft_cfg is not None and getattr(peft_cfg, "is_prompt_learning", False):
        return False
    if getattr(lm.config, "final_logit_softcapping", None):
        return False
    return hasattr(lm, "get_decoder") and lm.get_output_embeddings() is not None


def supervised_logits(model: Any, batch: Batch, selective: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, V) at the supervised positions of the batch and their targets (N,)."""
    keep = batch.labels != IGNORE
    targets = batch.labels[keep]
    if selective:
        lm = _causal_lm(model)
        hidden = lm.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
        hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
        return lm.get_output_embeddings()(hidden[keep]), targets
    out = model(input_ids=batch.input_ids, attention_mask=torch.ones_like(batch.input_ids), use_cache=False)
    logits = out.logits[:, -batch.input_ids.shape[1] :]  # prompt tuning prepends virtual tokens
    return logits[keep], targets

