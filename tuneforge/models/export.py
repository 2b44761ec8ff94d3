"""Save and export results in standard Hugging Face form (safetensors only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneforge.errors import ModelError


def save_result(model: Any, tokenizer: Any, out_dir: Path) -> Path:
    """A PEFT adapter directory for adapters, a full model directory otherwise; the tokenizer goes with it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None) -> Path:
    """Fold a LoRA/DoRA adapter into its base weights and save a plain transformers model."""
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.models.loading import check_model_path, quiet_transformers

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise ModelError(f"{adapter_dir}: not a PEFT adapter directory (expected adapter_config.json)")
    quiet_transformers()
    config = PeftConfig.from_pretrained(str(adapter_dir))
    base_name = base or config.base_model_name_or_path
    check_model_path(base_name)
    model = AutoModelForCausalLM.from_pretrained(base_name, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir))
    if not hasattr(merged, "merge_and_unload") or config.is_prompt_learning:
        raise ModelError(f"{adapter_dir}: {config.peft_type} adapters have no weights to merge; serve them with PEFT")
    merged = merged.merge_and_unload()
    out = Path(out_dir)
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(out)
    return out
