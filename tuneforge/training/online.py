"""Online RL as tasks for the one training loop: GRPO with graders (RLVR / RLAIF) and PPO with a reward model (RLHF).

A *sample* is one prompt with a global index, planned and mixed like any other data; ``train.global_batch_size``
counts prompts per optimizer step. Before each step the loop calls :meth:`OnlineTask.begin_step`, which samples
completions from the current policy (:mod:`tuneforge.training.rollout`), scores them and turns scores into
advantages — over the *whole* step, so group statistics, advantage whitening and token-level normalisers never
depend on how the step is later split into micro-batches. ``loss_tokens`` is then known, and ``forward_backward``
accumulates gradients of ``scale · Σ loss`` exactly as SFT and DPO do.

- **GRPO** (``method: grpo``): ``grpo.group_size`` completions per prompt, rewards from graders in OpenAI's
  reinforcement fine-tuning shapes (:func:`tuneforge.rewards.load_grader`; a ``score_model`` grader is RLAIF:
  a judge behind any OpenAI-compatible endpoint or a local model), group-relative advantages, the clipped objective
  and the token-averaging of GRPO / DAPO / Dr. GRPO (:mod:`tuneforge.objectives.grpo`), optional k3 KL to the
  reference.
- **PPO** (``method: ppo``): one completion per prompt scored by a reward model trained with ``method: reward``,
  a per-token KL penalty to the reference, GAE over a value head that shares the policy's trunk, whitened
  advantages and the clipped policy and value losses (:mod:`tuneforge.objectives.ppo`).

The reference policy costs no second copy of the weights with an adapter (the base with the adapter switched
off); with full fine-tuning a frozen copy of the base is loaded when a KL term needs it. Sampling uses a generator
seeded by (seed, step), so resuming from a checkpoint samples exactly what the uninterrupted run sampled.

Each batch of rollouts serves ``grpo.num_iterations`` / ``ppo.epochs`` optimizer steps (default 1: on-policy, as
TRL's GRPO default). From the second step on a batch the policy has moved away from the one that sampled it: the
sampler's log-probs are kept, and the clipped importance ratio bounds each update.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tuneforge.config import Recipe
from tuneforge.data.sampler import Plan
from tuneforge.data.token_cache import TokenizedSource
from tuneforge.errors import DataError, DataIssue, RecipeError
from tuneforge.objectives.grpo import group_advantages, grpo_loss
from tuneforge.objectives.logprobs import masked_mean, token_logprobs
from tuneforge.objectives.ppo import gae, kl_penalized_rewards, masked_whiten, ppo_policy_loss, ppo_value_loss
from tuneforge.training.precision import autocast
from tuneforge.training.rollout import Completions, Sampling, sample_completions, truncate_at_stop

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- data


@dataclass
class PromptSet:
    """Prompts of one split of one source: the records (graders read their extra keys) and their token ids."""

    name: str
    records: list[dict]
    ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class PromptSource:
    name: str
    weight: float
    train: PromptSet
    val: PromptSet | None
    stats: dict[str, Any]


@dataclass
class OnlinePrepared:
    """Validated, tokenized prompts and their plan (no model yet); the interface of ``build.Prepared``."""

    recipe: Recipe
    tokenizer: Any
    template: str | None
    sources: list[PromptSource]
    plan: Plan
    data_hashes: dict[str, str]
    grader: Any = None
    data_info: dict[str, Any] = field(default_factory=dict)

    @property
    def updates_per_batch(self) -> int:
        """Optimizer steps taken on each batch of rollouts (GRPO ``num_iterations``, PPO ``epochs``)."""
        r = self.recipe
        return r.grpo.num_iterations if r.method == "grpo" else r.ppo.epochs

    @property
    def num_steps(self) -> int:
        steps = self.plan.num_steps * self.updates_per_batch
        return min(steps, self.recipe.train.max_steps) if self.recipe.train.max_steps else steps

    def mix_dict(self) -> dict[str, Any]:
        m = self.plan.mix
        return {"names": m.names, "target": m.target, "realised": m.realised(), "examples": m.examples,
                "passes": m.passes, "mix_by": m.mix_by}

    def mix_metrics(self) -> dict[str, float]:
        return self.plan.mix.as_metrics()

    def mix_summary(self) -> str:
        return self.plan.mix.summary()

    def make_task(self, model: torch.nn.Module, micro_batch_size: int, precision: str,
                  device: torch.device) -> OnlineTask:
        from tuneforge.training.forward import supports_selective_head

        r = self.recipe
        group = r.grpo.group_size if r.method == "grpo" else 1
        spec = RolloutSpec(
            micro_batch_size=micro_batch_size * group, precision=precision, device=device,
            selective=supports_selective_head(model), pad_id=self.tokenizer.pad_token_id,
            eos_ids=eos_token_ids(self.tokenizer), seed=r.train.seed, generation_batch=r.generation.batch_size,
            sampling=Sampling(max_new_tokens=r.generation.max_new_tokens, temperature=r.generation.temperature,
                              top_p=r.generation.top_p, top_k=r.generation.top_k),
            stop=list(r.generation.stop), updates_per_batch=self.updates_per_batch)
        train = [s.train for s in self.sources]
        val = {s.name: s.val for s in self.sources if s.val is not None and len(s.val)}
        if r.method == "grpo":
            needs_ref = r.grpo.beta > 0
            return GRPOTask(self.plan, train, val, spec, self.tokenizer, reference_for(r, model, device, needs_ref),
                            self.grader, r.grpo)
        from tuneforge.training.preference import load_reward_model

        reward_model, reward_tokenizer = load_reward_model(r.ppo.reward_model, device)
        reward_model.requires_grad_(False)
        return PPOTask(self.plan, train, val, spec, self.tokenizer, reference_for(r, model, device, True),
                       reward_model, reward_tokenizer, r.ppo)


def eos_token_ids(tokenizer: Any) -> list[int]:
    """Tokens that end a completion: the tokenizer's EOS and the chat template's end-of-turn, when they differ."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for name in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(name) if name in tokenizer.get_vocab() else None
        if tid is not None:
            ids.add(int(tid))
    if not ids:
        raise RecipeError("model.tokenizer: the tokenizer has no EOS token, so completions could never end; "
                          "set one (tokenizer.eos_token) in the tokenizer's config")
    return sorted(ids)


def prepare_online(recipe: Recipe) -> OnlinePrepared:
    """Validate every prompt record and the grader / reward model, tokenize prompts and plan every step."""
    from tuneforge.data.pipeline import load_sources
    from tuneforge.data.sampler import build_plan
    from tuneforge.models.adapters import check_qlora_supported
    from tuneforge.models.loading import check_model_path
    from tuneforge.training.build import load_tokenizer_for

    grader = load_online_grader(recipe) if recipe.method == "grpo" else None
    if recipe.method == "ppo" and not os.path.isdir(os.path.expanduser(recipe.ppo.reward_model)):
        raise RecipeError(f"ppo.reward_model: {recipe.ppo.reward_model} is not a directory (expected the model or "
                          "adapter directory a `method: reward` run saved)")
    loaded = load_sources(recipe, default_format="prompt", allow_extra="*")
    for src in loaded:
        if src.format != "prompt":
            raise RecipeError(f"data.sources: {src.path} has format {src.format}, but method {recipe.method} samples "
                              "its own answers: expected prompts {\"messages\": [... ending with a user message], "
                              "...keys for the graders} (format: prompt)")
    check_model_path(recipe.model.path)
    if recipe.adapter.kind == "qlora":
        check_qlora_supported()
    tokenizer, template = load_tokenizer_for(recipe, True)
    budget = recipe.data.max_length - recipe.generation.max_new_tokens
    if budget < 1:
        raise RecipeError(f"generation.max_new_tokens: {recipe.generation.max_new_tokens} leaves no room for the "
                          f"prompt within data.max_length={recipe.data.max_length}")
    sources: list[PromptSource] = []
    issues: list[DataIssue] = []
    for src in loaded:
        train, dropped = _encode_prompts(src, src.train, tokenizer, template, budget, recipe.data.on_overlong, issues)
        val, _ = _encode_prompts(src, src.val, tokenizer, template, budget, recipe.data.on_overlong, issues)
        if not len(train) and not issues:
            issues.append(DataIssue(src.path, 0, "", "no prompt fits data.max_length - generation.max_new_tokens",
                                    f"prompts of at most {budget} tokens"))
        stats = {**src.stats, "dropped_overlong": dropped, "cache_hit": False,
                 "prompt_tokens_mean": float(np.mean([len(x) for x in train.ids])) if len(train) else 0.0}
        sources.append(PromptSource(src.name, src.weight, train, val if len(val) else None, stats))
    if issues:
        raise DataError(issues, f"prompts longer than data.max_length - generation.max_new_tokens = {budget} tokens "
                        "(set data.on_overlong: truncate or drop, or raise data.max_length)")
    reuse = recipe.grpo.num_iterations if recipe.method == "grpo" else recipe.ppo.epochs
    every = recipe.train.checkpoint_every
    if reuse > 1 and every and every % reuse:
        key = "grpo.num_iterations" if recipe.method == "grpo" else "ppo.epochs"
        raise RecipeError(f"train.checkpoint_every: {every} must be a multiple of {key}={reuse}, so that a resumed "
                          "run starts on a fresh batch of rollouts")
    max_batches = -(-recipe.train.max_steps // reuse) if recipe.train.max_steps else None  # steps count updates
    plan = build_plan([_as_tokenized(s.train) for s in sources], [s.weight for s in sources], mix_by="examples",
                      seed=recipe.train.seed, max_length=recipe.data.max_length, packing=False,
                      global_batch_size=recipe.train.global_batch_size, epochs=recipe.train.epochs,
                      max_steps=max_batches)
    return OnlinePrepared(recipe, tokenizer, template, sources, plan,
                          data_hashes={s.name: s.data_hash for s in loaded}, grader=grader,
                          data_info={s.name: s.stats for s in sources})


def load_online_grader(recipe: Recipe) -> Any:
    """The recipe's grader, validated now (config mistakes fail before any model loads)."""
    from tuneforge.rewards.graders import load_grader

    cfg = recipe.grpo
    api_key = None
    if cfg.judge_api_key_env:
        api_key = os.environ.get(cfg.judge_api_key_env)
        if not api_key:
            raise RecipeError(f"grpo.judge_api_key_env: the environment variable {cfg.judge_api_key_env} is not set")
    origin = cfg.graders if isinstance(cfg.graders, str) else "grpo.graders"
    return load_grader(cfg.graders, base_url=cfg.judge_base_url, api_key=api_key, origin=origin)


def _encode_prompts(src: Any, records: list[dict], tokenizer: Any, template: str | None, budget: int,
                    on_overlong: str, issues: list[DataIssue]) -> tuple[PromptSet, int]:
    from tuneforge.data.pipeline import record_key
    from tuneforge.data.templates import render_chat

    kept: list[dict] = []
    ids: list[list[int]] = []
    dropped = 0
    texts = [render_chat(tokenizer, r["messages"], template, add_generation_prompt=True) for r in records]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    for rec, tokens in zip(records, encoded):
        if len(tokens) > budget:
            if on_overlong == "error":
                issues.append(DataIssue(src.path, src.lines.get(record_key(rec), 0), "messages",
                                        f"prompt is {len(tokens)} tokens", f"at most {budget} tokens"))
                continue
            if on_overlong == "drop":
                dropped += 1
                continue
            tokens = tokens[-budget:]  # keep the end: the question and the generation prompt
        kept.append(rec)
        ids.append(list(tokens))
    return PromptSet(src.name, kept, ids), dropped


def _as_tokenized(prompts: PromptSet) -> TokenizedSource:
    """Prompts as a token source for the planner (one sample each; nothing is supervised)."""
    lengths = np.array([len(x) for x in prompts.ids], dtype=np.int64)
    flat = np.concatenate([np.asarray(x, dtype=np.int32) for x in prompts.ids]) if len(prompts) else np.zeros(0, np.int32)
    return TokenizedSource(prompts.name, flat, np.zeros(len(flat), dtype=np.uint8),
                           np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


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


@dataclass
class SequenceBatch:
    """Prompt + completion rows, right-padded: causal attention needs no mask, padding only trails."""

    input_ids: torch.Tensor  # (B, T)
    rows: torch.Tensor  # (K,) row of each completion token
    cols: torch.Tensor  # (K,) its index within the completion
    positions: torch.Tensor  # (K,) flat index of the logits that predict it
    targets: torch.Tensor  # (K,)
    width: int  # completion width L of the (B, L) outputs


def sequence_batch(prompts: Sequence[Sequence[int]], tokens: torch.Tensor, mask: torch.Tensor,
                   pad_id: int) -> SequenceBatch:
    lengths = mask.sum(-1).tolist()
    total = [len(p) + n for p, n in zip(prompts, lengths)]
    width = max(max(total), 1)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    rows, cols, positions = [], [], []
    for r, (p, n) in enumerate(zip(prompts, lengths)):
        ids[r, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        ids[r, len(p) : len(p) + n] = tokens[r, :n].cpu()
        rows.append(torch.full((n,), r, dtype=torch.long))
        cols.append(torch.arange(n))
        positions.append(r * width + len(p) - 1 + torch.arange(n))  # logits at t-1 predict token t
    rows_t, cols_t = torch.cat(rows), torch.cat(cols)
    return SequenceBatch(ids, rows_t, cols_t, torch.cat(positions), tokens.cpu()[rows_t, cols_t], tokens.shape[1])


def _inner(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sequence_forward(model: Any, batch: SequenceBatch, *, selective: bool, temperature: float,
                     value_head: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs ``(B, L)`` of the completion tokens (at the sampling temperature), and values."""
    device = next(model.parameters()).device
    ids = batch.input_ids.to(device)
    if selective or value_head is not None:
        lm = _inner(model)
        out = lm.get_decoder()(input_ids=ids, use_cache=False)
        hidden = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])
        picked = hidden.reshape(-1, hidden.shape[-1])[batch.positions.to(device)]
        logits = lm.get_output_embeddings()(picked)
        values = value_head(picked).squeeze(-1).float() if value_head is not None else None
    else:  # prompt-learning adapters prepend virtual tokens: take the full forward
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        full = out.logits[:, -ids.shape[1]:]
        logits = full.reshape(-1, full.shape[-1])[batch.positions.to(device)]
        values = None
    per_token = token_logprobs(logits.float() / temperature, batch.targets.to(device))
    shape = (batch.input_ids.shape[0], batch.width)
    dense = torch.zeros(shape, dtype=per_token.dtype, device=device).index_put((batch.rows.to(device),
                                                                                batch.cols.to(device)), per_token)
    dense_values = None
    if values is not None:
        dense_values = torch.zeros(shape, dtype=values.dtype, device=device).index_put(
            (batch.rows.to(device), batch.cols.to(device)), values)
    return dense, dense_values


# --------------------------------------------------------------------------------------------- reference


class Reference:
    """The reference policy's per-token log-probs: the base with the adapter off, or a frozen copy of the base."""

    def __init__(self, model: torch.nn.Module | None, adapter_off: bool) -> None:
        self.model = model
        self.adapter_off = adapter_off

    @torch.no_grad()
    def logps(self, policy: torch.nn.Module, batch: SequenceBatch, selective: bool, temperature: float) -> torch.Tensor:
        from tuneforge.training.preference import _adapter_off

        if self.adapter_off:
            with _adapter_off(policy):
                return sequence_forward(policy, batch, selective=selective, temperature=temperature)[0]
        assert self.model is not None
        return sequence_forward(self.model, batch, selective=True, temperature=temperature)[0]


def reference_for(recipe: Recipe, model: torch.nn.Module, device: torch.device, needed: bool) -> Reference | None:
    from tuneforge.models.adapters import is_peft
    from tuneforge.training.preference import _load_frozen_base

    if not needed:
        return None
    if is_peft(model):
        return Reference(None, adapter_off=True)
    return Reference(_load_frozen_base(recipe, device), adapter_off=False)


# --------------------------------------------------------------------------------------------- tasks


class TokenWeighted:
    """Token-weighted means of per-micro-batch statistics (clip fractions, KL, ratios) over a step's share."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weight = 0.0

    def add(self, metrics: dict[str, torch.Tensor], tokens: torch.Tensor) -> None:
        w = float(tokens)
        self.weight += w
        for k, v in metrics.items():
            self.sums[k.replace("/", "_")] = self.sums.get(k.replace("/", "_"), 0.0) + float(v) * w

    def means(self) -> dict[str, float]:
        return {k: v / self.weight for k, v in self.sums.items()} if self.weight else {}


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


class OnlineTask:
    """Shared by GRPO and PPO: prompts by global index, per-step rollouts, micro-batched forward passes."""

    group_size = 1
    evaluate_before_training = True  # the loop scores the starting policy too: the baseline for every later reward

    def __init__(self, plan: Plan, sources: list[PromptSet], val_sources: dict[str, PromptSet], spec: RolloutSpec,
                 tokenizer: Any, reference: Reference | None) -> None:
        self.plan = plan
        self.sources = sources
        self.val_sources = val_sources
        self.spec = spec
        self.tokenizer = tokenizer
        self.reference = reference
        self.rollout: StepRollout | None = None

    # -- protocol -------------------------------------------------------------------------------------
    def num_samples(self) -> int:
        return self.plan.num_steps * self.plan.global_batch_size

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

    def _refs(self, rows: Sequence[int]) -> list[tuple[int, int]]:
        p = self.plan
        return [(int(p.refs[p.row_offsets[r], 0]), int(p.refs[p.row_offsets[r], 1])) for r in rows]

    def _sequences(self, indices: Sequence[int]) -> list[int]:
        ro = self.rollout
        if ro is None or not indices or indices[0] < ro.rows[0] or indices[-1] >= ro.rows[1]:
            raise RuntimeError("online tasks need begin_step(model, step, rows) before loss_tokens/forward_backward")
        g = self.group_size
        return [(r - ro.rows[0]) * g + k for r in indices for k in range(g)]

    # -- rollouts -------------------------------------------------------------------------------------
    def generate(self, model: torch.nn.Module, prompts: list[list[int]], group: int, sampling: Sampling,
                 generator: torch.Generator | None) -> tuple[Completions, list[str]]:
        """Completions in chunks of ``generation_batch`` sequences, then stop strings and decoding."""
        s = self.spec
        per_call = max(1, s.generation_batch // group)
        parts = []
        for i in range(0, len(prompts), per_call):
            with autocast(s.precision, s.device):
                parts.append(sample_completions(model, prompts[i : i + per_call], group_size=group, sampling=sampling,
                                                eos_ids=s.eos_ids, pad_id=s.pad_id, generator=generator))
        width = max(p.tokens.shape[1] for p in parts)
        pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
        comp = Completions(torch.cat([pad(p.tokens, s.pad_id) for p in parts]), torch.cat([pad(p.mask, 0) for p in parts]),
                           torch.cat([p.finished for p in parts]), group)
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

    def forward_rows(self, model: torch.nn.Module, seqs: Sequence[int], *, value_head: Any = None,
                     reference: bool = False) -> list[tuple[list[int], SequenceBatch, Any]]:
        """Micro-batches of the rollout's sequences ``seqs``: (indices, batch, outputs) — no gradients, no dropout.

        The rollout-time log-probs and values describe the policy that sampled, which had dropout off.
        """
        ro = self.rollout
        assert ro is not None
        out = []
        m = self.spec.micro_batch_size
        was_training = model.training
        model.eval()
        for i in range(0, len(seqs), m):
            idx = list(seqs[i : i + m])
            batch = sequence_batch([ro.prompt_ids[j] for j in idx], ro.completions.tokens[idx],
                                   ro.completions.mask[idx], self.spec.pad_id)
            with torch.no_grad(), autocast(self.spec.precision, self.spec.device):
                if reference:
                    assert self.reference is not None
                    res: Any = self.reference.logps(model, batch, self.spec.selective, self.spec.sampling.temperature)
                else:
                    res = sequence_forward(model, batch, selective=self.spec.selective,
                                           temperature=self.spec.sampling.temperature, value_head=value_head)
            out.append((idx, batch, res))
        model.train(was_training)
        return out

    def _trim(self, t: torch.Tensor, idx: Sequence[int], batch: SequenceBatch) -> torch.Tensor:
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


class GRPOTask(OnlineTask):
    """Group sampling, grader rewards, group-relative advantages and the clipped GRPO objective."""

    def __init__(self, plan: Plan, sources: list[PromptSet], val_sources: dict[str, PromptSet], spec: RolloutSpec,
                 tokenizer: Any, reference: Reference | None, grader: Any, cfg: Any) -> None:
        super().__init__(plan, sources, val_sources, spec, tokenizer, reference)
        self.grader = grader
        self.cfg = cfg
        self.group_size = cfg.group_size

    def score(self, records: Sequence[dict], texts: Sequence[str]) -> tuple[torch.Tensor, int]:
        """Grader rewards and the number of (sample, item) pairs that failed (scored 0, error logged)."""
        results = self.grader.evaluate_batch([{"output_text": t} for t in texts], list(records))
        errors = [r.error for r in results if r.error]
        if errors:
            log.warning("graders: %d of %d samples failed and scored 0; first error: %s", len(errors), len(results),
                        errors[0])
        return torch.tensor([r.score for r in results], dtype=torch.float32), len(errors)

    def make_rollout(self, model: torch.nn.Module, batch_index: int, rows: range) -> StepRollout:
        g = self.group_size
        refs = self._refs(rows)
        prompts = [self.sources[s].ids[i] for s, i in refs]
        records = [self.sources[s].records[i] for s, i in refs for _ in range(g)]
        comp, texts = self.generate(model, prompts, g, self.spec.sampling, self.batch_generator(batch_index))
        rewards, errors = self.score(records, texts)
        advantages = group_advantages(rewards, g, scale=self.cfg.scale_rewards)
        groups = rewards.reshape(-1, g)
        lengths = comp.lengths.float()
        ro = StepRollout((rows.start, rows.stop), [p for p in prompts for _ in range(g)], comp,
                         advantages.to(self.spec.device))
        ro.metrics = {"reward": float(rewards.mean()), "reward_std": float(groups.std(dim=1).mean()),
                      "frac_groups_no_signal": float((groups.std(dim=1) == 0).float().mean()),
                      "completion_length": float(lengths.mean()),
                      "completions_finished": float(comp.finished.float().mean()), "grader_errors": float(errors)}
        self.rollout = ro
        every = range(len(ro.prompt_ids))
        if self.reference is not None:
            ro.ref_logps = torch.zeros(comp.tokens.shape, device=self.spec.device)
            for idx, batch, res in self.forward_rows(model, every, reference=True):
                ro.ref_logps[idx, : batch.width] = res
        if self.spec.updates_per_batch > 1:  # later updates on this batch are off-policy: keep the sampler's log-probs
            ro.old_logps = torch.zeros(comp.tokens.shape, device=self.spec.device)
            for idx, batch, (res, _) in self.forward_rows(model, every):
                ro.old_logps[idx, : batch.width] = res
        return ro

    def loss_tokens(self, indices: Sequence[int]) -> int:
        """The step's divisor: sequences (grpo), completion tokens (dapo, bnpo) or sequences × budget (dr_grpo)."""
        seqs = self._sequences(indices)
        if self.cfg.loss_type == "grpo":
            return len(seqs)
        if self.cfg.loss_type == "dr_grpo":
            return len(seqs) * self.spec.sampling.max_new_tokens
        assert self.rollout is not None
        return int(self.rollout.completions.mask[seqs].sum())

    def forward_backward(self, model: torch.nn.Module, indices: Sequence[int], scale: float) -> dict[str, Any]:
        ro = self.rollout
        assert ro is not None
        s, cfg = self.spec, self.cfg
        seqs = self._sequences(indices)
        loss_acc = torch.zeros((), device=s.device)
        fed = 0
        stats = TokenWeighted()
        for i in range(0, len(seqs), s.micro_batch_size):
            idx = seqs[i : i + s.micro_batch_size]
            batch = sequence_batch([ro.prompt_ids[j] for j in idx], ro.completions.tokens[idx],
                                   ro.completions.mask[idx], s.pad_id)
            mask = self._trim(ro.completions.mask, idx, batch)
            with autocast(s.precision, s.device):
                logps, _ = sequence_forward(model, batch, selective=s.selective, temperature=s.sampling.temperature)
            ref = self._trim(ro.ref_logps, idx, batch) if ro.ref_logps is not None else None
            old = self._trim(ro.old_logps, idx, batch) if ro.old_logps is not None else None
            common = dict(clip_eps_low=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high, beta=cfg.beta)
            if cfg.loss_type == "grpo":  # Σ over sequences of each sequence's token mean
                loss, metrics = grpo_loss(logps, old, ref, ro.advantages[idx], mask, loss_type="grpo", **common)
                loss_sum = loss * len(idx)
            else:  # Σ over tokens; the divisor is the step's (loss_tokens)
                loss_sum, metrics = grpo_loss(logps, old, ref, ro.advantages[idx], mask, loss_type="dapo",
                                              num_items_in_batch=1, **common)
            (loss_sum * scale).backward()
            loss_acc += loss_sum.detach()
            stats.add(metrics, mask.sum())
            fed += int(batch.input_ids.numel())
        return {"loss_sum": loss_acc, "tokens_fed": torch.tensor(fed), "metrics": {**ro.metrics, **stats.means()}}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Mean grader reward of greedy completions on held-out prompts (per source and overall)."""
        greedy = Sampling(self.spec.sampling.max_new_tokens, greedy=True)
        out: dict[str, float] = {}
        total, count = 0.0, 0
        for name, ps, n in self.held_out(self.cfg.eval_prompts):
            _, texts = self.generate(model, ps.ids[:n], 1, greedy, None)
            rewards, _ = self.score(ps.records[:n], texts)
            out[f"val/{name}_reward"] = float(rewards.mean())
            total += float(rewards.sum())
            count += n
        if count:
            out["val/reward"] = total / count
        model.train()
        return out


class PPOTask(OnlineTask):
    """RLHF: reward-model scores, a KL-penalised per-token reward, GAE on a value head, clipped PPO losses."""

    def __init__(self, plan: Plan, sources: list[PromptSet], val_sources: dict[str, PromptSet], spec: RolloutSpec,
                 tokenizer: Any, reference: Reference | None, reward_model: Any, reward_tokenizer: Any,
                 cfg: Any) -> None:
        super().__init__(plan, sources, val_sources, spec, tokenizer, reference)
        self.reward_model = reward_model
        self.reward_tokenizer = reward_tokenizer
        self.cfg = cfg

    def scores(self, records: Sequence[dict], texts: Sequence[str], finished: torch.Tensor | None) -> torch.Tensor:
        from tuneforge.training.preference import score_conversations

        convs = [[*r["messages"], {"role": "assistant", "content": t}] for r, t in zip(records, texts)]
        scores = score_conversations(self.reward_model, self.reward_tokenizer, convs).float()
        if self.cfg.missing_eos_penalty is not None and finished is not None:
            scores = scores - self.cfg.missing_eos_penalty * (~finished.cpu()).float()
        return scores

    def make_rollout(self, model: torch.nn.Module, batch_index: int, rows: range) -> StepRollout:
        cfg, s = self.cfg, self.spec
        refs = self._refs(rows)
        prompts = [self.sources[a].ids[i] for a, i in refs]
        records = [self.sources[a].records[i] for a, i in refs]
        comp, texts = self.generate(model, prompts, 1, s.sampling, self.batch_generator(batch_index))
        score = self.scores(records, texts, comp.finished).to(s.device)
        ro = StepRollout((rows.start, rows.stop), prompts, comp, torch.zeros(0))
        self.rollout = ro
        shape = comp.tokens.shape
        old_logps = torch.zeros(shape, device=s.device)
        old_values = torch.zeros(shape, device=s.device)
        ref_logps = torch.zeros(shape, device=s.device)
        every = range(len(prompts))
        for idx, batch, (lp, v) in self.forward_rows(model, every, value_head=model.value_head):
            old_logps[idx, : batch.width] = lp
            old_values[idx, : batch.width] = v
        for idx, batch, lp in self.forward_rows(model, every, reference=True):
            ref_logps[idx, : batch.width] = lp
        mask = comp.mask.to(s.device)
        rewards = kl_penalized_rewards(score, old_logps, ref_logps, mask, cfg.kl_coef)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        ro.advantages = masked_whiten(advantages, mask) * mask  # over the whole step, independent of the split
        ro.old_logps, ro.ref_logps, ro.old_values, ro.returns = old_logps, ref_logps, old_values, returns
        kl = masked_mean(old_logps - ref_logps, mask)
        ro.metrics = {"score": float(score.mean()), "kl": float(kl), "completion_length": float(comp.lengths.float().mean()),
                      "completions_finished": float(comp.finished.float().mean()),
                      "non_score_reward": float(-cfg.kl_coef * (old_logps - ref_logps).mul(mask).sum(-1).mean())}
        return ro

    def loss_tokens(self, indices: Sequence[int]) -> int:
        assert self.rollout is not None
        return int(self.rollout.completions.mask[self._sequences(indices)].sum())

    def forward_backward(self, model: torch.nn.Module, indices: Sequence[int], scale: float) -> dict[str, Any]:
        ro = self.rollout
        assert ro is not None and ro.old_logps is not None and ro.old_values is not None and ro.returns is not None
        s, cfg = self.spec, self.cfg
        seqs = self._sequences(indices)
        loss_acc = torch.zeros((), device=s.device)
        fed = 0
        stats = TokenWeighted()
        for i in range(0, len(seqs), s.micro_batch_size):
            idx = seqs[i : i + s.micro_batch_size]
            batch = sequence_batch([ro.prompt_ids[j] for j in idx], ro.completions.tokens[idx],
                                   ro.completions.mask[idx], s.pad_id)
            mask = self._trim(ro.completions.mask, idx, batch)
            with autocast(s.precision, s.device):
                logps, values = sequence_forward(model, batch, selective=s.selective,
                                                 temperature=s.sampling.temperature, value_head=model.value_head)
            assert values is not None
            pg, pg_stats = ppo_policy_loss(logps, self._trim(ro.old_logps, idx, batch),
                                           self._trim(ro.advantages, idx, batch), mask, cfg.clip_eps)
            vf, vf_stats = ppo_value_loss(values, self._trim(ro.old_values, idx, batch),
                                          self._trim(ro.returns, idx, batch), mask, cfg.value_clip)
            loss_sum = (pg + cfg.vf_coef * vf) * mask.sum()  # token means → token sums; the step divides
            (loss_sum * scale).backward()
            loss_acc += loss_sum.detach()
            stats.add({**pg_stats, **vf_stats, "value_loss": vf.detach()}, mask.sum())
            fed += int(batch.input_ids.numel())
        return {"loss_sum": loss_acc, "tokens_fed": torch.tensor(fed), "metrics": {**ro.metrics, **stats.means()}}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Mean reward-model score of greedy completions on held-out prompts."""
        greedy = Sampling(self.spec.sampling.max_new_tokens, greedy=True)
        out: dict[str, float] = {}
        total, count = 0.0, 0
        for name, ps, n in self.held_out(self.cfg.eval_prompts):
            comp, texts = self.generate(model, ps.ids[:n], 1, greedy, None)
            scores = self.scores(ps.records[:n], texts, None)
            out[f"val/{name}_score"] = float(scores.mean())
            total += float(scores.sum())
            count += n
        if count:
            out["val/score"] = total / count
        model.train()
        return out


# --------------------------------------------------------------------------------------------- value head


def attach_value_head(model: torch.nn.Module) -> torch.nn.Module:
    """A scalar value head on the policy's last hidden state (shared trunk), zero-initialised: V starts at 0."""
    hidden = _inner(model).config.hidden_size
    head = torch.nn.Linear(hidden, 1, device=next(model.parameters()).device, dtype=torch.float32)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    model.value_head = head
    return model


def detach_value_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """Remove the value head before saving, so the result is a plain causal LM (or adapter)."""
    head = getattr(model, "value_head", None)
    if head is not None:
        del model.value_head
    return head
