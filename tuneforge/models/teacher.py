"""Distillation teachers: loading them (frozen, eval mode) and checking they can teach a student.

Every error names ``distill.teacher``, the recipe field the path came from.
"""

from __future__ import annotations

from typing import Any

import torch

from tuneforge.config import Recipe
from tuneforge.errors import ModelError
from tuneforge.models.loading import check_model_path, load_frozen, load_tokenizer

FIELD = "distill.teacher"


def check_teacher_path(teacher: str) -> None:
    """Fail before anything heavy loads, naming the recipe field."""
    try:
        check_model_path(teacher)
    except ModelError as e:
        raise ModelError(f"{FIELD}: {e}") from None


def load_teacher_tokenizer(teacher: str, trust_remote_code: bool = False) -> Any:
    try:
        return load_tokenizer(teacher, None, trust_remote_code)
    except ModelError as e:
        raise ModelError(f"{FIELD}: {e}") from None


def load_teacher(recipe: Recipe, device: torch.device) -> torch.nn.Module:
    """The teacher in fp32 on `device`, frozen and in eval mode (no dropout: its targets must not be noisy)."""
    assert recipe.distill is not None
    return load_frozen(
        recipe.distill.teacher,
        device,
        attn_implementation=recipe.model.attn_implementation,
        trust_remote_code=recipe.model.trust_remote_code,
        field=FIELD,
    )


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether every token string has the same id in both tokenizers (sizes alone can agree by chance)."""
    return a.get_vocab() == b.get_vocab()


def head_width(model: Any) -> int:
    """How many token ids the model's head scores (may exceed the tokenizer: heads are often padded)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)
