"""Preference methods as tasks for the one training loop: DPO (and its variants) and Bradley–Terry reward models.

``method: dpo`` and ``method: reward`` reuse everything SFT has — data validation, mixing plan, token cache,
adapters, tracking, checkpoints, exact resume, elastic replicas — by providing the same task protocol as
:class:`~tuneforge.training.sft_task.SFTTask`. A *sample* is one (chosen, rejected) pair with a global index, and it
weighs 1: ``loss_tokens(indices)`` is the number of pairs, so a step's loss is the mean over its pairs however
the pairs are split into micro-batches or replicas. The losses themselves are the pure functions in
``tuneforge.objectives.dpo`` / ``.reward``; this module only feeds them.

The DPO reference model costs no second copy of the weights: with an adapter it is the base with the adapter
switched off; with full fine-tuning its log-probs are computed once, before training, from a transiently loaded
base, and cached next to the token cache (``dpo.precompute_ref``), so later runs and resumed runs reuse them
(``precompute_ref: false`` keeps a frozen copy instead, as TRL does by default).

Speed: both answers of a pair go through the model in one row with the prompt computed once (a block attention
mask keeps each answer blind to the other; checked against two separate rows when the task is built), and only
the scored positions are projected to the vocabulary. See ``benchmarks/methods_throughput.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from tuneforge.config import DPOConfig, Recipe
from tuneforge.data.preference import PairBatch, PairSource, PairTokens, collate_pairs
from tuneforge.data.sampler import Plan
from tuneforge.errors import RecipeError
from tuneforge.objectives.dpo import dpo_loss, orpo_loss, simpo_loss
from tuneforge.objectives.logprobs import token_logprobs
from tuneforge.objectives.reward import reward_loss
from tuneforge.training.forward import supports_selective_head
from tuneforge.training.precision import autocast

REFERENCE_FREE = ("simpo", "orpo")
REF_CACHE_VERSION = 1
MAX_EVAL_PAIRS = 512  # validation pairs scored per source (and given precomputed reference log-probs)


# --------------------------------------------------------------------------------------------- set-up


@dataclass
class PreferencePrepared:
    """Validated, tokenized pairs and their plan (no model yet); the same interface as ``build.Prepared``."""

    recipe: Recipe
    tokenizer: Any
    template: str | None
    pairs: list[PairTokens]
    plan: Plan
    data_hashes: dict[str, str]
    data_info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return self.plan.num_steps

    def mix_dict(self) -> dict[str, Any]:
        m = self.plan.mix
        return {"names": m.names, "target": m.target, "realised": m.realised(), "examples": m.examples,
                "passes": m.passes, "mix_by": m.mix_by}

    def mix_metrics(self) -> dict[str, float]:
        return self.plan.mix.as_metrics()

    def mix_summary(self) -> str:
        return self.plan.mix.summary()

    def make_task(self, model: torch.nn.Module, micro_batch_size: int, precision: str,
                  device: torch.device) -> DPOTask | RewardTask:
        """The task for the recipe's method; for DPO this also sets up (or precomputes) the reference."""
        train = [p.train for p in self.pairs]
        val = {p.name: p.val for p in self.pairs if p.val is not None}
        spec = PairSpec(micro_batch_size=micro_batch_size, pad_id=self.tokenizer.pad_token_id, precision=precision,
                        device=device)
        if self.recipe.method == "reward":
            spec.selective = reward_model_parts(model) is not None
            spec.share_prompt = spec.selective and _attention_allows_masks(model) and layouts_agree(
                model, lambda b: sequence_rewards(model, b), train, spec.pad_id, device)
            return RewardTask(self.plan, train, val, spec, center_coeff=self.recipe.reward.center_coeff)
        spec.selective = supports_selective_head(model)
        spec.share_prompt = spec.selective and _attention_allows_masks(model) and layouts_agree(
            model, lambda b: completion_logps(model, b, True)[0], train, spec.pad_id, device)
        reference = make_reference(self.recipe, model, spec, self.plan, train, val)
        return DPOTask(self.plan, train, val, spec, self.recipe.dpo, reference)


def prepare_preference(recipe: Recipe) -> PreferencePrepared:
    """Validate every record, tokenize pairs (through the cache) and plan every step — before any model loads."""
    from tuneforge.data.pipeline import load_sources
    from tuneforge.data.preference import tokenize_preference_sources
    from tuneforge.data.sampler import build_plan
    from tuneforge.models.adapters import check_qlora_supported
    from tuneforge.models.loading import check_model_path
    from tuneforge.training.build import load_tokenizer_for

    loaded = load_sources(recipe)
    for src in loaded:
        if src.format != "preference":
            raise RecipeError(
                f"data.sources: {src.path} holds {src.format} records, but method {recipe.method} trains on "
                "preference pairs (expected {\"prompt\", \"chosen\", \"rejected\"} or OpenAI's DPO format "
                "{\"input\", \"preferred_output\", \"non_preferred_output\"})")
        if any("chosen" not in ex for ex in src.val):
            raise RecipeError(f"data.validation: {recipe.data.validation} must hold preference pairs for method "
                              f"{recipe.method}")
    check_model_path(recipe.model.path)
    if recipe.adapter.kind == "qlora":
        check_qlora_supported()
    tokenizer, template = load_tokenizer_for(recipe, True)
    pairs = tokenize_preference_sources(loaded, tokenizer, template, recipe)
    # One pair is one sample of cost 1: sources mix by pairs, never packed.
    plan = build_plan([p.train for p in pairs], [p.weight for p in pairs], mix_by="examples",
                      seed=recipe.train.seed, max_length=recipe.data.max_length, packing=False,
                      global_batch_size=recipe.train.global_batch_size, epochs=recipe.train.epochs,
                      max_steps=recipe.train.max_steps)
    for s, p in enumerate(pairs):  # report response tokens, not the unit cost the plan mixed by
        plan.mix.tokens[s] = int(p.train.completion_tokens[plan.refs[plan.refs[:, 0] == s, 1]].sum())
    return PreferencePrepared(recipe, tokenizer, template, pairs, plan,
                              data_hashes={s.name: s.data_hash for s in loaded},
                              data_info={p.name: p.stats for p in pairs})


# --------------------------------------------------------------------------------------------- batches


@dataclass
class PairSpec:
    """How a task feeds pairs to the model: batch size, padding, precision, device and layout."""

    micro_batch_size: int  # pairs per forward pass (two sequences each)
    pad_id: int
    precision: str
    device: torch.device
    selective: bool = True  # project only scored positions (see ``completion_logps``)
    share_prompt: bool = True  # one row per pair, prompt computed once (see ``data.preference.collate_pairs``)

    def batch(self, refs: Sequence[tuple[int, int]], sources: Sequence[PairSource]) -> PairBatch:
        return collate_pairs(refs, sources, self.pad_id, share_prompt=self.share_prompt).to(self.device)


class PairLogps(NamedTuple):
    """Summed completion log-probs and completion token counts of each pair's two sides, shape ``(pairs,)``."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def averaged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Length-normalised log-probs (what IPO, SimPO and ORPO use)."""
        return self.chosen / self.chosen_tokens.clamp(min=1), self.rejected / self.rejected_tokens.clamp(min=1)


def _inner(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (adapter layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _attention_allows_masks(model: Any) -> bool:
    """FlashAttention-2 takes no arbitrary masks; SDPA and eager do."""
    return getattr(_inner(model).config, "_attn_implementation", "sdpa") in ("sdpa", "eager")


def completion_logps(model: Any, batch: PairBatch, selective: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each sequence's completion tokens and their count, shape ``(2 · pairs,)`` each.

    With `selective`, the decoder runs once and only the scored positions are projected to the vocabulary —
    a small model's largest matmul skipped for every prompt token. Otherwise (prompt-learning adapters, soft-capped
    heads) the full forward runs on the plain layout.
    """
    n = 2 * batch.pairs
    if selective:
        lm = _inner(model)
        out = lm.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids,
                               attention_mask=batch.attention_mask, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        logits = lm.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1])[batch.positions])
    else:
        if batch.attention_mask is not None:
            raise ValueError("the shared-prompt layout needs the selective forward")
        out = model(input_ids=batch.input_ids, attention_mask=torch.ones_like(batch.input_ids), use_cache=False)
        width = batch.input_ids.shape[1]
        logits = out.logits[:, -width:]  # prompt tuning prepends virtual tokens
        logits = logits.reshape(-1, logits.shape[-1])[batch.positions]
    per_token = token_logprobs(logits, batch.targets)
    sums = torch.zeros(n, dtype=per_token.dtype, device=per_token.device).index_add(0, batch.seq, per_token)
    return sums, torch.bincount(batch.seq, minlength=n)


def split_pairs(sums: torch.Tensor, counts: torch.Tensor) -> PairLogps:
    n = sums.shape[0] // 2
    return PairLogps(sums[:n], sums[n:], counts[:n].to(sums.dtype), counts[n:].to(sums.dtype))


def layouts_agree(model: torch.nn.Module, score: Callable[[PairBatch], torch.Tensor], sources: Sequence[PairSource],
                  pad_id: int, device: torch.device) -> bool:
    """Whether the shared-prompt layout scores a real pair as two separate rows do (fp32, tolerance 1e-4).

    A decoder that ignored custom 4-D masks or position ids would silently compute something else; one tiny
    forward at set-up rules that out, and training falls back to the plain layout.
    """
    src = next((i for i, s in enumerate(sources) if len(s)), None)
    if src is None:
        return False
    was_training = model.training
    model.eval()  # dropout would make any two forwards differ
    try:
        with torch.no_grad():
            shared = score(collate_pairs([(src, 0)], sources, pad_id, share_prompt=True).to(device))
            plain = score(collate_pairs([(src, 0)], sources, pad_id, share_prompt=False).to(device))
    finally:
        model.train(was_training)
    return bool(torch.allclose(shared.float(), plain.float(), atol=1e-4, rtol=1e-4))


# --------------------------------------------------------------------------------------------- DPO


def preference_objective(cfg: DPOConfig, policy: PairLogps,
                         ref: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The recipe's DPO-family loss (mean over pairs) from policy log-probs and reference sums ``(chosen, rejected)``.

    Sigmoid and hinge compare summed log-probs; IPO, SimPO and ORPO compare length-averaged ones (ORPO's SFT term
    is the chosen response's per-pair mean token NLL, so it stays exact under any micro-batch split).
    """
    if cfg.loss_type in ("sigmoid", "hinge"):
        assert ref is not None
        return dpo_loss(policy.chosen, policy.rejected, ref[0], ref[1], beta=cfg.beta, loss_type=cfg.loss_type,
                        label_smoothing=cfg.label_smoothing)
    chosen_avg, rejected_avg = policy.averaged()
    if cfg.loss_type == "ipo":
        assert ref is not None
        return dpo_loss(chosen_avg, rejected_avg, ref[0] / policy.chosen_tokens.clamp(min=1),
                        ref[1] / policy.rejected_tokens.clamp(min=1), beta=cfg.beta, loss_type="ipo")
    if cfg.loss_type == "simpo":
        return simpo_loss(chosen_avg, rejected_avg, beta=cfg.beta, gamma=cfg.simpo_gamma,
                          label_smoothing=cfg.label_smoothing)
    return orpo_loss(-chosen_avg.mean(), chosen_avg, rejected_avg, beta=cfg.beta)


class Reference:
    """Where reference log-probs come from: precomputed tables, the policy with its adapter off, or a frozen copy."""

    def __init__(self, *, tables: dict[str, Any] | None = None, model: torch.nn.Module | None = None,
                 disable_adapter: bool = False) -> None:
        self.tables = tables  # {"train": [per source (pairs, 2)], "val": {name: (pairs, 2)}}
        self.model = model
        self.disable_adapter = disable_adapter

    @property
    def kind(self) -> str:
        return "precomputed" if self.tables is not None else "adapter_off" if self.disable_adapter else "copy"

    @staticmethod
    def lookup(tables: Sequence[np.ndarray], refs: Sequence[tuple[int, int]],
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Precomputed (chosen, rejected) sums of the pairs ``refs`` = ``(source, pair)``."""
        rows = torch.from_numpy(np.stack([tables[s][i] for s, i in refs]).astype(np.float32)).to(device)
        return rows[:, 0], rows[:, 1]

    @torch.no_grad()
    def compute(self, policy_model: torch.nn.Module, batch: PairBatch,
                spec: PairSpec) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model if self.model is not None else policy_model
        with _adapter_off(model) if self.disable_adapter else contextlib.nullcontext(), autocast(spec.precision,
                                                                                                  spec.device):
            sums, _ = completion_logps(model, batch, spec.selective)
        n = batch.pairs
        return sums[:n].float(), sums[n:].float()


@contextlib.contextmanager
def _adapter_off(model: Any):
    """The base model: adapter layers switched off in place (no copy of any weight).

    For LoRA-style tuners the layers are toggled directly: ``PeftModel.disable_adapter`` first inspects the state
    of every layer, which costs more than the reference forward of a small model.
    """
    tuner = getattr(model, "base_model", None)
    if getattr(model.active_peft_config, "is_prompt_learning", False) or not hasattr(tuner, "disable_adapter_layers"):
        with model.disable_adapter():
            yield
        return
    tuner.disable_adapter_layers()
    try:
        yield
    finally:
        tuner.enable_adapter_layers()


def _pair_refs(plan: Plan, rows: Sequence[int]) -> list[tuple[int, int]]:
    """``(source, pair)`` of each plan row (one pair per row)."""
    return [(int(plan.refs[plan.row_offsets[r], 0]), int(plan.refs[plan.row_offsets[r], 1])) for r in rows]


def _accumulate(task: Any, model: torch.nn.Module, indices: Sequence[int], scale: float,
                losses: Callable[[list[tuple[int, int]]], tuple[torch.Tensor, torch.Tensor, PairBatch]]
                ) -> dict[str, torch.Tensor]:
    """Gradients of ``scale · Σ pair losses`` over `indices` in micro-batches; returns summable step metrics."""
    s = task.spec
    loss_acc = torch.zeros((), device=s.device)
    correct = torch.zeros((), device=s.device)
    fed = 0
    rows = list(indices)
    for i in range(0, len(rows), s.micro_batch_size):
        refs = _pair_refs(task.plan, rows[i : i + s.micro_batch_size])
        loss, accuracy, batch = losses(refs)
        loss_sum = loss * len(refs)  # the objectives return means over pairs
        (loss_sum * scale).backward()
        loss_acc += loss_sum.detach()
        correct += accuracy * len(refs)
        fed += batch.num_tokens
    return {"loss_sum": loss_acc, "tokens_fed": torch.tensor(fed), "pairs_correct": correct}


def _held_out(task: Any, model: torch.nn.Module, max_examples: int,
              losses: Callable[[PairSource, str, list[tuple[int, int]]], tuple[torch.Tensor, dict[str, torch.Tensor]]],
              accuracy_key: str, margin_key: str) -> dict[str, float]:
    """Loss, pairwise accuracy and margin on each validation source and over all of them (pair-weighted)."""
    s = task.spec
    model.eval()
    out: dict[str, float] = {}
    total = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
    pairs = 0
    for name, src in task.val_sources.items():
        n = min(len(src), max_examples)
        part = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
        for start in range(0, n, s.micro_batch_size):
            refs = [(0, i) for i in range(start, min(start + s.micro_batch_size, n))]
            loss, metrics = losses(src, name, refs)
            part["loss"] += float(loss) * len(refs)
            part["accuracy"] += float(metrics[accuracy_key]) * len(refs)
            part["margin"] += float(metrics[margin_key]) * len(refs)
        for k, v in part.items():
            out[f"val/{name}_{k}"] = v / max(n, 1)
            total[k] += v
        pairs += n
    if pairs:
        out.update({f"val/{k}": v / pairs for k, v in total.items()})
    model.train()
    return out


class DPOTask:
    """Samples are pairs; a step's loss is the sum of its pairs' DPO-family losses (normalised by pair count)."""

    def __init__(self, plan: Plan, sources: list[PairSource], val_sources: dict[str, PairSource], spec: PairSpec,
                 cfg: DPOConfig, reference: Reference | None) -> None:
        if reference is None and cfg.loss_type not in REFERENCE_FREE:
            raise ValueError(f"dpo loss {cfg.loss_type!r} needs a reference")
        self.plan = plan
        self.sources = sources
        self.val_sources = val_sources
        self.spec = spec
        self.cfg = cfg
        self.reference = reference if cfg.loss_type not in REFERENCE_FREE else None

    def num_samples(self) -> int:
        return self.plan.num_steps * self.plan.global_batch_size

    def loss_tokens(self, indices: Sequence[int]) -> int:
        """Pairs in `indices` (each plan row is one pair of cost 1)."""
        return int(self.plan.row_tokens[np.asarray(indices, dtype=np.int64)].sum()) if len(indices) else 0

    def pair_losses(self, model: torch.nn.Module, sources: Sequence[PairSource], refs: list[tuple[int, int]],
                    tables: Sequence[np.ndarray] | None) -> tuple[torch.Tensor, dict[str, torch.Tensor], PairBatch]:
        """Mean loss and metrics of the pairs `refs`; reference sums from `tables` when precomputed."""
        s = self.spec
        batch = s.batch(refs, sources)
        with autocast(s.precision, s.device):
            sums, counts = completion_logps(model, batch, s.selective)
        policy = split_pairs(sums.float(), counts)
        ref = None
        if self.reference is not None:
            if tables is not None:
                ref = Reference.lookup(tables, refs, s.device)
            else:
                ref = self.reference.compute(model, batch, s)
        loss, metrics = preference_objective(self.cfg, policy, ref)
        return loss, metrics, batch

    def _tables(self, split: str) -> Any:
        r = self.reference
        return r.tables[split] if r is not None and r.tables is not None else None

    def forward_backward(self, model: torch.nn.Module, indices: Sequence[int], scale: float) -> dict[str, torch.Tensor]:
        """Accumulate gradients of ``scale · Σ pair losses`` over the pairs `indices`, in micro-batches."""
        tables = self._tables("train")

        def losses(refs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, PairBatch]:
            loss, metrics, batch = self.pair_losses(model, self.sources, refs, tables)
            return loss, metrics["rewards/accuracies"], batch

        return _accumulate(self, model, indices, scale, losses)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, max_examples: int = MAX_EVAL_PAIRS) -> dict[str, float]:
        """Held-out loss, pairwise accuracy of the implicit reward (chosen > rejected) and mean reward margin."""
        tables = self._tables("val")

        def losses(src: PairSource, name: str, refs: list[tuple[int, int]]) -> tuple[torch.Tensor, dict]:
            loss, metrics, _ = self.pair_losses(model, [src], refs, [tables[name]] if tables is not None else None)
            return loss, metrics

        return _held_out(self, model, max_examples, losses, "rewards/accuracies", "rewards/margins")


# --------------------------------------------------------------------------------------------- reference


def make_reference(recipe: Recipe, model: torch.nn.Module, spec: PairSpec, plan: Plan, train: list[PairSource],
                   val: dict[str, PairSource], max_val: int = MAX_EVAL_PAIRS) -> Reference | None:
    """The reference for the recipe: none (SimPO/ORPO), precomputed tables, the adapter-free base, or a copy."""
    from tuneforge.models.adapters import is_peft

    cfg = recipe.dpo
    if cfg.loss_type in REFERENCE_FREE:
        return None
    peft = is_peft(model)
    precompute = cfg.precompute_ref if cfg.precompute_ref is not None else not peft
    if not precompute:
        if peft:
            return Reference(disable_adapter=True)
        return Reference(model=_load_frozen_base(recipe, spec.device))
    # With an adapter the base is the policy with its adapter off (right even when resuming a trained adapter);
    # with full fine-tuning the weights passed in may already be trained (resume), so the base is loaded afresh —
    # and only if some reference log-prob is not in the cache yet.
    base = _Lazy(lambda: model) if peft else _Lazy(lambda: _load_frozen_base(recipe, spec.device))
    ctx = _adapter_off if peft else (lambda m: contextlib.nullcontext())
    fingerprint = model_fingerprint(recipe.model.path)
    needed = [np.unique(plan.refs[plan.refs[:, 0] == s, 1]) for s in range(len(train))]
    use_cache = recipe.data.cache
    tables = {
        "train": [reference_table(src, ids, base, ctx, spec, fingerprint, use_cache)
                  for src, ids in zip(train, needed)],
        "val": {name: reference_table(src, np.arange(min(len(src), max_val)), base, ctx, spec, fingerprint, use_cache)
                for name, src in val.items()},
    }
    base.release()
    return Reference(tables=tables)


class _Lazy:
    """Load the reference base only on a cache miss, and let it go as soon as the tables are filled."""

    def __init__(self, load: Callable[[], torch.nn.Module]) -> None:
        self._load = load
        self._model: torch.nn.Module | None = None

    def get(self) -> torch.nn.Module:
        if self._model is None:
            self._model = self._load()
        return self._model

    def release(self) -> None:
        self._model = None


def _load_frozen_base(recipe: Recipe, device: torch.device) -> torch.nn.Module:
    from tuneforge.models.loading import load_model

    model = load_model(recipe.model.path, dtype=torch.float32, device=device,
                       attn_implementation=recipe.model.attn_implementation,
                       trust_remote_code=recipe.model.trust_remote_code)
    model.eval().requires_grad_(False)
    return model


def model_fingerprint(path: str) -> str:
    """Identifies the base weights cheaply: config plus the name, size and mtime of every weight file."""
    root = Path(path).expanduser()
    if not root.is_dir():
        return hashlib.sha256(path.encode()).hexdigest()[:16]  # a hub id: the name (and the hub's cache) decide
    h = hashlib.sha256()
    h.update((root / "config.json").read_bytes() if (root / "config.json").exists() else b"")
    for f in sorted(root.iterdir()):
        if f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def reference_table(src: PairSource, needed: np.ndarray, base: _Lazy,
                    ctx: Callable[[Any], contextlib.AbstractContextManager], spec: PairSpec,
                    fingerprint: str, use_cache: bool) -> np.ndarray:
    """``(pairs, 2)`` summed reference log-probs (chosen, rejected); NaN for pairs the run never uses.

    Cached under the token cache as ``reference/<key>.npy``, the key joining the pairs' token-cache key, the base
    weights and the precision; a later run computes only the pairs it needs that are still missing.
    """
    from tuneforge.paths import cache_dir

    key = hashlib.sha256(json.dumps({"v": REF_CACHE_VERSION, "tokens": src.cache_key, "model": fingerprint,
                                     "precision": spec.precision}, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir("tokens") / "reference" / f"{key}.npy"
    cacheable = use_cache and bool(src.cache_key)
    table = np.full((len(src), 2), np.nan, dtype=np.float32)
    if cacheable and path.exists():
        cached = np.load(path)
        if cached.shape == table.shape:
            table = cached.copy()
    missing = needed[np.isnan(table[needed]).any(axis=1)] if len(needed) else needed
    if len(missing) == 0:
        return table
    model = base.get()
    was_training = model.training
    model.eval()
    order = missing[np.argsort(-src.lengths[missing], kind="stable")]  # similar lengths together: little padding
    with ctx(model):
        for start in range(0, len(order), spec.micro_batch_size):
            ids = [int(i) for i in order[start : start + spec.micro_batch_size]]
            chosen, rejected = Reference().compute(model, spec.batch([(0, i) for i in ids], [src]), spec)
            table[ids, 0] = chosen.cpu().numpy()
            table[ids, 1] = rejected.cpu().numpy()
    model.train(was_training)
    if cacheable:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}-", suffix=".npy")
        os.close(fd)
        np.save(tmp, table)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new table, never a torn one
    return table


# --------------------------------------------------------------------------------------------- reward model


def reward_model_parts(model: Any) -> tuple[Any, Any] | None:
    """The decoder and scalar head of a transformers ``…ForSequenceClassification`` (inside PEFT), if it has both."""
    lm = _inner(model)
    decoder = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    head = getattr(lm, "score", None)
    return (decoder, head) if decoder is not None and head is not None else None


def sequence_rewards(model: Any, batch: PairBatch) -> torch.Tensor:
    """The scalar reward of each sequence, read at its last token (what HF's pooling picks), shape ``(2 · pairs,)``.

    Only the last position of each sequence goes through the head. Models without a plain ``score`` head take the
    full forward on the plain layout and pool themselves.
    """
    parts = reward_model_parts(model)
    if parts is None:
        if batch.attention_mask is not None:
            raise ValueError("the shared-prompt layout needs a model with a decoder and a `score` head")
        width = batch.input_ids.shape[1]
        ends = (batch.last % width)[:, None]
        mask = (torch.arange(width, device=ends.device)[None, :] <= ends).long()
        return model(input_ids=batch.input_ids, attention_mask=mask, use_cache=False).logits[:, 0].float()
    decoder, head = parts
    out = decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask,
                  use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return head(hidden.reshape(-1, hidden.shape[-1])[batch.last])[:, 0].float()


class RewardTask:
    """Samples are pairs; a step's loss is the sum of their Bradley–Terry losses (normalised by pair count)."""

    def __init__(self, plan: Plan, sources: list[PairSource], val_sources: dict[str, PairSource], spec: PairSpec,
                 center_coeff: float | None = None) -> None:
        self.plan = plan
        self.sources = sources
        self.val_sources = val_sources
        self.spec = spec
        self.center_coeff = center_coeff

    def num_samples(self) -> int:
        return self.plan.num_steps * self.plan.global_batch_size

    def loss_tokens(self, indices: Sequence[int]) -> int:
        """Pairs in `indices` (each plan row is one pair of cost 1)."""
        return int(self.plan.row_tokens[np.asarray(indices, dtype=np.int64)].sum()) if len(indices) else 0

    def pair_losses(self, model: torch.nn.Module, sources: Sequence[PairSource],
                    refs: list[tuple[int, int]]) -> tuple[torch.Tensor, dict[str, torch.Tensor], PairBatch]:
        s = self.spec
        batch = s.batch(refs, sources)
        with autocast(s.precision, s.device):
            rewards = sequence_rewards(model, batch)
        loss, metrics = reward_loss(rewards[: batch.pairs], rewards[batch.pairs :], center_coeff=self.center_coeff)
        return loss, metrics, batch

    def forward_backward(self, model: torch.nn.Module, indices: Sequence[int], scale: float) -> dict[str, torch.Tensor]:
        def losses(refs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, PairBatch]:
            loss, metrics, batch = self.pair_losses(model, self.sources, refs)
            return loss, metrics["accuracy"], batch

        return _accumulate(self, model, indices, scale, losses)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, max_examples: int = MAX_EVAL_PAIRS) -> dict[str, float]:
        """Held-out Bradley–Terry loss, pairwise accuracy (chosen scored strictly higher) and mean margin."""

        def losses(src: PairSource, name: str, refs: list[tuple[int, int]]) -> tuple[torch.Tensor, dict]:
            loss, metrics, _ = self.pair_losses(model, [src], refs)
            return loss, metrics

        return _held_out(self, model, max_examples, losses, "accuracy", "margin")


def build_reward_model(recipe: Recipe, device: torch.device) -> torch.nn.Module:
    """The base with a fresh scalar head (``num_labels=1``) in fp32 on `device`, wrapped with the recipe's adapter.

    With LoRA/DoRA the adapter is a sequence-classification adapter, so PEFT trains and saves the head alongside it.
    """
    from transformers import AutoModelForSequenceClassification

    from tuneforge.errors import ModelError
    from tuneforge.models.adapters import apply_adapter, is_peft, peft_config
    from tuneforge.models.loading import check_model_path, quiet_transformers

    check_model_path(recipe.model.path)
    quiet_transformers()
    torch.manual_seed(recipe.train.seed)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            recipe.model.path, num_labels=1, dtype=torch.float32, attn_implementation=recipe.model.attn_implementation,
            trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load {recipe.model.path} with a scalar (sequence-classification) head: {e}") from None
    if model.config.pad_token_id is None:  # HF pooling finds the last real token by the pad id
        from tuneforge.training.build import load_tokenizer_for

        tokenizer, _ = load_tokenizer_for(recipe, False)
        model.config.pad_token_id = tokenizer.pad_token_id
    model = model.to(device)
    if recipe.adapter.kind == "full":
        model = apply_adapter(model, recipe.adapter)
    else:
        import peft

        cfg = peft_config(recipe.adapter)
        cfg.task_type = peft.TaskType.SEQ_CLS  # the score head becomes a trained, saved module
        try:
            model = peft.get_peft_model(model, cfg)
        except ValueError as e:
            raise RecipeError(f"adapter: {e}") from None
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if is_peft(model):
            model.enable_input_require_grads()
    return model


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """A trained reward model (full model or PEFT adapter directory) and its tokenizer, ready to score."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tuneforge.models.loading import quiet_transformers

    quiet_transformers()
    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=torch.float32)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def score_conversations(model: Any, tokenizer: Any, conversations: Sequence[Sequence[dict]],
                        batch_size: int = 16) -> torch.Tensor:
    """Rewards of whole conversations (prompt + response), rendered with the tokenizer's chat template."""
    from tuneforge.data.templates import render_chat

    device = next(model.parameters()).device
    out = []
    for start in range(0, len(conversations), batch_size):
        texts = [render_chat(tokenizer, conv, None) for conv in conversations[start : start + batch_size]]
        enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
        out.append(model(**enc).logits[:, 0].float().cpu())
    return torch.cat(out) if out else torch.zeros(0)
