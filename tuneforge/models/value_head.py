"""PPO's value head: a scalar on the policy's last hidden state, sharing its trunk.

It is attached to the policy module, so the optimizer, checkpoints, live recovery and resume all include it;
before the result is saved it is detached again (the result is a plain causal LM or adapter) and kept next to it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tuneforge.files import atomic_path
from tuneforge.models.adapters import unwrap

VALUE_HEAD_FILE = "value_head.safetensors"


def attach_value_head(model: torch.nn.Module) -> torch.nn.Module:
    """A zero-initialised ``Linear(hidden, 1)`` as ``model.value_head``: every value starts at 0."""
    hidden = unwrap(model).config.hidden_size
    head = torch.nn.Linear(hidden, 1, device=next(model.parameters()).device, dtype=torch.float32)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    model.value_head = head
    return model


def value_head_of(model: torch.nn.Module) -> torch.nn.Module:
    head = getattr(model, "value_head", None)
    if not isinstance(head, torch.nn.Module):
        raise RuntimeError("this model has no value head (attach_value_head was not called)")
    return head


def save_value_head(model: torch.nn.Module, run_dir: Path) -> Path | None:
    """Detach the value head (so the saved result is a plain policy) and save it as ``value_head.safetensors``."""
    from safetensors.torch import save_file

    head = getattr(model, "value_head", None)
    if head is None:
        return None
    del model.value_head
    path = Path(run_dir) / VALUE_HEAD_FILE
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(tmp))
    return path
