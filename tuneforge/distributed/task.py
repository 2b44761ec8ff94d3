"""The contract between the elastic engine and what is being trained.

A replica process knows nothing about SFT, models or data: it imports a *task factory* named by an
importable ``"module:callable"`` string, calls it with a JSON-able config dict, and drives the
returned object through this protocol. The engine owns membership, sample assignment, gradient
all-reduce, commit/rollback, live recovery and checkpoints; the task owns the maths.

Optional hooks, used when present: ``state_dict(model, optimizer, scheduler) -> dict`` and
``load_state_dict(model, optimizer, scheduler, state)`` (what live recovery and disk checkpoints carry;
default: the three objects' own state dicts), ``log_step(step, metrics)`` (called on the rank-0 replica
after each committed step) and ``save_final(model, out_dir)`` (rank 0, at the end).

Exactness rule: ``forward_backward`` must add ``scale * (sum of per-token losses of its samples)`` to
the gradients, where ``scale = 1 / loss_tokens(global batch)``. Summing those over replicas gives the
global-batch mean whatever the split, so membership changes do not change the result.

Metrics whose key ends in :data:`MAX_SUFFIX` (e.g. a replica's peak memory, ``"peak_mb.max"``) are combined with
a maximum instead of a sum, over micro-batches and over replicas.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from tuneforge.errors import RecipeError

if TYPE_CHECKING:  # keep replica start-up lean: torch is imported by whoever builds the task
    import torch

MAX_SUFFIX = ".max"  # a metric combined by maximum (over micro-batches and replicas), not by sum


@runtime_checkable
class ReplicaTask(Protocol):
    """What a trainable job provides to the engine (one instance per replica process)."""

    def build(self, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
        """Model, optimizer and LR scheduler (or None), identical in every replica for a seed."""
        ...

    def num_samples(self) -> int:
        """Number of samples addressable by global index."""
        ...

    def loss_tokens(self, indices: Sequence[int]) -> int:
        """How many loss-bearing tokens the samples ``indices`` hold (the normaliser of the batch loss)."""
        ...

    def forward_backward(self, model: torch.nn.Module, indices: Sequence[int], scale: float) -> Mapping[str, float]:
        """Run forward + backward on ``indices``; gradients accumulate ``scale * loss_sum``.

        The returned numbers are *summed* over micro-batches and replicas by the engine, so return
        contributions (e.g. ``loss_sum * scale``) whose sum is the quantity to log; keys ending in
        :data:`MAX_SUFFIX` are maximised instead. Return the same keys on every call (they are
        all-reduced together).
        """
        ...


def task_state_dict(task: Any, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """The task's live state: its own ``state_dict`` hook if it has one, else model/optimizer/scheduler."""
    hook = getattr(task, "state_dict", None)
    if callable(hook):
        return hook(model, optimizer, scheduler)
    state: dict[str, Any] = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    return state


def load_task_state(task: Any, model: Any, optimizer: Any, scheduler: Any, state: Mapping[str, Any]) -> None:
    """Inverse of :func:`task_state_dict`."""
    hook = getattr(task, "load_state_dict", None)
    if callable(hook):
        hook(model, optimizer, scheduler, state)
        return
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])


def resolve_factory(spec: str) -> Any:
    """Import ``"package.module:callable"`` and return the callable, with a clear error if it is wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RecipeError(f"task factory {spec!r}: expected 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RecipeError(f"task factory {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RecipeError(f"task factory {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RecipeError(f"task factory {spec!r}: {attr!r} is not callable")
    return obj


def load_task(spec: str, config: Mapping[str, Any]) -> ReplicaTask:
    """Build the task in this process: ``factory(config)``; checks the result has the protocol's methods."""
    task = resolve_factory(spec)(dict(config))
    missing = [m for m in ("build", "num_samples", "loss_tokens", "forward_backward") if not hasattr(task, m)]
    if missing:
        raise RecipeError(f"task factory {spec!r} returned {type(task).__name__} without {', '.join(missing)}")
    return task
