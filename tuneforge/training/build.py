"""Recipe → data, model and task: the set-up shared by the single-process run and elastic replicas.

:func:`prepare` does everything that needs no model — validating every record, the tokenizer, the token
cache and the plan — so bad input fails before anything heavy loads, and a replacement replica (which
finds the token cache warm) gets to its first step quickly. It asks the method's registry entry for its
family and calls the family's ``prepare``; :func:`load_inputs` is the start every family shares.
:func:`build_model` and ``Prepared.make_task`` finish the job once the device is known.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tuneforge.config import Recipe
from tuneforge.data.pipeline import LoadedSource, load_sources
from tuneforge.errors import RecipeError, TuneforgeError
from tuneforge.methods import METHODS, MethodSpec, method_spec
from tuneforge.models import policy
from tuneforge.models.adapters import check_qlora_supported
from tuneforge.models.chat_templates import resolve_template
from tuneforge.models.loading import check_model_path, load_tokenizer
from tuneforge.training.task import Prepared

FORMAT_HELP = {
    "messages": '{"messages": [...]}',
    "prompt_completion": '{"prompt", "completion"}',
    "text": '{"text"}',
    "preference": '{"prompt", "chosen", "rejected"} or OpenAI\'s DPO {"input", "preferred_output", '
    '"non_preferred_output"}',
    "prompt": '{"messages": [... ending with a user message], ...keys for the graders}',
    "unpaired": '{"prompt", "completion", "label": true|false} or {"messages": [..., assistant], "label": …}',
}

FORMAT_NOUNS = {
    "messages": "chats",
    "prompt_completion": "prompt/completion pairs",
    "text": "plain text",
    "preference": "preference pairs",
    "prompt": "prompts",
    "unpaired": "labelled completions",
}


@dataclass
class Inputs:
    """What every method starts from: its registry entry, validated sources and the tokenizer."""

    spec: MethodSpec
    loaded: Sequence[LoadedSource]  # records in memory, or (SFT / CPT) scanned and spooled
    tokenizer: Any
    template: str | None

    @property
    def data_hashes(self) -> dict[str, str]:
        return {s.name: s.data_hash for s in self.loaded}


def prepare(recipe: Recipe) -> Prepared:
    """Validate all data, then tokenize (through the cache) and plan every step — before any model loads."""
    spec = method_spec(recipe.method)
    prepared: Prepared = spec.load_family().prepare(recipe)
    return prepared


def load_tokenizer_for(recipe: Recipe, needs_template: bool) -> tuple[Any, str | None]:
    name = recipe.model.tokenizer or recipe.model.path
    tokenizer = load_tokenizer(name, recipe.model.chat_template, recipe.model.trust_remote_code)
    template = resolve_template(recipe.model.chat_template) if recipe.model.chat_template else tokenizer.chat_template
    if template is None and needs_template:
        raise TuneforgeError(
            f"{name}: the tokenizer has no chat template; set model.chat_template (e.g. 'chatml') to train on chat data"
        )
    return tokenizer, template


def check_formats(spec: MethodSpec, loaded: Sequence[LoadedSource], formats: tuple[str, ...] | None = None) -> None:
    """Every source holds records the method trains on; otherwise name the file, its format and what is expected."""
    allowed = formats or spec.formats
    for i, src in enumerate(loaded):
        if src.format not in allowed:
            expected = " or ".join(FORMAT_HELP.get(f, f) for f in allowed)
            others = [m.name for m in METHODS.values() if src.format in m.formats]
            hint = (
                (
                    f"; it holds {FORMAT_NOUNS.get(src.format, src.format)}: train them with method: "
                    + " or method: ".join(others)
                )
                if others
                else ""
            )
            raise RecipeError(
                f"data.sources[{i}]: {src.path} holds {src.format} records, but method {spec.name} "
                f"trains on {' / '.join(allowed)} records (expected {expected}){hint}"
            )


def load_inputs(recipe: Recipe, *, loaded: Sequence[LoadedSource] | None = None) -> Inputs:
    """Validate every record of every source, check they fit the method, then the model path and tokenizer.

    ``loaded`` skips reading the sources again: SFT / CPT stream theirs (``data.stream.scan_sources``), distillation
    passes the records its teacher wrote.
    """
    spec = method_spec(recipe.method)
    if loaded is None:
        loaded = load_sources(
            recipe, default_format=spec.default_format, allow_extra="*" if spec.allow_extra_keys else ()
        )
    check_formats(spec, loaded)
    check_model_path(recipe.model.path)
    if recipe.adapter.kind == "qlora":
        check_qlora_supported()
    tokenizer, template = load_tokenizer_for(recipe, any(s.format != "text" for s in loaded))
    return Inputs(spec, loaded, tokenizer, template)


def build_model(recipe: Recipe, device: torch.device) -> torch.nn.Module:
    """The model the recipe trains (see :func:`tuneforge.models.policy.build_model`)."""
    return policy.build_model(recipe, method_spec(recipe.method), device)
