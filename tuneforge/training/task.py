"""The contract between the one training loop and a method: ``Prepared`` data and the ``Task`` that trains on it.

A method family's ``prepare(recipe)`` validates and tokenizes everything without a model and returns a
:class:`Prepared`; once the model is built, ``prepared.make_task(...)`` returns a :class:`Task`. The local loop
(:mod:`tuneforge.training.loop`) and every elastic replica (:mod:`tuneforge.training.elastic`) drive the same task
object through the same calls, which is what makes an elastic run end with a local run's weights.

Exactness rule: ``forward_backward(model, indices, scale)`` adds ``scale · Σ losses of its samples`` to the
gradients, with ``scale = 1 / loss_tokens(the whole step's samples)``. Summed over micro-batches or replicas,
that is the step's mean whatever the split. Per-step metrics follow the same rule: each is a
:class:`Weighted` sum and weight, both additive, so a replica's share adds up to the step's value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from tuneforge.config import Recipe
from tuneforge.data.sampler import Plan


class Weighted(NamedTuple):
    """An additive statistic: its value is ``total / weight`` once every share has been added."""

    total: torch.Tensor | float
    weight: torch.Tensor | float

    def value(self) -> float:
        return float(self.total) / float(self.weight) if float(self.weight) else 0.0


@dataclass
class StepOutput:
    """What ``forward_backward`` returns for its share of a step; nothing here forces a host sync."""

    loss_sum: torch.Tensor  # Σ losses of the samples (unscaled)
    tokens_fed: int  # tokens that went through the model (throughput)
    metrics: dict[str, Weighted] = field(default_factory=dict)

    def flat(self, scale: float) -> dict[str, float]:
        """Numbers whose sums over shares are the step's: what an elastic replica all-reduces."""
        out = {"loss": float(self.loss_sum) * scale, "tokens_fed": float(self.tokens_fed)}
        for name, m in self.metrics.items():
            out[f"{name}.total"] = float(m.total)
            out[f"{name}.weight"] = float(m.weight)
        return out


def unflatten_metrics(sums: Mapping[str, float]) -> dict[str, float]:
    """Inverse of :meth:`StepOutput.flat` after summation: ``{"loss", "tokens_fed", **metric values}``."""
    out = {k: float(v) for k, v in sums.items() if not k.endswith((".total", ".weight"))}
    for key, total in sums.items():
        if key.endswith(".total"):
            name = key.removesuffix(".total")
            out[name] = Weighted(total, sums.get(f"{name}.weight", 0.0)).value()
    return out


class MetricSums:
    """Adds the shares of a step's :class:`Weighted` metrics (micro-batches of one replica)."""

    def __init__(self) -> None:
        self.metrics: dict[str, Weighted] = {}

    def add(self, name: str, total: torch.Tensor | float, weight: torch.Tensor | float) -> None:
        old = self.metrics.get(name)
        self.metrics[name] = (
            Weighted(total, weight) if old is None else Weighted(old.total + total, old.weight + weight)
        )

    def add_means(self, means: Mapping[str, torch.Tensor | float], weight: torch.Tensor | float) -> None:
        """Per-micro-batch means (clip fractions, accuracies) weighted by what they averaged over."""
        for name, v in means.items():
            self.add(name.replace("/", "_"), v * weight, weight)


@runtime_checkable
class Task(Protocol):
    """One method's step: which samples exist, what they weigh, forward + backward, held-out evaluation."""

    evaluate_before_training: bool  # score the starting model too (a baseline for online RL)

    def num_samples(self) -> int: ...

    def rows_for_step(self, step: int) -> range:
        """The global sample indices of optimizer step `step`."""
        ...

    def begin_step(
        self,
        model: torch.nn.Module,
        step: int,
        rows: Sequence[int],
        *,
        share: Sequence[int] | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """Anything the whole step needs before a gradient (online sampling, KTO's KL reference point).

        On elastic replicas `share` is this process's part of `rows` and `reduce` sums a tensor over the step's
        participants; a task may split work by share and combine it with `reduce` (online RL samples that way).
        """
        ...

    def loss_tokens(self, indices: Sequence[int]) -> int:
        """The weight of the samples `indices` (supervised tokens, pairs, examples …): the step's divisor."""
        ...

    def forward_backward(self, model: torch.nn.Module, indices: Sequence[int], scale: float) -> StepOutput: ...

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]: ...


class TaskBase:
    """Defaults shared by every task: consecutive rows per step, nothing to do before a step."""

    evaluate_before_training = False

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def num_samples(self) -> int:
        return self.plan.num_steps * self.plan.global_batch_size

    def rows_for_step(self, step: int) -> range:
        g = self.plan.global_batch_size
        return range(step * g, (step + 1) * g)

    def begin_step(
        self,
        model: torch.nn.Module,
        step: int,
        rows: Sequence[int],
        *,
        share: Sequence[int] | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        return None

    def refs(self, rows: Iterable[int]) -> list[tuple[int, int]]:
        """``(source, example)`` of each plan row that holds one example (pairs, prompts, KTO examples)."""
        p = self.plan
        return [(int(p.refs[p.row_offsets[r], 0]), int(p.refs[p.row_offsets[r], 1])) for r in rows]


@runtime_checkable
class Prepared(Protocol):
    """A method's validated, tokenized, planned data — everything short of a model."""

    recipe: Recipe
    tokenizer: Any
    template: str | None
    plan: Plan
    data_hashes: dict[str, str]
    data_info: dict[str, Any]

    @property
    def num_steps(self) -> int: ...

    def mix_dict(self) -> dict[str, Any]: ...

    def mix_metrics(self) -> dict[str, float]: ...

    def mix_summary(self) -> str: ...

    def make_task(
        self, model: torch.nn.Module, micro_batch_size: int, precision: str, device: torch.device
    ) -> Task: ...

    def finish(self, model: torch.nn.Module, run_dir: Any) -> None:
        """Before the result is saved: detach and save anything that is not part of it (PPO's value head)."""
        ...


@dataclass
class PreparedBase:
    """The parts every method's prepared data shares (recipe, tokenizer, plan, hashes) and the mix report."""

    recipe: Recipe
    tokenizer: Any
    template: str | None
    plan: Plan
    data_hashes: dict[str, str]
    data_info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return self.plan.num_steps

    def mix_dict(self) -> dict[str, Any]:
        m = self.plan.mix
        out = {
            "names": m.names,
            "target": m.target,
            "realised": m.realised(),
            "tokens": m.tokens,
            "realised_tokens": m.realised("tokens"),
            "examples": m.examples,
            "passes": m.passes,
            "mix_by": m.mix_by,
        }
        return out

    def mix_metrics(self) -> dict[str, float]:
        return self.plan.mix.as_metrics()

    def mix_summary(self) -> str:
        return self.plan.mix.summary()

    def finish(self, model: torch.nn.Module, run_dir: Any) -> None:
        return None


def held_out_means(parts: Mapping[str, tuple[Mapping[str, float], float]]) -> dict[str, float]:
    """``val/<source>_<key>`` and the overall ``val/<key>`` from per-source sums and weights.

    `parts` maps a source name to (sums of each statistic, the weight they are sums over — tokens, pairs or
    prompts); the overall value weighs every source by its weight, so it is the mean over all held-out items.
    """
    out: dict[str, float] = {}
    totals: dict[str, float] = {}
    weight = 0.0
    for name, (sums, w) in parts.items():
        for key, v in sums.items():
            out[f"val/{name}_{key}"] = v / w if w else 0.0
            totals[key] = totals.get(key, 0.0) + v
        weight += w
    if weight:
        out.update({f"val/{key}": v / weight for key, v in totals.items()})
    return out
