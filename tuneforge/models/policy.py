"""The model a recipe trains, built as its method's registry entry says: a causal LM (optionally with a value
head on its trunk) or a sequence classifier with a scalar head, wrapped with the recipe's adapter."""

from __future__ import annotations

import torch

from tuneforge.config import Recipe
from tuneforge.errors import RecipeError
from tuneforge.methods import MethodSpec
from tuneforge.models.adapters import (
    apply_adapter,
    check_qlora_supported,
    enable_gradient_checkpointing,
    prepare_qlora,
    qlora_quantization,
)
from tuneforge.models.loading import load_model
from tuneforge.models.reward import load_scalar_head_model
from tuneforge.models.value_head import attach_value_head
from tuneforge.training.precision import pick_precision


def build_model(recipe: Recipe, spec: MethodSpec, device: torch.device) -> torch.nn.Module:
    """The base model in fp32 (QLoRA: 4-bit NF4) on `device`, with the recipe's adapter; seeded so that every
    replica agrees."""
    torch.manual_seed(recipe.train.seed)
    m = recipe.model
    if spec.model == "sequence_classifier":  # a scalar head instead of the LM head; PEFT trains and saves it
        if recipe.adapter.kind == "qlora":
            raise RecipeError(
                f"adapter.kind: qlora loads a causal LM's base in 4 bits; method {spec.name} trains a sequence "
                "classifier, use adapter.kind: lora"
            )
        model = load_scalar_head_model(
            m.path,
            device,
            tokenizer=m.tokenizer or m.path,
            attn_implementation=m.attn_implementation,
            trust_remote_code=m.trust_remote_code,
        )
        model = apply_adapter(model, recipe.adapter, task_type="SEQ_CLS")
    else:
        quantization = None
        if recipe.adapter.kind == "qlora":  # the frozen base in 4-bit NF4, computed in the run's precision
            check_qlora_supported(device.type)
            quantization = qlora_quantization(pick_precision(recipe.train.precision, device))
        model = load_model(
            m.path,
            dtype=torch.float32,
            device=device,
            attn_implementation=m.attn_implementation,
            trust_remote_code=m.trust_remote_code,
            quantization=quantization,
        )
        if quantization is not None:
            model = prepare_qlora(model)
        model = apply_adapter(model, recipe.adapter)
    if spec.value_head:  # shares the policy's trunk and trains with it
        attach_value_head(model)
    if recipe.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model
