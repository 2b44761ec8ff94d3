"""What the online RL methods share (``method: grpo`` and ``method: ppo``): prompts, rollouts, forward passes.

A *sample* is one prompt with a global index, planned and mixed like any other data; ``train.global_batch_size``
counts prompts per optimizer step. Before each step the loop calls :meth:`OnlineTask.begin_step`, which samples
completions from the current policy (:mod:`tuneforge.training.rollout`), scores them and turns scores into
advantages — over the *whole* step, so group statistics, advantage whitening and token-level normalisers never
depend on how the step is later split into micro-batches. ``loss_tokens`` is then known, and ``forward_backward``
accumulates gradients of ``scale · Σ loss`` exactly as SFT and DPO do. GRPO (:mod:`tuneforge.training.grpo`) and
PPO (:mod:`tuneforge.training.ppo`) each add how they score and what they optimise.

The reference policy costs no second copy of the weights with an adapter (the base with the adapter switched
off); with full fine-tuning a frozen copy of the base is loaded when a KL term needs it. Sampling uses a generator
seeded by (seed, step), so resuming from a checkpoint samples exactly what the uninterrupted run sampled.

Each batch of rollouts serves ``updates_per_batch`` optimizer steps (GRPO ``num_iterations``, PPO ``epochs``;
default 1: on-policy). From the second step on a batch the policy has moved away from the one that sampled it:
the sampler's log-probs are kept, and the clipped importance ratio bounds each update.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tuneforge.config import Recipe
from tuneforge.data.prompts import PromptSet, PromptSource, prompt_sources
from tuneforge.data.sampler import Plan, build_plan
from tuneforge.errors import DataError, RecipeError
from tuneforge.models.reference import Reference
from tuneforge.training.build import Inputs, load_inputs
from tuneforge.training.forward import SequenceBatch, sequence_batch, sequence_forward, supports_selective_head
from tuneforge.training.precision import autocast
from tuneforge.training.rollout import Completions, Sampling, sample_completions, truncate_at_stop
from tuneforge.training.task import PreparedBase, TaskBase

# --------------------------------------------------------------------------------------------- data


@dataclass
class OnlinePrepared(PreparedBase):
    """Validated, tokenized prompts and their plan (no model yet)."""

    sources: list[PromptSource] = field(default_factory=list)
    updates_per_batch: int = 1  # optimizer steps taken on each batch of rollouts

    @property
    def num_steps(self) -> int:
        steps = self.plan.num_steps * self.updates_per_batch
        return min(steps, self.recipe.train.max_steps) if self.recipe.train.max_steps else steps

    @property
    def train_sets(self) -> list[PromptSet]:
        return [s.train for s in self.sources]

    @property
    def val_sets(self) -> dict[str, PromptSet]:
        return {s.name: s.val for s in self.sources if s.val is not None and len(s.val)}

    def rollout_spec(
        self, model: torch.nn.Module, micro_batch_size: int, precision: str, device: torch.device, group: int = 1
    ) -> RolloutSpec:
        r = self.recipe
        return RolloutSpec(
            micro_batch_size=micro_batch_size * group,
            precision=precision,
            device=device,
            selective=supports_selective_head(model),
            pad_id=self.tokenizer.pad_token_id,
            eos_ids=eos_token_ids(self.tokenizer),
            seed=r.train.seed,
            generation_batch=r.generation.batch_size,
            sampling=Sampling(
                max_new_tokens=r.generation.max_new_tokens,
                temperature=r.generation.temperature,
                top_p=r.generation.top_p,
                top_k=r.generation.top_k,
            ),
            stop=list(r.generation.stop),
            updates_per_batch=self.updates_per_batch,
        )


def eos_token_ids(tokenizer: Any) -> list[int]:
    """Tokens that end a completion: the tokenizer's EOS and the chat template's end-of-turn, when they differ."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for name in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(name) if name in tokenizer.get_vocab() else None
        if tid is not None:
            ids.add(int(tid))
    if not ids:
        raise RecipeError(
            "model.tokenizer: the tokenizer has no EOS token, so completions could never end; "
            "set one (tokenizer.eos_token) in the tokenizer's config"
        )
    return sorted(ids)


def prepare_prompts(
    recipe: Recipe, *, updates_per_batch: int, reuse_field: str
) -> tuple[Inputs, list[PromptSource], Plan]:
    """Validate every prompt record, tokenize prompts within the length budget and plan every batch of rollouts."""
    inputs = load_inputs(recipe)
    budget = recipe.data.max_length - recipe.generation.max_new_tokens
    if budget < 1:
        raise RecipeError(
            f"generation.max_new_tokens: {recipe.generation.max_new_tokens} leaves no room for the "
            f"prompt within data.max_length={recipe.data.max_length}"
        )
    sources, issues = prompt_sources(inputs.loaded, inputs.tokenizer, inputs.template, budget, recipe.data.on_overlong)
    if issues:
        raise DataError(
            issues,
            f"prompts longer than data.max_length - generation.max_new_tokens = {budget} tokens "
            "(set data.on_overlong: truncate or drop, or raise data.max_length)",
        )
    every = recipe.train.checkpoint_every
    if updates_per_batch > 1 and every and every % updates_per_batch:
        raise RecipeError(
            f"train.checkpoint_every: {every} must be a multiple of {reuse_field}={updates_per_batch}, "
            "so that a resumed run starts on a fresh batch of rollouts"
        )
    max_steps = recipe.train.max_steps
    max_batches = -(-max_steps // updates_per_batch) if max_steps else None  # steps count updates
    plan = build_plan(
        [s.train.as_tokenized() for s in sources],
        [s.weight for s in sources],
        mix_by="examples",
        seed=recipe.train.seed,
        max_length=recipe.data.max_length,
        packing=False,
        global_batch_size=recipe.train.global_batch_size,
        epochs=recipe.train.epochs,
        max_steps=max_batches,
    )
    return inputs, sources, plan


# --------------------------------------------------------------------------------------------- forward


@dataclass
class RolloutSpec:
    micro_batch_size: int  # sequences per forward pass when training (the recipe's micro-batch counts prompts)
    precision: str
    device: torch.device
    selective: bool
    pad_id: int
    eos_ids: list[int]
    seed: int
    generation_batch: int  # sequences decoded together
    sampling: Sampling
    stop: list[str]
    updates_per_batch: int = 1


# --------------------------------------------------------------------------------------------- tasks


@dataclass
class StepRollout:
    """Everything one step needs, computed once for all its prompts before any gradient."""

    rows: tuple[int, int]  # [start, stop) plan rows
    prompt_ids: list[list[int]]  # per sequence (each prompt repeated group_size times)
    completions: Completions
    advantages: torch.Tensor  # (N,) for GRPO, (N, L) for PPO
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class OnlineTask(TaskBase):
    """Shared by GRPO and PPO: prompts by global index, per-step rollouts, micro-batched forward passes."""

    group_size = 1
    evaluate_before_training = True  # the loop scores the starting policy too: the baseline for every later reward

    def __init__(
        self,
        plan: Plan,
        sources: list[PromptSet],
        val_sources: dict[str, PromptSet],
        spec: RolloutSpec,
        tokenizer: Any,
        reference: Reference | None,
    ) -> None:
        super().__init__(plan)
        self.sources = sources
        self.val_sources = val_sources
        self.spec = spec
        self.tokenizer = tokenizer
        self.reference = reference
        self.rollout: StepRollout | None = None

    # -- protocol -------------------------------------------------------------------------------------
    def rows_for_step(self, step: int) -> range:
        """The prompts of optimizer step ``step``: each batch of rollouts serves ``updates_per_batch`` steps."""
        g = self.plan.global_batch_size
        batch = step // self.spec.updates_per_batch
        return range(batch * g, (batch + 1) * g)

    def begin_step(self, model: torch.nn.Module, step: int, rows: range) -> None:
        """Sample and score completions for the step's prompts, unless this batch was already sampled.

        Called by the loop before anything else. The sampler is seeded by the batch's index, and a resumed run
        always starts on a fresh batch (``checkpoint_every`` is a multiple of ``updates_per_batch``), so it
        samples exactly what the uninterrupted run sampled.
        """
        if self.rollout is None or self.rollout.rows != (rows.start, rows.stop):
            self.rollout = self.make_rollout(model, step // self.spec.updates_per_batch, rows)

    def sequences(self, indices: Sequence[int]) -> list[int]:
        ro = self.rollout
        if ro is None or not indices or indices[0] < ro.rows[0] or indices[-1] >= ro.rows[1]:
            raise RuntimeError("online tasks need begin_step(model, step, rows) before loss_tokens/forward_backward")
        g = self.group_size
        return [(r - ro.rows[0]) * g + k for r in indices for k in range(g)]

    # -- rollouts -------------------------------------------------------------------------------------
    def generate(
        self,
        model: torch.nn.Module,
        prompts: list[list[int]],
        group: int,
        sampling: Sampling,
        generator: torch.Generator | None,
    ) -> tuple[Completions, list[str]]:
        """Completions in chunks of ``generation_batch`` sequences, then stop strings and decoding."""
        s = self.spec
        per_call = max(1, s.generation_batch // group)
        parts = []
        for i in range(0, len(prompts), per_call):
            with autocast(s.precision, s.device):
                parts.append(
                    sample_completions(
                        model,
                        prompts[i : i + per_call],
                        group_size=group,
                        sampling=sampling,
                        eos_ids=s.eos_ids,
                        pad_id=s.pad_id,
                        generator=generator,
                    )
                )
        width = max(p.tokens.shape[1] for p in parts)
        pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
        comp = Completions(
            torch.cat([pad(p.tokens, s.pad_id) for p in parts]),
            torch.cat([pad(p.mask, 0) for p in parts]),
            torch.cat([p.finished for p in parts]),
            group,
        )
        texts = self.tokenizer.batch_decode(comp.tokens.masked_fill(comp.mask == 0, s.pad_id), skip_special_tokens=True)
        if s.stop:
            texts = [self._apply_stop(comp, i, t) for i, t in enumerate(texts)]
        return comp, texts

    def _apply_stop(self, comp: Completions, i: int, text: str) -> str:
        """Cut a completion at a stop string: the text for graders, and its tokens (the stop's own tokens stay)."""
        cut, found = truncate_at_stop(text, self.spec.stop)
        if not found:
            return text
        n = int(comp.mask[i].sum())
        for k in range(1, n + 1):  # the shortest prefix whose text reaches the stop string
            if truncate_at_stop(self.tokenizer.decode(comp.tokens[i, :k], skip_special_tokens=True), self.spec.stop)[1]:
                comp.mask[i, k:] = 0
                comp.tokens[i, k:] = self.spec.pad_id
                comp.finished[i] = True
                break
        return cut.strip()

    def batch_generator(self, batch_index: int) -> torch.Generator:
        """The sampler's randomness for one batch of rollouts: a function of (seed, batch), so resume is exact."""
        device = self.spec.device if self.spec.device.type in ("cpu", "cuda") else torch.device("cpu")
        return torch.Generator(device=device).manual_seed(self.spec.seed * 1_000_003 + batch_index)

    def forward_rows(
        self, model: torch.nn.Module, seqs: Sequence[int], *, value_head: Any = None, reference: bool = False
    ) -> list[tuple[list[int], SequenceBatch, Any]]:
        """Micro-batches of the rollout's sequences ``seqs``: (indices, batch, outputs) — no gradients, no dropout.

        The rollout-time log-probs and values describe the policy that sampled, which had dropout off.
        """
        ro = self.rollout
        assert ro is not None
        out = []
        s = self.spec
        was_training = model.training
        model.eval()
        for i in range(0, len(seqs), s.micro_batch_size):
            idx = list(seqs[i : i + s.micro_batch_size])
            batch = sequence_batch(
                [ro.prompt_ids[j] for j in idx], ro.completions.tokens[idx], ro.completions.mask[idx], s.pad_id
            )
            with torch.no_grad(), autocast(s.precision, s.device):
                if reference:
                    assert self.reference is not None
                    with self.reference.use(model) as ref:
                        res: Any = sequence_forward(
                            ref, batch, selective=supports_selective_head(ref), temperature=s.sampling.temperature
                        )[0]
                else:
                    res = sequence_forward(
                        model, batch, selective=s.selective, temperature=s.sampling.temperature, value_head=value_head
                    )
            out.append((idx, batch, res))
        model.train(was_training)
        return out

    def trim(self, t: torch.Tensor, idx: Sequence[int], batch: SequenceBatch) -> torch.Tensor:
        return t[idx][:, : batch.width].to(self.spec.device)

    def make_rollout(self, model: torch.nn.Module, batch_index: int, rows: range) -> StepRollout:
        """Sample, score and turn scores into advantages for the prompts ``rows`` (each method its own way)."""
        raise NotImplementedError

    # -- evaluation -----------------------------------------------------------------------------------
    def held_out(self, limit: int) -> list[tuple[str, PromptSet, int]]:
        """(name, prompts, how many) to evaluate on: the validation split, else the first training prompts."""
        if self.val_sources:
            return [(name, ps, min(len(ps), limit)) for name, ps in self.val_sources.items()]
        return [(ps.name, ps, min(len(ps), limit)) for ps in self.sources]
