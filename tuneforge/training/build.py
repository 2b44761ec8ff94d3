"""Recipe → data, model and task: the set-up shared by the single-process run and elastic replicas.

:func:`prepare` does everything that needs no model — validating every record, the tokenizer, the token
cache and the plan — so bad input fails before anything heavy loads, and a replacement replica (which
finds the token cache warm) gets to its first step quickly. :func:`build_model` and
:meth:`Prepared.make_task` finish the job once the device is known.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tuneforge.config import ONLINE_METHODS, PREFERENCE_METHODS, Recipe
from tuneforge.errors import TuneforgeError

PROMPT_LEARNING = ("prompt_tuning", "p_tuning", "prefix_tuning")


@dataclass
class Prepared:
    """Validated, tokenized data and its plan for one recipe (no model yet)."""

    recipe: Recipe
    tokenizer: Any
    template: str | None
    tokens: list[Any]  # SourceTokens
    plan: Any  # Plan
    packing: bool
    data_hashes: dict[str, str]
    data_info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return self.plan.num_steps

    def mix_dict(self) -> dict[str, Any]:
        m = self.plan.mix
        return {"names": m.names, "target": m.target, "realised": m.realised(),
                "realised_tokens": m.realised("tokens"), "tokens": m.tokens, "examples": m.examples,
                "passes": m.passes, "mix_by": m.mix_by}

    def mix_metrics(self) -> dict[str, float]:
        return self.plan.mix.as_metrics()

    def mix_summary(self) -> str:
        return self.plan.mix.summary()

    def make_task(self, model: torch.nn.Module, micro_batch_size: int, precision: str, device: torch.device) -> Any:
        from tuneforge.training.forward import supports_selective_head
        from tuneforge.training.sft_task import BatchShape, SFTTask

        shape = BatchShape(micro_batch_size=micro_batch_size, max_length=self.recipe.data.max_length,
                           packing=self.packing, pad_id=self.tokenizer.pad_token_id, precision=precision,
                           device=device, selective_head=supports_selective_head(model))
        val = {t.name: t.val for t in self.tokens if t.val is not None}
        return SFTTask(self.plan, [t.train for t in self.tokens], val, shape)


def load_tokenizer_for(recipe: Recipe, needs_template: bool) -> tuple[Any, str | None]:
    from tuneforge.models.chat_templates import resolve_template
    from tuneforge.models.loading import load_tokenizer

    name = recipe.model.tokenizer or recipe.model.path
    tokenizer = load_tokenizer(name, recipe.model.chat_template, recipe.model.trust_remote_code)
    template = resolve_template(recipe.model.chat_template) if recipe.model.chat_template else tokenizer.chat_template
    if template is None and needs_template:
        raise TuneforgeError(f"{name}: the tokenizer has no chat template; set model.chat_template "
                             "(e.g. 'chatml') to train on chat data")
    return tokenizer, template


def prepare(recipe: Recipe) -> Prepared:
    """Validate all data, then tokenize (through the cache) and plan every step — before any model loads."""
    if recipe.method in PREFERENCE_METHODS:  # pairs, not sequences: same interface, own tokenization and task
        from tuneforge.training.preference import prepare_preference

        return prepare_preference(recipe)  # type: ignore[return-value]
    if recipe.method in ONLINE_METHODS:  # prompts in, the policy's own samples scored by graders / a reward model
        from tuneforge.training.online import prepare_online

        return prepare_online(recipe)  # type: ignore[return-value]
    if recipe.method == "distill":  # SFT-shaped data, a teacher's distributions (or answers) as the target
        from tuneforge.training.distill import prepare_distill

        return prepare_distill(recipe)  # type: ignore[return-value]
    return prepare_sft(recipe)


def prepare_sft(recipe: Recipe, loaded: list[Any] | None = None) -> Prepared:
    """SFT / CPT data: every record checked, tokenized through the cache and planned into packed rows.

    ``loaded`` (from ``data.pipeline.load_sources``) skips reading the sources again — distillation passes
    records its teacher wrote.
    """
    from tuneforge.data.pipeline import load_sources, tokenize_sources
    from tuneforge.data.sampler import build_plan
    from tuneforge.models.adapters import check_qlora_supported
    from tuneforge.models.loading import check_model_path

    if loaded is None:
        loaded = load_sources(recipe)  # every record of every source is checked first
    for src in loaded:
        if src.format == "preference":
            raise TuneforgeError(f"data.sources: {src.path} holds preference pairs; train them with method: dpo "
                                 f"or method: reward (this recipe has method: {recipe.method})")
    check_model_path(recipe.model.path)
    if recipe.adapter.kind == "qlora":
        check_qlora_supported()
    tokenizer, template = load_tokenizer_for(recipe, any(s.format != "text" for s in loaded))
    tokens = tokenize_sources(loaded, tokenizer, template, recipe)
    packing = recipe.data.packing and recipe.adapter.kind not in PROMPT_LEARNING  # virtual tokens are per row
    plan = build_plan([t.train for t in tokens], [t.weight for t in tokens], mix_by=recipe.data.mix_by,
                      seed=recipe.train.seed, max_length=recipe.data.max_length, packing=packing,
                      global_batch_size=recipe.train.global_batch_size, epochs=recipe.train.epochs,
                      max_steps=recipe.train.max_steps)
    return Prepared(recipe, tokenizer, template, tokens, plan, packing,
                    data_hashes={s.name: s.data_hash for s in loaded}, data_info={t.name: t.stats for t in tokens})


def build_model(recipe: Recipe, device: torch.device) -> torch.nn.Module:
    """The base model in fp32 on `device`, wrapped with the recipe's adapter; seeded so replicas agree."""
    if recipe.method == "reward":  # a scalar head instead of the LM head
        from tuneforge.training.preference import build_reward_model

        return build_reward_model(recipe, device)
    from tuneforge.models.adapters import apply_adapter, is_peft
    from tuneforge.models.loading import load_model

    torch.manual_seed(recipe.train.seed)
    model = load_model(recipe.model.path, dtype=torch.float32, device=device,
                       attn_implementation=recipe.model.attn_implementation,
                       trust_remote_code=recipe.model.trust_remote_code)
    model = apply_adapter(model, recipe.adapter)
    if recipe.method == "ppo":  # the value head shares the policy's trunk and trains with it
        from tuneforge.training.online import attach_value_head

        attach_value_head(model)
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if is_peft(model):
            model.enable_input_require_grads()
    return model
