"""Direct preference optimisation (``method: dpo``): DPO and its variants as a task for the one training loop.

The losses are the pure functions in :mod:`tuneforge.objectives.dpo`; pairs, batching and accumulation are
shared with reward models (:mod:`tuneforge.training.pairs`). The reference model costs no second copy of the
weights: with an adapter it is the base with the adapter switched off; with full fine-tuning its log-probs are
computed once, before training, from a transiently loaded base, and cached next to the token cache
(``dpo.precompute_ref``), so later runs and resumed runs reuse them (``precompute_ref: false`` keeps a frozen
copy instead, as TRL does by default).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tuneforge.config import DPOConfig, Recipe
from tuneforge.data.preference import PairBatch, PairSource
from tuneforge.data.sampler import Plan
from tuneforge.files import atomic_path
from tuneforge.models.adapters import is_peft
from tuneforge.models.loading import model_fingerprint
from tuneforge.models.reference import Reference
from tuneforge.objectives.dpo import dpo_loss, orpo_loss, simpo_loss
from tuneforge.paths import cache_dir
from tuneforge.training.forward import attention_allows_masks, supports_selective_head
from tuneforge.training.pairs import (
    MAX_EVAL_PAIRS,
    PairLogps,
    PairSpec,
    PairsPrepared,
    PairTask,
    completion_logps,
    layouts_agree,
    prepare_pairs,
    split_pairs,
)
from tuneforge.training.precision import autocast

REFERENCE_FREE = ("simpo", "orpo")
REF_CACHE_VERSION = 1

Tables = dict[str, Any]  # {"train": [per source (pairs, 2)], "val": {name: (pairs, 2)}}


@dataclass
class DPOPrepared(PairsPrepared):
    def make_task(self, model: torch.nn.Module, micro_batch_size: int, precision: str, device: torch.device) -> DPOTask:
        """The task; this also sets up (or precomputes) the reference."""
        train, val = self.train_sources, self.val_sources
        spec = PairSpec(
            micro_batch_size=micro_batch_size,
            pad_id=self.tokenizer.pad_token_id,
            precision=precision,
            device=device,
            selective=supports_selective_head(model),
        )
        spec.share_prompt = (
            spec.selective
            and attention_allows_masks(model)
            and layouts_agree(model, lambda b: completion_logps(model, b, True)[0], train, spec.pad_id, device)
        )
        reference, tables = make_reference(self.recipe, model, spec, self.plan, train, val)
        return DPOTask(self.plan, train, val, spec, self.recipe.dpo, reference, tables)


def prepare(recipe: Recipe) -> DPOPrepared:
    inputs, pairs, plan = prepare_pairs(recipe)
    return DPOPrepared(
        recipe,
        inputs.tokenizer,
        inputs.template,
        plan,
        inputs.data_hashes,
        data_info={p.name: p.stats for p in pairs},
        pairs=pairs,
    )


def preference_objective(
    cfg: DPOConfig, policy: PairLogps, ref: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The recipe's DPO-family loss (mean over pairs) from policy log-probs and reference sums ``(chosen, rejected)``.

    Sigmoid and hinge compare summed log-probs; IPO, SimPO and ORPO compare length-averaged ones (ORPO's SFT term
    is the chosen response's per-pair mean token NLL, so it stays exact under any micro-batch split).
    """
    if cfg.loss_type in ("sigmoid", "hinge"):
        assert ref is not None
        return dpo_loss(
            policy.chosen,
            policy.rejected,
            ref[0],
            ref[1],
            beta=cfg.beta,
            loss_type=cfg.loss_type,
            label_smoothing=cfg.label_smoothing,
        )
    chosen_avg, rejected_avg = policy.averaged()
    if cfg.loss_type == "ipo":
        assert ref is not None
        return dpo_loss(
            chosen_avg,
            rejected_avg,
            ref[0] / policy.chosen_tokens.clamp(min=1),
            ref[1] / policy.rejected_tokens.clamp(min=1),
            beta=cfg.beta,
            loss_type="ipo",
        )
    if cfg.loss_type == "simpo":
        return simpo_loss(
            chosen_avg, rejected_avg, beta=cfg.beta, gamma=cfg.simpo_gamma, label_smoothing=cfg.label_smoothing
        )
    return orpo_loss(-chosen_avg.mean(), chosen_avg, rejected_avg, beta=cfg.beta)


def reference_sums(
    reference: Reference, policy: torch.nn.Module, batch: PairBatch, spec: PairSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed reference log-probs (chosen, rejected) of the pairs in `batch`."""
    with reference.use(policy) as model, autocast(spec.precision, spec.device):
        sums, _ = completion_logps(model, batch, spec.selective)
    n = batch.pairs
    return sums[:n].float(), sums[n:].float()


def lookup(
    tables: Sequence[np.ndarray], refs: Sequence[tuple[int, int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Precomputed (chosen, rejected) sums of the pairs ``refs`` = ``(source, pair)``."""
    rows = torch.from_numpy(np.stack([tables[s][i] for s, i in refs]).astype(np.float32)).to(device)
    return rows[:, 0], rows[:, 1]


class DPOTask(PairTask):
    """A step's loss is the sum of its pairs' DPO-family losses (normalised by pair count)."""

    def __init__(
        self,
        plan: Plan,
        sources: list[PairSource],
        val_sources: dict[str, PairSource],
        spec: PairSpec,
        cfg: DPOConfig,
        reference: Reference | None,
        tables: Tables | None = None,
    ) -> None:
        if reference is None and tables is None and cfg.loss_type not in REFERENCE_FREE:
            raise ValueError(f"dpo loss {cfg.loss_type!r} needs a reference")
        super().__init__(plan, sources, val_sources, spec)
        self.cfg = cfg
        free = cfg.loss_type in REFERENCE_FREE
        self.reference = None if free else reference
        self.tables = None if free else tables

    def pair_losses(
        self, model: torch.nn.Module, sources: Sequence[PairSource], refs: list[tuple[int, int]], split: str
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], PairBatch]:
        """Mean loss and metrics of the pairs `refs`; reference sums from the tables when precomputed."""
        s = self.spec
        batch = s.batch(refs, sources)
        with autocast(s.precision, s.device):
            sums, counts = completion_logps(model, batch, s.selective)
        policy = split_pairs(sums.float(), counts)
        ref = None
        if self.tables is not None:
            ref = lookup(self.tables["train"] if split == "train" else [self.tables["val"][split]], refs, s.device)
        elif self.reference is not None:
            ref = reference_sums(self.reference, model, batch, s)
        loss, metrics = preference_objective(self.cfg, policy, ref)
        return loss, metrics, batch

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out loss, pairwise accuracy of the implicit reward (chosen > rejected) and mean reward margin."""
        return self.held_out(model, "rewards/accuracies", "rewards/margins")


# --------------------------------------------------------------------------------------------- reference


def make_reference(
    recipe: Recipe,
    model: torch.nn.Module,
    spec: PairSpec,
    plan: Plan,
    train: list[PairSource],
    val: dict[str, PairSource],
    max_val: int = MAX_EVAL_PAIRS,
) -> tuple[Reference | None, Tables | None]:
    """The reference for the recipe: none (SimPO/ORPO), precomputed tables, the adapter-free base, or a copy."""
    cfg = recipe.dpo
    if cfg.loss_type in REFERENCE_FREE:
        return None, None
    peft = is_peft(model)
    precompute = cfg.precompute_ref if cfg.precompute_ref is not None else not peft
    if not precompute:
        return Reference.for_policy(model, recipe.model, spec.device), None
    # With an adapter the base is the policy with its adapter off (right even when resuming a trained adapter);
    # with full fine-tuning the weights passed in may already be trained (resume), so the base is loaded afresh —
    # and only if some reference log-prob is not in the cache yet.
    base = _Lazy(lambda: Reference.for_policy(model, recipe.model, spec.device))
    fingerprint = model_fingerprint(recipe.model.path)
    needed = [np.unique(plan.refs[plan.refs[:, 0] == s, 1]) for s in range(len(train))]
    use_cache = recipe.data.cache
    tables = {
        "train": [
            reference_table(src, ids, base, model, spec, fingerprint, use_cache) for src, ids in zip(train, needed)
        ],
        "val": {
            name: reference_table(src, np.arange(min(len(src), max_val)), base, model, spec, fingerprint, use_cache)
            for name, src in val.items()
        },
    }
    base.release()
    return None, tables


class _Lazy:
    """Set the reference up only on a cache miss, and let it go as soon as the tables are filled."""

    def __init__(self, make: Callable[[], Reference]) -> None:
        self._make = make
        self._ref: Reference | None = None

    def get(self) -> Reference:
        if self._ref is None:
            self._ref = self._make()
        return self._ref

    def release(self) -> None:
        self._ref = None


def reference_table(
    src: PairSource,
    needed: np.ndarray,
    base: _Lazy,
    policy: torch.nn.Module,
    spec: PairSpec,
    fingerprint: str,
    use_cache: bool,
) -> np.ndarray:
    """``(pairs, 2)`` summed reference log-probs (chosen, rejected); NaN for pairs the run never uses.

    Cached under the token cache as ``reference/<key>.npy``, the key joining the pairs' token-cache key, the base
    weights and the precision; a later run computes only the pairs it needs that are still missing.
    """
    key = hashlib.sha256(
        json.dumps(
            {"v": REF_CACHE_VERSION, "tokens": src.cache_key, "model": fingerprint, "precision": spec.precision},
            sort_keys=True,
        ).encode()
    ).hexdigest()[:24]
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
    reference = base.get()
    order = missing[np.argsort(-src.lengths[missing], kind="stable")]  # similar lengths together: little padding
    for start in range(0, len(order), spec.micro_batch_size):
        ids = [int(i) for i in order[start : start + spec.micro_batch_size]]
        chosen, rejected = reference_sums(reference, policy, spec.batch([(0, i) for i in ids], [src]), spec)
        table[ids, 0] = chosen.cpu().numpy()
        table[ids, 1] = rejected.cpu().numpy()
    if cacheable:
        with atomic_path(path, fsync=False) as tmp, tmp.open("wb") as f:
            np.save(f, table)
    return table
