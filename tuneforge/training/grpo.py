"""RL from verifiable rewards (``method: grpo``): groups of sampled completions scored by graders.

``grpo.group_size`` completions per prompt, rewards from graders in OpenAI's reinforcement fine-tuning shapes
(:func:`tuneforge.rewards.graders.load_grader`; a ``score_model`` grader is RLAIF: a judge behind any
OpenAI-compatible endpoint or a local model), group-relative advantages, the clipped objective and the
token-averaging of GRPO / DAPO / Dr. GRPO (:mod:`tuneforge.objectives.grpo`), optional k3 KL to the reference.
Prompts, rollouts and forward passes are shared with PPO (:mod:`tuneforge.training.online`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tuneforge.config import GRPOConfig, Recipe
from tuneforge.data.prompts import PromptSet
from tuneforge.data.sampler import Plan
from tuneforge.errors import RecipeError
from tuneforge.models.reference import Reference
from tuneforge.objectives.grpo import group_advantages, grpo_loss
from tuneforge.rewards.graders import load_grader
from tuneforge.training.online import (
    OnlinePrepared,
    OnlineTask,
    Reduce,
    RolloutSpec,
    StepRollout,
    prepare_prompts,
    sequence_forward,
)
from tuneforge.training.precision import autocast
from tuneforge.training.rollout import Sampling
from tuneforge.training.task import MetricSums, StepOutput

log = logging.getLogger(__name__)


@dataclass
class GRPOPrepared(OnlinePrepared):
    grader: Any = None

    def make_task(
        self, model: torch.nn.Module, micro_batch_size: int, precision: str, device: torch.device
    ) -> GRPOTask:
        cfg = self.recipe.grpo
        assert cfg is not None
        spec = self.rollout_spec(model, micro_batch_size, precision, device, group=cfg.group_size)
        reference = Reference.for_policy(model, self.recipe.model, device) if cfg.beta > 0 else None
        return GRPOTask(self.plan, self.train_sets, self.val_sets, spec, self.tokenizer, reference, self.grader, cfg)


def prepare(recipe: Recipe) -> GRPOPrepared:
    """Validate the grader first (config mistakes fail before any data or model loads), then the prompts."""
    cfg = recipe.grpo
    assert cfg is not None
    grader = load_recipe_grader(cfg)
    inputs, sources, plan = prepare_prompts(
        recipe, updates_per_batch=cfg.num_iterations, reuse_field="grpo.num_iterations"
    )
    return GRPOPrepared(
        recipe,
        inputs.tokenizer,
        inputs.template,
        plan,
        inputs.data_hashes,
        data_info={s.name: s.stats for s in sources},
        sources=sources,
        updates_per_batch=cfg.num_iterations,
        grader=grader,
    )


def load_recipe_grader(cfg: GRPOConfig) -> Any:
    """The recipe's grader, validated now; a judge's API key comes from the environment variable named."""
    api_key = None
    if cfg.judge_api_key_env:
        api_key = os.environ.get(cfg.judge_api_key_env)
        if not api_key:
            raise RecipeError(f"grpo.judge_api_key_env: the environment variable {cfg.judge_api_key_env} is not set")
    origin = cfg.graders if isinstance(cfg.graders, str) else "grpo.graders"
    return load_grader(cfg.graders, base_url=cfg.judge_base_url, api_key=api_key, origin=origin)


class GRPOTask(OnlineTask):
    """Group sampling, grader rewards, group-relative advantages and the clipped GRPO objective."""

    def __init__(
        self,
        plan: Plan,
        sources: list[PromptSet],
        val_sources: dict[str, PromptSet],
        spec: RolloutSpec,
        tokenizer: Any,
        reference: Reference | None,
        grader: Any,
        cfg: Any,
    ) -> None:
        super().__init__(plan, sources, val_sources, spec, tokenizer, reference)
        self.grader = grader
        self.cfg = cfg
        self.group_size = cfg.group_size

    def score(self, records: Sequence[dict], texts: Sequence[str]) -> tuple[torch.Tensor, int]:
        """Grader rewards and the number of (sample, item) pairs that failed (scored 0, error logged)."""
        results = self.grader.evaluate_batch([{"output_text": t} for t in texts], list(records))
        errors = [r.error for r in results if r.error]
        if errors:
            log.warning(
                "graders: %d of %d samples failed and scored 0; first error: %s", len(errors), len(results), errors[0]
            )
        return torch.tensor([r.score for r in results], dtype=torch.float32), len(errors)

    def make_rollout(
        self, model: torch.nn.Module, batch_index: int, rows: tuple[int, int], share: tuple[int, int], reduce: Reduce
    ) -> StepRollout:
        """Sample and grade the share's groups (and their log-probs), gather the step, then group advantages."""
        g, device = self.group_size, self.spec.device
        refs = self.refs(range(*share))
        prompts = [self.sources[s].ids[i] for s, i in refs]
        records = [self.sources[s].records[i] for s, i in refs for _ in range(g)]
        comp, texts = self.generate(model, prompts, g, self.spec.sampling, self.sampling_generators(batch_index, share))
        rewards, errors = self.score(records, texts)
        local = StepRollout(share, [p for p in prompts for _ in range(g)], comp, torch.zeros(0))
        self.rollout = local  # forward_rows reads the share's sequences
        every = range(len(local.prompt_ids))
        parts = {"rewards": rewards.to(device)}
        if self.reference is not None:
            parts["ref_logps"] = torch.zeros(comp.tokens.shape, device=device)
            for idx, batch, res in self.forward_rows(model, every, reference=True):
                parts["ref_logps"][idx, : batch.width] = res
        if self.spec.updates_per_batch > 1:  # later updates on this batch are off-policy: keep the sampler's log-probs
            parts["old_logps"] = torch.zeros(comp.tokens.shape, device=device)
            for idx, batch, (res, _) in self.forward_rows(model, every):
                parts["old_logps"][idx, : batch.width] = res
        errors_total = reduce(torch.tensor([float(errors)], device=device))
        comp, prompt_ids, full = self.whole_step(rows, share, reduce, comp, **parts)
        rewards = full["rewards"].float().cpu()
        groups = rewards.reshape(-1, g)
        ro = StepRollout(
            rows,
            prompt_ids,
            comp,
            group_advantages(rewards, g, scale=self.cfg.scale_rewards).to(device),
            ref_logps=full.get("ref_logps"),
            old_logps=full.get("old_logps"),
        )
        ro.metrics = {
            "reward": float(rewards.mean()),
            "reward_std": float(groups.std(dim=1).mean()),
            "frac_groups_no_signal": float((groups.std(dim=1) == 0).float().mean()),
            "completion_length": float(comp.lengths.float().mean()),
            "completions_finished": float(comp.finished.float().mean()),
            "grader_errors": float(errors_total.sum()),
        }
        return ro

    def loss_tokens(self, indices: Sequence[int]) -> int:
        """The step's divisor: sequences (grpo), completion tokens (dapo, bnpo) or sequences × budget (dr_grpo)."""
        seqs = self.sequences(indices)
        if self.cfg.loss_type == "grpo":
            return len(seqs)
        if self.cfg.loss_type == "dr_grpo":
            return len(seqs) * self.spec.sampling.max_new_tokens
        assert self.rollout is not None
        return int(self.rollout.completions.mask[seqs].sum())

    def forward_backward(self, model: torch.nn.Module, indices: Sequence[int], scale: float) -> StepOutput:
        ro = self.rollout
        assert ro is not None
        s, cfg = self.spec, self.cfg
        seqs = self.sequences(indices)
        loss_acc = torch.zeros((), device=s.device)
        fed = 0
        stats = MetricSums()
        for i in range(0, len(seqs), s.micro_batch_size):
            idx = seqs[i : i + s.micro_batch_size]
            batch = self.batch(idx)
            mask = self.trim(ro.completions.mask, idx, batch)
            with autocast(s.precision, s.device):
                logps, _ = sequence_forward(model, batch, selective=s.selective, temperature=s.sampling.temperature)
            ref = self.trim(ro.ref_logps, idx, batch) if ro.ref_logps is not None else None
            old = self.trim(ro.old_logps, idx, batch) if ro.old_logps is not None else None
            common = dict(clip_eps_low=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high, beta=cfg.beta)
            if cfg.loss_type == "grpo":  # Σ over sequences of each sequence's token mean
                loss, metrics = grpo_loss(logps, old, ref, ro.advantages[idx], mask, loss_type="grpo", **common)
                loss_sum = loss * len(idx)
            else:  # Σ over tokens; the divisor is the step's (loss_tokens)
                loss_sum, metrics = grpo_loss(
                    logps, old, ref, ro.advantages[idx], mask, loss_type="dapo", num_items_in_batch=1, **common
                )
            (loss_sum * scale).backward()
            loss_acc += loss_sum.detach()
            stats.add_means(metrics, mask.sum())
            fed += int(batch.input_ids.numel())
        self.rollout_metrics(stats)
        return StepOutput(loss_acc, fed, stats.metrics)

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
