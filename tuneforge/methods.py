"""The method registry: one entry per training method, the only place that knows what a method is.

Everything the rest of tuneforge used to guess from ``recipe.method`` strings is declared here — which record
formats a method reads, which recipe section it needs, how its model is built, how many sequences one sample puts
through the model (the planner's budget), whether it runs on elastic replicas, which adapters it can train — and
each entry names its *family*: the module that prepares its data and builds its task
(``prepare(recipe) -> Prepared``, see :mod:`tuneforge.training.task`). The recipe schema, the planner, the
train entry point, the elastic engine and the CLI read this table; nothing outside it and a method's own
files branches on a method's name.

Adding a method is: an entry here, its pure objective in ``objectives/``, its task module in ``training/``, its
record format in ``data/formats.py`` (if new), a recipe and tests.

This module sits at the bottom of the import graph (the recipe schema reads it), so it imports nothing from
tuneforge at module level; families are named by module path and imported when a run prepares.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from tuneforge.config import Recipe

ADAPTER_KINDS = ("lora", "dora", "qlora", "prompt_tuning", "p_tuning", "prefix_tuning", "full")
PROMPT_LEARNING = ("prompt_tuning", "p_tuning", "prefix_tuning")  # virtual tokens, no per-layer weights
SFT_FORMATS = ("messages", "prompt_completion", "text")

ModelKind = Literal["causal_lm", "sequence_classifier"]


@dataclass(frozen=True)
class MethodSpec:
    """What one method is, declared once."""

    name: str
    summary: str
    family: str  # module with ``prepare(recipe) -> Prepared``
    formats: tuple[str, ...]  # record formats it trains on (``data.formats``)
    default_format: str | None = None  # what ``format: auto`` means for it (None: detect from the records)
    allow_extra_keys: bool = False  # records may carry any other keys (graders read them)
    section: str | None = None  # recipe section it needs (``grpo:`` …), validated to be present
    section_example: str = ""
    model: ModelKind = "causal_lm"
    value_head: bool = False  # a scalar value head on the policy's trunk, trained with it
    loss_on_all: bool = False  # every token of every record is supervised (continued pre-training)
    prompt_learning: bool = True  # whether prompt / P- / prefix tuning adapters make sense for it
    elastic: bool = True  # runs on torchft replicas (``--replicas``)
    sample: str = "sequence"  # what ``train.global_batch_size`` counts: sequence, pair, example, prompt
    sequences: Callable[[Recipe], int] = lambda recipe: 1  # sequences one sample puts through the model
    artifacts: tuple[str, ...] = ()  # files the run saves next to the model, besides it
    # What the planner's memory and time model needs to know (tuneforge.planning):
    reference: Callable[[Recipe], bool] = lambda recipe: False  # a reference forward each step (a frozen copy
    # of the base in memory for full fine-tuning; the adapter switched off otherwise)
    frozen_models: Callable[[Recipe], tuple[tuple[str, bool], ...]] = lambda recipe: ()  # other frozen models held
    # during training: (path, is a sequence classifier)
    generates: bool = False  # samples completions with a KV cache before each step (online methods)
    lr_scale: float = 1.0  # its learning rate relative to supervised fine-tuning's (``train.lr: auto``)

    def sequences_per_sample(self, recipe: Recipe) -> int:
        """How many ``data.max_length`` sequences one sample costs (the planner's micro-batch budget)."""
        return self.sequences(recipe)

    def load_family(self) -> Any:
        return importlib.import_module(self.family)


def _group(recipe: Recipe) -> int:
    return recipe.grpo.group_size if recipe.grpo is not None else 1


def _dpo_reference(recipe: Recipe) -> bool:
    """DPO's reference runs each step unless the loss is reference-free or its log-probs were precomputed."""
    precompute = recipe.dpo.precompute_ref if recipe.dpo.precompute_ref is not None else recipe.adapter.kind == "full"
    return recipe.dpo.loss_type not in ("simpo", "orpo") and not precompute


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec(
            "sft",
            "supervised fine-tuning on chats, prompt/completion pairs or text",
            "tuneforge.training.sft_task",
            SFT_FORMATS,
        ),
        MethodSpec(
            "cpt",
            "continued pre-training: every token is learned",
            "tuneforge.training.sft_task",
            SFT_FORMATS,
            loss_on_all=True,
        ),
        MethodSpec(
            "dpo",
            "direct preference optimisation and variants (ipo, hinge, simpo, orpo) on preference pairs",
            "tuneforge.training.dpo",
            ("preference",),
            section="dpo",
            sample="pair",
            sequences=lambda r: 2,
            reference=_dpo_reference,
            lr_scale=0.1,  # Tülu 3 (Lambert et al. 2024): SFT 5e-6, DPO 5e-7 for the 8B model
        ),
        MethodSpec(
            "kto",
            "Kahneman–Tversky optimisation on unpaired thumbs-up / thumbs-down examples",
            "tuneforge.training.kto",
            ("unpaired", "preference"),
            section="kto",
            sample="example",
            reference=lambda r: True,
            lr_scale=0.1,  # as DPO (Ethayarajh et al. 2024 use DPO's settings)
        ),
        MethodSpec(
            "reward",
            "a Bradley–Terry reward model (scalar head) on preference pairs",
            "tuneforge.training.reward",
            ("preference",),
            section="reward",
            model="sequence_classifier",
            prompt_learning=False,
            sample="pair",
            sequences=lambda r: 2,
        ),
        MethodSpec(
            "grpo",
            "RL from verifiable rewards: groups of sampled answers scored by graders",
            "tuneforge.training.grpo",
            ("prompt",),
            default_format="prompt",
            allow_extra_keys=True,
            section="grpo",
            section_example="graders: grader.json",
            sample="prompt",
            sequences=_group,
            reference=lambda r: r.grpo is not None and r.grpo.beta > 0,
            generates=True,
            lr_scale=0.1,  # RL on a policy that already answers: steps ~10× smaller than SFT's (tinker's RL recipes)
        ),
        MethodSpec(
            "ppo",
            "RLHF: PPO against a reward model, with a value head and KL to the reference",
            "tuneforge.training.ppo",
            ("prompt",),
            default_format="prompt",
            allow_extra_keys=True,
            section="ppo",
            section_example="reward_model: runs/rm/model",
            value_head=True,
            prompt_learning=False,
            sample="prompt",
            artifacts=("value_head.safetensors",),
            reference=lambda r: True,
            frozen_models=lambda r: ((r.ppo.reward_model, True),) if r.ppo is not None else (),
            generates=True,
            lr_scale=0.1,
        ),
        MethodSpec(
            "distill",
            "knowledge distillation from a teacher (logits, or the teacher's answers)",
            "tuneforge.training.distill",
            (*SFT_FORMATS, "prompt"),
            section="distill",
            section_example="teacher: path/to/teacher",
            frozen_models=lambda r: ((r.distill.teacher, False),) if r.distill and r.distill.mode != "sequence" else (),
        ),
    )
}
METHOD_NAMES = tuple(METHODS)


def method_spec(name: str) -> MethodSpec:
    """The registry entry of `name`, or an error that names the valid methods."""
    from tuneforge.errors import RecipeError, suggest

    try:
        return METHODS[name]
    except KeyError:
        raise RecipeError(f"method: unknown method {name!r}{suggest(name, METHOD_NAMES, list_all=True)}") from None
