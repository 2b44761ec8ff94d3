"""A training checkpoint (``checkpoints/step-N``) as a model directory that plain transformers / PEFT loads.

A checkpoint holds only the trainable weights plus optimizer state (for exact resume), not a PEFT adapter or
a full model. To use one as a model — the jobs service names them ``ft:…:ckpt-step-N`` — the recipe's model is
rebuilt exactly as training built it, the weights are copied in, and the result is saved once, the same way a
finished run saves its result, into ``step-N/export/`` (pruned together with the checkpoint).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from tuneforge.errors import ModelError

EXPORT_DIR = "export"
WEIGHTS_FILE = "trainable.safetensors"


def is_training_checkpoint(path: str | Path) -> bool:
    return (Path(path) / WEIGHTS_FILE).is_file()


def load_trainable(ckpt: Path, model: Any) -> None:
    """Copy a checkpoint's trainable weights into `model` in place; a weight the model lacks is a clear error."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / WEIGHTS_FILE))
    params = dict(model.named_parameters())
    unknown = [name for name in weights if name not in params]
    if unknown:
        raise ModelError(f"{ckpt}: the checkpoint does not match this model or adapter (unknown weight {unknown[0]})")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def export_checkpoint(ckpt: str | Path) -> Path:
    """``ckpt/export``: an adapter directory (adapter runs) or a full model directory, written on first use."""
    ckpt = Path(ckpt)
    out = ckpt / EXPORT_DIR
    if (out / "adapter_config.json").is_file() or (out / "config.json").is_file():
        return out
    if not is_training_checkpoint(ckpt):
        raise ModelError(f"{ckpt}: not a training checkpoint (expected {WEIGHTS_FILE}); it may have been pruned")
    recipe_file = ckpt.parent.parent / "recipe.yaml"
    if not recipe_file.is_file():
        raise ModelError(f"{ckpt}: its run directory has no recipe.yaml, so the model it belongs to is unknown")

    import torch

    from tuneforge.config import load_recipe
    from tuneforge.methods import method_spec
    from tuneforge.models.export import save_result
    from tuneforge.models.loading import load_tokenizer
    from tuneforge.models.policy import build_model

    recipe = load_recipe(recipe_file)
    with torch.random.fork_rng(devices=[]):  # building seeds torch; the caller's random state stays its own
        model = build_model(recipe, method_spec(recipe.method), torch.device("cpu"))
    load_trainable(ckpt, model)
    if hasattr(model, "value_head"):  # PPO's value head is kept beside results, not in them
        del model.value_head
    m = recipe.model
    tokenizer = load_tokenizer(m.tokenizer or m.path, m.chat_template, m.trust_remote_code)
    tmp = ckpt / f".{EXPORT_DIR}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_result(model, tokenizer, tmp)
    try:
        tmp.rename(out)  # atomic: a concurrent reader sees no export or a whole one
    except OSError:  # another process exported it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out
