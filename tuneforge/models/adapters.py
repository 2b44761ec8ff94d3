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

# Output projections kept in full precision under QLoRA, as in the QLoRA paper: the LM head (GPT-NeoX: embed_out) and
# a classifier's score head.
QLORA_SKIP_MODULES = ("lm_head", "score", "embed_out")


def quiet_bitsandbytes() -> None:
    """Without the optional ``kernels`` package bitsandbytes warns at import that it falls back to its own CPU
    kernels: it does, and they are what tuneforge trains with (see :func:`prepare_qlora`). Call before importing it."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def check_qlora_supported(device_type: str | None = None) -> None:
    """QLoRA needs bitsandbytes (``pip install 'tuneforge[qlora]'``) and a device its 4-bit kernels run on."""
    quiet_bitsandbytes()
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RecipeError("adapter.kind: qlora needs bitsandbytes: pip install 'tuneforge[qlora]'") from None
    if device_type is not None and device_type not in ("cpu", "cuda"):
        raise RecipeError(
            f"adapter.kind: qlora runs on cpu or cuda (bitsandbytes' 4-bit kernels), not {device_type}; "
            "use adapter.kind: lora there"
        )


def qlora_quantization(precision: str) -> Any:
    """The QLoRA paper's storage (Dettmers et al. 2023): NF4 weights in blocks of 64, their absmax quantized again
    (double quantization), dequantized to the run's compute dtype for each matmul."""
    import torch
    from transformers import BitsAndBytesConfig

    quiet_bitsandbytes()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=list(QLORA_SKIP_MODULES),
    )


def prepare_qlora(model: Any) -> Any:
    """A 4-bit base made ready for LoRA training (PEFT's ``prepare_model_for_kbit_training``: frozen, norms and
    embeddings in fp32; gradient checkpointing is left to the recipe).

    bitsandbytes repacks a 4-bit weight in place for its AVX-512 inference kernel the first time the layer runs in
    eval mode without gradients on a CPU (a validation pass, sampling). The repacked layer then has no backward, so
    training after it would silently drop the base's input gradients — and the repacking refuses layers whose
    output size is not a multiple of its tile. Each layer keeps the packing it trains with instead.

    A 4-bit layer's ``state_dict`` carries its quantization tables, which plain ``load_state_dict`` refuses as
    unexpected keys; each layer takes them back itself, so the model's state round-trips (an elastic replica heals
    from a peer's).
    """
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            module.register_load_state_dict_pre_hook(load_quant_state)
    return model


def load_quant_state(module: Any, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Copy a 4-bit layer's quantization tables out of `state_dict` into its own (a ``load_state_dict`` pre-hook);
    the packed weight itself loads as any parameter does."""
    import torch

    state = module.weight.quant_state
    tables = {"absmax": state.absmax, "quant_map": state.code}
    if state.nested:
        tables |= {"nested_absmax": state.state2.absmax, "nested_quant_map": state.state2.code}
    with torch.no_grad():
        for key, table in tables.items():
            value = state_dict.pop(f"{prefix}weight.{key}", None)
            if value is not None:
                table.copy_(value)
    for key in [k for k in state_dict if k.startswith(f"{prefix}weight.quant_state.")]:
        del state_dict[key]  # shape, dtype and block sizes: fixed by the layer, the same on every replica


def peft_config(cfg: AdapterConfig, task_type: str = "CAUSAL_LM", tied_embeddings: bool = False) -> Any:
    """The PEFT config for the recipe's adapter; ``task_type`` ``SEQ_CLS`` also trains and saves a scalar head.

    ``tied_embeddings``: the model's LM head shares the input embedding's weight. A trained embedding
    (``modules_to_save``) then keeps the head tied to it, as full fine-tuning does; otherwise PEFT would train a copy
    of the embedding while the head kept the base's weight, and the merged model would differ from the trained one.
    """
    import peft

    common = dict(task_type=peft.TaskType[task_type])
    if cfg.kind in ("lora", "dora", "qlora"):
        return peft.LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            modules_to_save=list(cfg.modules_to_save) or None,
            ensure_weight_tying=tied_embeddings and bool(cfg.modules_to_save),
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

    tied = task_type == "CAUSAL_LM" and bool(getattr(model.config, "tie_word_embeddings", False))
    try:
        with peft_quietly():
            return peft.get_peft_model(model, peft_config(cfg, task_type, tied_embeddings=tied))
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
