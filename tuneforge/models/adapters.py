"""Adapters through PEFT — LoRA, DoRA, QLoRA, prompt / P- / prefix tuning — or full fine-tuning.

tuneforge never re-implements an adapter: the recipe's `adapter` section maps onto PEFT configs, and a
result saves as a standard PEFT adapter directory that plain `peft` loads.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

from tuneforge.config import AdapterConfig
from tuneforge.errors import RecipeError


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


def peft_config(cfg: AdapterConfig, task_type: str = "CAUSAL_LM") -> Any:
    """The PEFT config for the recipe's adapter; ``task_type`` ``SEQ_CLS`` also trains and saves a scalar head."""
    import peft

    common = dict(task_type=peft.TaskType[task_type])
    if cfg.kind in ("lora", "dora", "qlora"):
        return peft.LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            use_dora=cfg.kind == "dora",
            bias="none",
            **common,
        )
    if cfg.kind == "prompt_tuning":
        return peft.PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **common)
    if cfg.kind == "p_tuning":
        return peft.PromptEncoderConfig(num_virtual_tokens=cfg.num_virtual_tokens, encoder_hidden_size=128, **common)
    if cfg.kind == "prefix_tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **common)
    raise ValueError(cfg.kind)


@contextlib.contextmanager
def peft_quietly() -> Iterator[None]:
    """PEFT reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a model, which prints a
    ``FutureWarning`` at every run that is neither ours to fix nor the user's; only that warning is hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def apply_adapter(model: Any, cfg: AdapterConfig, task_type: str = "CAUSAL_LM") -> Any:
    """Wrap `model` with the recipe's adapter (or leave it whole for full fine-tuning)."""
    if cfg.kind == "full":
        model.requires_grad_(True)
        return model
    import peft

    try:
        with peft_quietly():
            return peft.get_peft_model(model, peft_config(cfg, task_type))
    except ValueError as e:
        raise RecipeError(f"adapter: {e}") from None


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute activations in the backward pass (non-reentrant: works with adapters and frozen inputs)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if is_peft(model):
        model.enable_input_require_grads()


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


def unwrap(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (adapter layers are injected in place, so it runs them)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_prompt_learning(model: Any) -> bool:
    """Prompt / P- / prefix tuning: virtual tokens prepended to the input, not adapted layers."""
    cfg = getattr(model, "active_peft_config", None)
    return bool(getattr(cfg, "is_prompt_learning", False))


@contextlib.contextmanager
def adapter_disabled(model: Any) -> Iterator[Any]:
    """The base model: the adapter switched off in place for the block (no copy of any weight).

    For LoRA-style tuners the layers are toggled directly: ``PeftModel.disable_adapter`` first inspects the state
    of every layer, which costs more than the reference forward of a small model.
    """
    tuner = getattr(model, "base_model", None)
    if is_prompt_learning(model) or not hasattr(tuner, "disable_adapter_layers"):
        with model.disable_adapter():
            yield model
        return
    tuner.disable_adapter_layers()
    try:
        yield model
    finally:
        tuner.enable_adapter_layers()


def trainable_parameters(model: Any) -> list[tuple[str, Any]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def is_peft_dir(path: Any) -> bool:
    """Whether a saved result directory holds a PEFT adapter (rather than full weights)."""
    from pathlib import Path

    return (Path(path) / "adapter_config.json").is_file()
