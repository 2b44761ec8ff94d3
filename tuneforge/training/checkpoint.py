"""Checkpoints for exact resume: trainable weights, optimizer, scheduler, RNG states and the step.

The data position is the step itself — the plan is a pure function of the recipe — so restoring these
states and continuing at ``step`` reproduces the uninterrupted run's losses exactly. Only trainable
parameters are stored (an adapter checkpoint is megabytes, not the base model).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from tuneforge.errors import TuneforgeError
from tuneforge.models.checkpoint_model import WEIGHTS_FILE, load_trainable


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    directory: Path,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``step-N`` atomically and prune all but the newest `keep` checkpoints."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:07d}"
    tmp = directory / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / WEIGHTS_FILE))
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "meta": meta,
        },
        tmp / "state.pt",
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.startswith("step-") and (p / "state.pt").exists())


def find_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory, a ``checkpoints`` directory or a run directory; return the newest."""
    p = Path(path)
    if (p / "state.pt").exists():
        return p
    for candidate in (p / "checkpoints", p):
        found = list_checkpoints(candidate)
        if found:
            return found[-1]
    raise TuneforgeError(f"--resume {path}: no checkpoint found (expected a run directory with checkpoints/step-N)")


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore states in place; returns the saved metadata (with ``step``)."""
    load_trainable(path, model)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return {"step": state["step"], **state["meta"]}
