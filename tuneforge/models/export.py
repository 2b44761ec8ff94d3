"""Save and export results in standard Hugging Face form (safetensors only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneforge.errors import ModelError
from tuneforge.models.adapters import peft_quietly

# PEFT task types we can fold, and the transformers head each adapter was trained on.
_CAUSAL_LM = "CAUSAL_LM"
_SEQ_CLS = "SEQ_CLS"


def save_result(model: Any, tokenizer: Any, out_dir: Path) -> Path:
    """A PEFT adapter directory for adapters, a full model directory otherwise; the tokenizer goes with it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def saved_head_rows(adapter_dir: Path, head: str = "score") -> int | None:
    """Output size of the head an adapter saved in full (PEFT ``modules_to_save``), or None if it saved none.

    A sequence-classification adapter does not record ``num_labels``; the saved head's weight does, and the base
    must be loaded with a head of that size for the weights to fit.
    """
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.exists():
        raise ModelError(f"{adapter_dir}: no adapter_model.safetensors (tuneforge saves adapters as safetensors)")
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            parts = key.split(".")
            if head in parts and parts[-1] == "weight" and "lora_A" not in parts and "lora_B" not in parts:
                return int(f.get_slice(key).get_shape()[0])
    return None


def _load_base(adapter_dir: Path, base: str, task_type: str, tokenizer: Any) -> Any:
    """The base model with the head the adapter was trained on, in fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task_type == _CAUSAL_LM:
        return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    rows = saved_head_rows(adapter_dir)
    if rows is None:
        raise ModelError(
            f"{adapter_dir}: a sequence-classification adapter without its 'score' head; merging "
            "it would give an untrained head (train it with tuneforge, which saves the head)"
        )
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=rows, dtype=torch.float32)
    if model.config.pad_token_id is None:  # the merged model must find each row's last token on its own
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None) -> Path:
    """Fold a LoRA/DoRA adapter into its base weights and save a plain transformers model.

    Causal-LM adapters (SFT, DPO, …) become an ``AutoModelForCausalLM`` directory; sequence-classification
    adapters (reward models) become an ``AutoModelForSequenceClassification`` one, with the trained ``score``
    head that PEFT saved whole in place of the base's freshly initialised one.
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoTokenizer

    from tuneforge.models.loading import check_model_path, quiet_transformers

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise ModelError(f"{adapter_dir}: not a PEFT adapter directory (expected adapter_config.json)")
    quiet_transformers()
    config = PeftConfig.from_pretrained(str(adapter_dir))
    if config.is_prompt_learning:
        raise ModelError(f"{adapter_dir}: {config.peft_type} adapters have no weights to merge; serve them with PEFT")
    task_type = str(getattr(config.task_type, "value", config.task_type) or _CAUSAL_LM)
    if task_type not in (_CAUSAL_LM, _SEQ_CLS):
        raise ModelError(
            f"{adapter_dir}: adapter_config.json task_type {task_type!r} cannot be merged; expected "
            f"{_CAUSAL_LM} (language model) or {_SEQ_CLS} (reward model)"
        )
    base_name = base or config.base_model_name_or_path
    check_model_path(base_name)
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    with peft_quietly():
        model = PeftModel.from_pretrained(_load_base(adapter_dir, base_name, task_type, tokenizer), str(adapter_dir))
    if not hasattr(model, "merge_and_unload"):
        raise ModelError(f"{adapter_dir}: {config.peft_type} adapters cannot be merged; serve them with PEFT")
    merged = model.merge_and_unload()
    out = Path(out_dir)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
