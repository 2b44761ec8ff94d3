"""RLHF with PPO (``method: ppo``): a reward model's scores, KL to the reference, GAE on a value head.

One completion per prompt scored by a reward model trained with ``method: reward``, a per-token KL penalty to
the reference, GAE over a value head that shares the policy's trunk (:mod:`tuneforge.models.value_head`),
whitened advantages and the clipped policy and value losses (:mod:`tuneforge.objectives.ppo`). Prompts,
rollouts and forward passes are shared with GRPO (:mod:`tuneforge.training.online`). The result is a plain
policy; the value head is saved next to it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuneforge.config import Recipe
from tuneforge.data.prompts import PromptSet
from tuneforge.data.sampler import Plan
from tuneforge.errors import RecipeError
from tuneforge.models.reference import Reference
from tuneforge.models.reward import load_reward_model, score_conversations
from tuneforge.models.value_head import save_value_head, value_head_of
from tuneforge.objectives.logprobs import masked_mean
from tuneforge.objectives.ppo import gae, kl_penalized_rewards, masked_whiten, ppo_policy_loss, ppo_value_loss
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


@dataclass
class PPOPrepared(OnlinePrepared):
    def make_task(self, model: torch.nn.Module, micro_batch_size: int, precision: str, device: torch.device) -> PPOTask:
        cfg = self.recipe.ppo
        assert cfg is not None
        spec = self.rollout_spec(model, micro_batch_size, precision, device)
        reward_model, reward_tokenizer = load_reward_model(cfg.reward_model, device)
        return PPOTask(
            self.plan,
            self.train_sets,
            self.val_sets,
            spec,
            self.tokenizer,
            Reference.for_policy(model, self.recipe.model, device),
            reward_model,
            reward_tokenizer,
            cfg,
        )

    def finish(self, model: torch.nn.Module, run_dir: Any) -> None:
        """The result is a plain policy: the value head is detached and kept next to it."""
        save_value_head(model, Path(run_dir))


def prepare(recipe: Recipe) -> PPOPrepared:
    cfg = recipe.ppo
    assert cfg is not None
    if not os.path.isdir(os.path.expanduser(cfg.reward_model)):
        raise RecipeError(
            f"ppo.reward_model: {cfg.reward_model} is not a directory (expected the model or "
            "adapter directory a `method: reward` run saved)"
        )
    inputs, sources, plan = prepare_prompts(recipe, updates_per_batch=cfg.epochs, reuse_field="ppo.epochs")
    return PPOPrepared(
        recipe,
        inputs.tokenizer,
        inputs.template,
        plan,
        inputs.data_hashes,
        data_info={s.name: s.stats for s in sources},
        sources=sources,
        updates_per_batch=cfg.epochs,
    )


class PPOTask(OnlineTask):
    """RLHF: reward-model scores, a KL-penalised per-token reward, GAE on a value head, clipped PPO losses."""

    def __init__(
        self,
        plan: Plan,
        sources: list[PromptSet],
        val_sources: dict[str, PromptSet],
        spec: RolloutSpec,
        tokenizer: Any,
        reference: Reference | None,
        reward_model: Any,
        reward_tokenizer: Any,
        cfg: Any,
    ) -> None:
        super().__init__(plan, sources, val_sources, spec, tokenizer, reference)
        self.reward_model = reward_model
        self.reward_tokenizer = reward_tokenizer
        self.cfg = cfg

    def scores(self, records: Sequence[dict], texts: Sequence[str], finished: torch.Tensor | None) -> torch.Tensor:
        convs = [[*r["messages"], {"role": "assistant", "content": t}] for r, t in zip(records, texts)]
        scores = score_conversations(self.reward_model, self.reward_tokenizer, convs).float()
        if self.cfg.missing_eos_penalty is not None and finished is not None:
            scores = scores - self.cfg.missing_eos_penalty * (~finished.cpu()).float()
        return scores

    def make_rollout(
        self, model: torch.nn.Module, batch_index: int, rows: tuple[int, int], share: tuple[int, int], reduce: Reduce
    ) -> StepRollout:
        """Sample and score the share (log-probs, values, reference log-probs), gather the step, then KL-penalised
        rewards, GAE and whitening over the whole step."""
        cfg, s = self.cfg, self.spec
        refs = self.refs(range(*share))
        prompts = [self.sources[a].ids[i] for a, i in refs]
        records = [self.sources[a].records[i] for a, i in refs]
        comp, texts = self.generate(model, prompts, 1, s.sampling, self.sampling_generators(batch_index, share))
        score = self.scores(records, texts, comp.finished).to(s.device)
        self.rollout = StepRollout(share, prompts, comp, torch.zeros(0))  # forward_rows reads the share's sequences
        shape = comp.tokens.shape
        parts = {name: torch.zeros(shape, device=s.device) for name in ("old_logps", "old_values", "ref_logps")}
        every = range(len(prompts))
        for idx, batch, (lp, v) in self.forward_rows(model, every, value_head=value_head_of(model)):
            parts["old_logps"][idx, : batch.width] = lp
            parts["old_values"][idx, : batch.width] = v
        for idx, batch, lp in self.forward_rows(model, every, reference=True):
            parts["ref_logps"][idx, : batch.width] = lp
        comp, prompt_ids, full = self.whole_step(rows, share, reduce, comp, score=score, **parts)
        old_logps, old_values, ref_logps, score = (
            full["old_logps"],
            full["old_values"],
            full["ref_logps"],
            full["score"],
        )
        mask = comp.mask.to(s.device)
        rewards = kl_penalized_rewards(score, old_logps, ref_logps, mask, cfg.kl_coef)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        ro = StepRollout(
            rows,
            prompt_ids,
            comp,
            masked_whiten(advantages, mask) * mask,  # over the whole step, independent of the split
            old_logps=old_logps,
            ref_logps=ref_logps,
            old_values=old_values,
            returns=returns,
        )
        kl = masked_mean(old_logps - ref_logps, mask)
        ro.metrics = {
            "score": float(score.mean()),
            "kl": float(kl),
            "completion_length": float(comp.lengths.float().mean()),
            "completions_finished": float(comp.finished.float().mean()),
            "non_score_reward": float(-cfg.kl_coef * (old_logps - ref_logps).mul(mask).sum(-1).mean()),
        }
        return ro

    def loss_tokens(self, indices: Sequence[int]) -> int:
        assert self.rollout is not None
        return int(self.rollout.completions.mask[self.sequences(indices)].sum())

    def forward_backward(self, model: torch.nn.Module, indices: Sequence[int], scale: float) -> StepOutput:
        ro = self.rollout
        assert ro is not None and ro.old_logps is not None and ro.old_values is not None and ro.returns is not None
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
                logps, values = sequence_forward(
                    model,
                    batch,
                    selective=s.selective,
                    temperature=s.sampling.temperature,
                    value_head=value_head_of(model),
                )
            assert values is not None
            pg, pg_stats = ppo_policy_loss(
                logps, self.trim(ro.old_logps, idx, batch), self.trim(ro.advantages, idx, batch), mask, cfg.clip_eps
            )
            vf, vf_stats = ppo_value_loss(
                values, self.trim(ro.old_values, idx, batch), self.trim(ro.returns, idx, batch), mask, cfg.value_clip
            )
            loss_sum = (pg + cfg.vf_coef * vf) * mask.sum()  # token means → token sums; the step divides
            (loss_sum * scale).backward()
            loss_acc += loss_sum.detach()
            stats.add_means({**pg_stats, **vf_stats, "value_loss": vf.detach()}, mask.sum())
            fed += int(batch.input_ids.numel())
        self.rollout_metrics(stats)
        return StepOutput(loss_acc, fed, stats.metrics)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Mean reward-model score of greedy completions on held-out prompts."""
        greedy = Sampling(self.spec.sampling.max_new_tokens, greedy=True)
        out: dict[str, float] = {}
        total, count = 0.0, 0
        for name, ps, n in self.held_out(self.cfg.eval_prompts):
            _comp, texts = self.generate(model, ps.ids[:n], 1, greedy, None)
            scores = self.scores(ps.records[:n], texts, None)
            out[f"val/{name}_score"] = float(scores.mean())
            total += float(scores.sum())
            count += n
        if count:
            out["val/score"] = total / count
        model.train()
        return out
