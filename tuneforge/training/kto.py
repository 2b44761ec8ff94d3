"""Kahneman–Tversky optimisation (``method: kto``): unpaired completions labelled desirable or undesirable.

A *sample* is one labelled example with a global index, and it weighs 1, so a step's loss is the mean of its
examples' KTO losses (:func:`tuneforge.objectives.kto.kto_loss`) however the step is split. KTO compares each
example's implied reward ``log π(y|x) − log π_ref(y|x)`` with a reference point ``z0``, an estimate of
``KL(π ‖ π_ref)`` from *mismatched* pairs: each prompt with another example's completion.

Exactness: TRL pairs and averages per device micro-batch, so its ``z0`` changes with the batch split. Here
:meth:`KTOTask.begin_step` computes ``z0`` once per optimizer step, over the whole step (prompt ``k`` with the
completion of example ``k − 1`` of the step, :func:`~tuneforge.objectives.kto.kto_step_mismatched_indices`), with
dropout off, before any gradient — so every micro-batch and every elastic replica uses the same ``z0``, and the
update equals a single-batch update. The reference is the base with the adapter switched off, or a frozen copy
for full fine-tuning (:class:`tuneforge.models.reference.Reference`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tuneforge.config import KTOConfig, Recipe
from tuneforge.data.sampler import Plan, build_plan
from tuneforge.data.unpaired import LabelledSource, LabelledTokens, tokenize_labelled_sources
from tuneforge.models.reference import Reference
from tuneforge.objectives.kto import kto_loss, kto_reference_point, kto_step_mismatched_indices
from tuneforge.training.build import load_inputs
from tuneforge.training.forward import SequenceBatch, sequence_batch, sequence_forward, supports_selective_head
from tuneforge.training.precision import autocast
from tuneforge.training.task import MetricSums, PreparedBase, StepOutput, TaskBase, held_out_means

MAX_EVAL_EXAMPLES = 512  # validation examples scored per source


@dataclass
class KTOPrepared(PreparedBase):
    sources: list[LabelledTokens] = field(default_factory=list)

    def make_task(self, model: torch.nn.Module, micro_batch_size: int, precision: str, device: torch.device) -> KTOTask:
        spec = KTOSpec(
            micro_batch_size,
            self.tokenizer.pad_token_id,
            precision,
            device,
            self.recipe.data.max_length,
            supports_selective_head(model),
        )
        val = {s.name: s.val for s in self.sources if s.val is not None}
        return KTOTask(
            self.plan,
            [s.train for s in self.sources],
            val,
            spec,
            self.recipe.kto,
            Reference.for_policy(model, self.recipe.model, device),
        )


def prepare(recipe: Recipe) -> KTOPrepared:
    """Validate every record, tokenize the examples (through the cache) and plan every step."""
    inputs = load_inputs(recipe)
    sources = tokenize_labelled_sources(inputs.loaded, inputs.tokenizer, inputs.template, recipe)
    plan = build_plan(
        [s.train for s in sources],
        [s.weight for s in sources],
        mix_by="examples",
        seed=recipe.train.seed,
        max_length=recipe.data.max_length,
        packing=False,
        global_batch_size=recipe.train.global_batch_size,
        epochs=recipe.train.epochs,
        max_steps=recipe.train.max_steps,
    )
    return KTOPrepared(
        recipe,
        inputs.tokenizer,
        inputs.template,
        plan,
        inputs.data_hashes,
        data_info={s.name: s.stats for s in sources},
        sources=sources,
    )


@dataclass
class KTOSpec:
    micro_batch_size: int
    pad_id: int
    precision: str
    device: torch.device
    max_length: int
    selective: bool


class KTOTask(TaskBase):
    """Per step: ``z0`` from the step's mismatched pairs, then micro-batches of the KTO loss (sum over examples)."""

    def __init__(
        self,
        plan: Plan,
        sources: list[LabelledSource],
        val_sources: dict[str, LabelledSource],
        spec: KTOSpec,
        cfg: KTOConfig,
        reference: Reference,
    ) -> None:
        super().__init__(plan)
        self.sources = sources
        self.val_sources = val_sources
        self.spec = spec
        self.cfg = cfg
        self.reference = reference
        self.z0: tuple[tuple[int, ...], torch.Tensor] | None = None  # (the step's rows, its reference point)

    # -- sequences -----------------------------------------------------------------------------------
    def batch(self, parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[SequenceBatch, torch.Tensor]:
        """Prompt + completion rows, and the completion's supervised mask ``(B, L)`` (targets that count)."""
        limit = self.spec.max_length
        prompts, completions, masks = [], [], []
        for prompt, completion, mask in parts:
            keep = max(0, limit - len(prompt))
            prompts.append(prompt.tolist())
            completions.append(completion[:keep])
            masks.append(mask[:keep])
        width = max(1, max(len(c) for c in completions))
        tokens = torch.full((len(parts), width), self.spec.pad_id, dtype=torch.long)
        present = torch.zeros((len(parts), width), dtype=torch.long)
        scored = torch.zeros((len(parts), width))
        for r, (c, m) in enumerate(zip(completions, masks)):
            tokens[r, : len(c)] = torch.from_numpy(c.astype(np.int64))  # a copy: the cache is read-only
            present[r, : len(c)] = 1
            scored[r, : len(m)] = torch.from_numpy(m.astype(np.float32))
        batch = sequence_batch(prompts, tokens, present, self.spec.pad_id)
        return batch, scored[:, : batch.width].to(self.spec.device)

    def logps(
        self,
        model: torch.nn.Module,
        parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
        reference: bool = False,
    ) -> torch.Tensor:
        """Summed log-probs of each completion's supervised tokens, ``(B,)``; the reference's without gradients."""
        batch, scored = self.batch(parts)
        s = self.spec
        if reference:
            with self.reference.use(model) as ref, autocast(s.precision, s.device):
                per_token, _ = sequence_forward(ref, batch, selective=supports_selective_head(ref), temperature=1.0)
        else:
            with autocast(s.precision, s.device):
                per_token, _ = sequence_forward(model, batch, selective=s.selective, temperature=1.0)
        return (per_token.float() * scored).sum(-1)

    def examples(self, sources: Sequence[LabelledSource], refs: Sequence[tuple[int, int]]):
        return [sources[a].split(i) for a, i in refs]

    # -- protocol ------------------------------------------------------------------------------------
    def loss_tokens(self, indices: Sequence[int]) -> int:
        """Examples in `indices` (each plan row is one example of cost 1)."""
        return int(self.plan.row_tokens[np.asarray(indices, dtype=np.int64)].sum()) if len(indices) else 0

    @torch.no_grad()
    def reference_point(
        self, model: torch.nn.Module, sources: Sequence[LabelledSource], refs: Sequence[tuple[int, int]]
    ) -> torch.Tensor:
        """``z0`` over the examples `refs`: each prompt with the completion of the example before it, dropout off."""
        parts = self.examples(sources, refs)
        if len(parts) < 2:
            return torch.zeros((), device=self.spec.device)
        src = kto_step_mismatched_indices(len(parts)).tolist()
        mismatched = [(parts[k][0], parts[j][1], parts[j][2]) for k, j in enumerate(src)]
        was_training = model.training
        model.eval()
        policy, ref = [], []
        m = self.spec.micro_batch_size
        for i in range(0, len(mismatched), m):
            chunk = mismatched[i : i + m]
            policy.append(self.logps(model, chunk))
            ref.append(self.logps(model, chunk, reference=True))
        model.train(was_training)
        return kto_reference_point(torch.cat(policy), torch.cat(ref))

    def begin_step(
        self,
        model: torch.nn.Module,
        step: int,
        rows: Sequence[int],
        *,
        share: Sequence[int] | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """``z0`` over the whole step, on every replica alike (a few no-grad forwards: no collective needed)."""
        key = tuple(rows)
        if self.z0 is None or self.z0[0] != key:
            self.z0 = (key, self.reference_point(model, self.sources, self.refs(rows)))

    def step_z0(self, indices: Sequence[int]) -> torch.Tensor:
        if self.z0 is None or not set(indices) <= set(self.z0[0]):
            raise RuntimeError("KTO needs begin_step(model, step, rows) before forward_backward (its reference point)")
        return self.z0[1]

    def losses(
        self,
        model: torch.nn.Module,
        sources: Sequence[LabelledSource],
        refs: Sequence[tuple[int, int]],
        z0: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = self.examples(sources, refs)
        desirable = torch.tensor([bool(sources[a].labels[i]) for a, i in refs], device=self.spec.device)
        policy = self.logps(model, parts)
        ref = self.logps(model, parts, reference=True)
        return kto_loss(
            policy,
            ref,
            desirable,
            z0,
            beta=self.cfg.beta,
            desirable_weight=self.cfg.desirable_weight,
            undesirable_weight=self.cfg.undesirable_weight,
        )

    def forward_backward(self, model: torch.nn.Module, indices: Sequence[int], scale: float) -> StepOutput:
        """Gradients of ``scale · Σ example losses`` over `indices` in micro-batches, with the step's ``z0``."""
        z0 = self.step_z0(indices)
        loss_acc = torch.zeros((), device=self.spec.device)
        sums = MetricSums()
        fed = 0
        rows = list(indices)
        for i in range(0, len(rows), self.spec.micro_batch_size):
            refs = self.refs(rows[i : i + self.spec.micro_batch_size])
            loss_sum, metrics = self.losses(model, self.sources, refs, z0)
            (loss_sum * scale).backward()
            loss_acc += loss_sum.detach()
            sums.add("rewards_chosen", metrics["rewards/chosen_sum"], metrics["count/chosen"])
            sums.add("rewards_rejected", metrics["rewards/rejected_sum"], metrics["count/rejected"])
            sums.add("kl", z0 * len(refs), len(refs))
            fed += sum(int(self.sources[a].lengths[k]) for a, k in refs)
        return StepOutput(loss_acc, fed, sums.metrics)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, max_examples: int = MAX_EVAL_EXAMPLES) -> dict[str, float]:
        """Held-out KTO loss, mean implied reward of desirable and undesirable examples, and their margin."""
        model.eval()
        parts = {}
        for name, src in self.val_sources.items():
            refs = [(0, i) for i in range(min(len(src), max_examples))]
            z0 = self.reference_point(model, [src], refs)
            part = {"loss": 0.0, "rewards_chosen": 0.0, "rewards_rejected": 0.0}
            counts = [0.0, 0.0]
            for start in range(0, len(refs), self.spec.micro_batch_size):
                chunk = refs[start : start + self.spec.micro_batch_size]
                loss_sum, metrics = self.losses(model, [src], chunk, z0)
                part["loss"] += float(loss_sum)
                part["rewards_chosen"] += float(metrics["rewards/chosen_sum"])
                part["rewards_rejected"] += float(metrics["rewards/rejected_sum"])
                counts[0] += float(metrics["count/chosen"])
                counts[1] += float(metrics["count/rejected"])
            n = float(len(refs))
            # rewards are averaged over their own label; rescale so held_out_means' division by n gives that mean
            part["rewards_chosen"] *= n / counts[0] if counts[0] else 0.0
            part["rewards_rejected"] *= n / counts[1] if counts[1] else 0.0
            part["margin"] = part["rewards_chosen"] - part["rewards_rejected"]
            parts[name] = (part, n)
        model.train()
        return held_out_means(parts)
