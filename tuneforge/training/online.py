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

Every completion of a GRPO group shares its prompt: the sampler prefills it once for the group, and the training
and log-prob forwards put a group in one row (prompt, then each completion behind a block mask) whenever that is
less work than one row per completion (:meth:`OnlineTask.batch`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tuneforge.config import Recipe
from tuneforge.data.prompts import PromptSet, PromptSource, prompt_sources
from tuneforge.data.sampler import Plan, build_plan
from tuneforge.errors import DataError, RecipeError
from tuneforge.models.adapters import unwrap
from tuneforge.models.reference import Reference
from tuneforge.training.build import Inputs, load_inputs
from tuneforge.training.forward import (
    SequenceBatch,
    attention_allows_masks,
    completion_batch,
    sequence_forward,
    shared_layout_agrees,
    supports_selective_head,
)
from tuneforge.training.precision import autocast
from tuneforge.training.rollout import (
    Completions,
    Generators,
    Sampling,
    row_generators,
    sample_completions,
    truncate_at_stop,
)
from tuneforge.training.task import MetricSums, PreparedBase, TaskBase

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
        selective = supports_selective_head(model)
        share = group > 1 and selective and attention_allows_masks(model)
        if share:  # a decoder that ignored 4-D masks or position ids would silently compute something else
            first = next((ps.ids[0] for ps in self.train_sets if len(ps)), None)
            share = first is not None and shared_layout_agrees(model, first, self.tokenizer.pad_token_id)
        return RolloutSpec(
            micro_batch_size=micro_batch_size * group,
            precision=precision,
            device=device,
            selective=selective,
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
            share_prompts=share,
            hidden_size=int(getattr(unwrap(model).config.get_text_config(), "hidden_size", 0) or 0),
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
    every = recipe.train.checkpoint_every  # auto: the planner rounds it to a multiple (planning.cadence)
    if updates_per_batch > 1 and isinstance(every, int) and every % updates_per_batch:
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
    share_prompts: bool = False  # a group's sequences may share one row, the prompt computed once (see ``batch``)
    hidden_size: int = 0  # the decoder's width, for the cost estimate of sharing


# --------------------------------------------------------------------------------------------- tasks


Reduce = Callable[[torch.Tensor], torch.Tensor]  # SUM over the step's participants (the identity in one process)


def no_reduce(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class StepRollout:
    """Everything one step needs, for *all* its prompts, computed before any gradient.

    On elastic replicas each process samples and scores only its share of the prompts; the shares are then
    gathered (one sum all-reduce of zero-padded buffers), so every replica holds the whole step's rollout and
    computes group statistics, whitening and the loss divisor over the whole step — exactly as one process does.
    """

    rows: tuple[int, int]  # [start, stop) plan rows of the step
    prompt_ids: list[list[int]]  # per sequence (each prompt repeated group_size times)
    completions: Completions
    advantages: torch.Tensor  # (N,) for GRPO, (N, L) for PPO
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # the whole step's rollout statistics


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
        self._report_metrics = True  # whether this process still has to report the step's rollout statistics

    # -- protocol -------------------------------------------------------------------------------------
    def rows_for_step(self, step: int) -> range:
        """The prompts of optimizer step ``step``: each batch of rollouts serves ``updates_per_batch`` steps."""
        g = self.plan.global_batch_size
        batch = step // self.spec.updates_per_batch
        return range(batch * g, (batch + 1) * g)

    def begin_step(
        self,
        model: torch.nn.Module,
        step: int,
        rows: Sequence[int],
        *,
        share: Sequence[int] | None = None,
        reduce: Reduce | None = None,
    ) -> None:
        """Sample and score completions for the step's prompts, unless this batch was already sampled.

        Called before anything else of the step. `share` (default: all of `rows`) is what this process samples;
        `reduce` sums tensors over the step's participants. On replicas the decision to sample is a function of the
        step alone — the first step of a batch always samples (again, after a failed attempt), later steps reuse the
        batch — so every participant makes the same collective calls. The sampler is seeded per
        completion, and a resumed run starts on a fresh batch (``checkpoint_every`` is a multiple of
        ``updates_per_batch``), so it samples exactly what the uninterrupted run sampled.
        """
        span = (int(rows[0]), int(rows[-1]) + 1)
        share = rows if share is None else share
        self._report_metrics = len(share) > 0 and int(share[0]) == span[0]  # one process reports them
        fresh = step % self.spec.updates_per_batch == 0
        if self.rollout is not None and self.rollout.rows == span and not (fresh and reduce is not None):
            return
        if not fresh and reduce is not None:
            raise RuntimeError(
                f"step {step} reuses the rollouts of batch {step // self.spec.updates_per_batch}, which this replica "
                "does not hold (they travel with the live state of a healthy peer)"
            )
        self.rollout = None
        share_span = (int(share[0]), int(share[-1]) + 1) if len(share) else (span[0], span[0])
        self.rollout = self.make_rollout(
            model, step // self.spec.updates_per_batch, span, share_span, reduce or no_reduce
        )

    def sequences(self, indices: Sequence[int]) -> list[int]:
        ro = self.rollout
        if ro is None or not indices or indices[0] < ro.rows[0] or indices[-1] >= ro.rows[1]:
            raise RuntimeError("online tasks need begin_step(model, step, rows) before loss_tokens/forward_backward")
        g = self.group_size
        return [(r - ro.rows[0]) * g + k for r in indices for k in range(g)]

    def rollout_metrics(self, stats: MetricSums) -> None:
        """Add the step's rollout statistics: weight 1 once per step from the process that holds its first prompt,
        weight 0 from every other call — every replica reports the same names (they are all-reduced as one vector)."""
        if self.rollout is None:
            return
        for name, value in self.rollout.metrics.items():
            stats.add(name, value if self._report_metrics else 0.0, 1.0 if self._report_metrics else 0.0)
        self._report_metrics = False

    # -- gathering shares -----------------------------------------------------------------------------
    def gather(
        self, rows: tuple[int, int], share: tuple[int, int], reduce: Reduce, parts: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The whole step's tensors from every process's share: each writes its rows of a zero buffer, then a sum.

        Per-sequence tensors ``(n_share · group, …)`` (completion-shaped ones padded to the length budget) become
        ``(n_step · group, …)``; in one process this is the identity up to that padding.
        """
        g = self.group_size
        total, offset = (rows[1] - rows[0]) * g, (share[0] - rows[0]) * g
        budget = self.spec.sampling.max_new_tokens
        out = {}
        for name, t in parts.items():
            t = t.to(self.spec.device)
            if t.dim() == 2 and t.shape[1] < budget:
                t = torch.nn.functional.pad(t, (0, budget - t.shape[1]))
            buf = torch.zeros((total, *t.shape[1:]), dtype=t.dtype, device=t.device)
            buf[offset : offset + t.shape[0]] = t
            out[name] = reduce(buf)
        return out

    def whole_step(
        self, rows: tuple[int, int], share: tuple[int, int], reduce: Reduce, comp: Completions, **parts: torch.Tensor
    ) -> tuple[Completions, list[list[int]], dict[str, torch.Tensor]]:
        """Gather the shares' completions and per-sequence tensors; trim to the longest completion of the step."""
        full = self.gather(
            rows, share, reduce, {"tokens": comp.tokens, "mask": comp.mask, "finished": comp.finished.long(), **parts}
        )
        width = max(1, int(full["mask"].sum(-1).max())) if full["mask"].numel() else 1
        trimmed = {k: v[:, :width] if v.dim() == 2 else v for k, v in full.items()}
        tokens = trimmed.pop("tokens").cpu()
        mask = trimmed.pop("mask").cpu()
        finished = trimmed.pop("finished").bool().cpu()
        refs = self.refs(range(*rows))
        prompt_ids = [self.sources[a].ids[i] for a, i in refs for _ in range(self.group_size)]
        return Completions(tokens, mask, finished, self.group_size), prompt_ids, trimmed

    def sampling_generators(self, batch_index: int, share: tuple[int, int]) -> list[torch.Generator]:
        """One generator per completion of the share, seeded by (seed, batch, prompt's row, sample)."""
        return row_generators(self.spec.seed, batch_index, range(*share), self.group_size, self.spec.device)

    # -- live state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The current batch's rollout, so a replacement that joins mid-batch (``updates_per_batch`` > 1) has it."""
        ro = self.rollout
        if ro is None:
            return {}
        tensors = {k: getattr(ro, k) for k in ("advantages", "old_logps", "ref_logps", "old_values", "returns")}
        return {
            "rows": list(ro.rows),
            "prompt_ids": ro.prompt_ids,
            "tokens": ro.completions.tokens,
            "mask": ro.completions.mask,
            "finished": ro.completions.finished,
            "metrics": dict(ro.metrics),
            **{k: v for k, v in tensors.items() if v is not None},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self.rollout = None
            return
        comp = Completions(state["tokens"], state["mask"], state["finished"], self.group_size)
        self.rollout = StepRollout(
            (int(state["rows"][0]), int(state["rows"][1])),
            [list(p) for p in state["prompt_ids"]],
            comp,
            state["advantages"],
            **{k: state.get(k) for k in ("old_logps", "ref_logps", "old_values", "returns")},
            metrics=dict(state["metrics"]),
        )

    # -- rollouts -------------------------------------------------------------------------------------
    def generate(
        self,
        model: torch.nn.Module,
        prompts: list[list[int]],
        group: int,
        sampling: Sampling,
        generator: Generators,
    ) -> tuple[Completions, list[str]]:
        """Completions in chunks of ``generation_batch`` sequences, then stop strings and decoding."""
        s = self.spec
        per_call = max(1, s.generation_batch // group)
        parts = []
        if not prompts:  # an elastic share can be empty when there are more replicas than prompts
            empty = torch.zeros((0, 1), dtype=torch.long)
            return Completions(empty, empty.clone(), torch.zeros(0, dtype=torch.bool), group), []
        for i in range(0, len(prompts), per_call):
            chunk = generator[i * group : (i + per_call) * group] if isinstance(generator, list) else generator
            with autocast(s.precision, s.device):
                parts.append(
                    sample_completions(
                        model,
                        prompts[i : i + per_call],
                        group_size=group,
                        sampling=sampling,
                        eos_ids=s.eos_ids,
                        pad_id=s.pad_id,
                        generator=chunk,
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
            batch = self.batch(idx)
            with torch.no_grad(), autocast(s.precision, s.device):
                if reference:
                    assert self.reference is not None
                    with self.reference.use(model) as ref:
                        selective = supports_selective_head(ref)
                        if batch.attention_mask is not None and not selective:  # the plain layout, then
                            batch = self.batch(idx, share=False)
                        res: Any = sequence_forward(
                            ref, batch, selective=selective, temperature=s.sampling.temperature
                        )[0]
                else:
                    res = sequence_forward(
                        model, batch, selective=s.selective, temperature=s.sampling.temperature, value_head=value_head
                    )
            out.append((idx, batch, res))
        model.train(was_training)
        return out

    def batch(self, idx: Sequence[int], share: bool = True) -> SequenceBatch:
        """The rollout's sequences `idx` as model input: a GRPO group in one shared-prompt row when that costs less
        (``forward.completion_batch``), for a model checked to honour that layout at set-up."""
        ro = self.rollout
        assert ro is not None
        s = self.spec
        prompts = [ro.prompt_ids[j] for j in idx]
        tokens, mask = ro.completions.tokens[idx], ro.completions.mask[idx]
        return completion_batch(prompts, tokens, mask, s.pad_id, share=share and s.share_prompts, hidden=s.hidden_size)

    def trim(self, t: torch.Tensor, idx: Sequence[int], batch: SequenceBatch) -> torch.Tensor:
        return t[idx][:, : batch.width].to(self.spec.device)

    def make_rollout(
        self, model: torch.nn.Module, batch_index: int, rows: tuple[int, int], share: tuple[int, int], reduce: Reduce
    ) -> StepRollout:
        """Sample and score the share's prompts, gather the step, turn scores into advantages (each method its way)."""
        raise NotImplementedError

    # -- evaluation -----------------------------------------------------------------------------------
    def held_out(self, limit: int) -> list[tuple[str, PromptSet, int]]:
        """(name, prompts, how many) to evaluate on: the validation split, else the first training prompts."""
        if self.val_sources:
            return [(name, ps, min(len(ps), limit)) for name, ps in self.val_sources.items()]
        return [(ps.name, ps, min(len(ps), limit)) for ps in self.sources]
