"""Adapters through PEFT — LoRA, DoRA, QLoRA, prompt / P- / prefix tuning — or full fine-tuning.

tuneforge never re-implements an adapter: the recipe's `adapter` section maps onto PEFT configs, and a
result saves as a standard PEFT adapter directory that plain `peft` loads.
"""

from __future__ import annotations

from typing import Any

from tuneforge.config import AdapterConfig
from tuneforge.errors import RecipeError

PROMPT_LEARNING = {"prompt_tuning", "p_tuning", "prefix_tuning"}


def check_qlora_supported() -> None:
    """QLoRA needs a CUDA GPU and bitsandbytes; say why plainly when they are missing."""
    import torch

    if not torch.cuda.is_available():
        raise RecipeError(
            "adapter.kind: qlora needs a CUDA GPU (bitsandbytes' 4-bit kernels run on CUDA only) and none was "
            "found; use adapter.kind: lora on this machine, which trains the same adapter on unquantised weights"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RecipeError("adapter.kind: qlora needs bitsandbytes: pip install bitsandbytes") from None


def peft_config(cfg: AdapterConfig) -> Any:
    import peft

    common = dict(task_type=peft.TaskType.CAUSAL_LM)
    if cfg.kind in ("lora", "dora", "qlora"):
        return peft.LoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
            use_dora=cfg.kind == "dora", bias="none", **common,
        )
    if cfg.kind == "prompt_tuning":
        return peft.PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **common)
    if cfg.kind == "p_tuning":
        return peft.PromptEncoderConfig(num_virtual_tokens=cfg.num_virtual_tokens, encoder_hidden_size=128, **common)
    if cfg.kind == "prefix_tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **common)
    raise ValueError(cfg.kind)


def apply_adapter(model: Any, cfg: AdapterConfig) -> Any:
    """Wrap `model` with the recipe's adapter (or leave it whole for full fine-tuning)."""
    if cfg.kind == "full":
        model.requires_grad_(True)
        return model
    import peft

    try:
        return peft.get_peft_model(model, peft_config(cfg))
    except ValueError as e:
        raise RecipeError(f"adapter: {e}") from None


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


def trainable_parameters(model: Any) -> list[tuple[str, Any]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
