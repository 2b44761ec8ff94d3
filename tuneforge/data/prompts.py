"""Prompt-only data for online RL (``method: grpo`` / ``ppo``): each record's prompt rendered and tokenized.

A record is ``{"messages": [... ending with a user turn], ...any keys the graders read}``; the prompt is rendered
with the chat template's generation prompt, so the policy's samples are its answers. Records are kept whole
(graders read ``{{item.x}}``). Prompts longer than the budget (``data.max_length - generation.max_new_tokens``)
are refused with their line, dropped or cut from the left (``data.on_overlong``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tuneforge.data.pipeline import SourceExamples, record_key
from tuneforge.data.templates import render_chat
from tuneforge.data.token_cache import TokenizedSource
from tuneforge.errors import DataIssue


@dataclass
class PromptSet:
    """Prompts of one split of one source: the records (graders read their extra keys) and their token ids."""

    name: str
    records: list[dict]
    ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.ids)

    def as_tokenized(self) -> TokenizedSource:
        """The prompts as a token source for the planner (one sample each; nothing is supervised)."""
        lengths = np.array([len(x) for x in self.ids], dtype=np.int64)
        flat = np.concatenate([np.asarray(x, dtype=np.int32) for x in self.ids]) if len(self) else np.zeros(0, np.int32)
        return TokenizedSource(
            self.name,
            flat,
            np.zeros(len(flat), dtype=np.uint8),
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        )


@dataclass
class PromptSource:
    name: str
    weight: float
    train: PromptSet
    val: PromptSet | None
    stats: dict[str, Any]


def encode_prompts(
    src: SourceExamples,
    records: list[dict],
    tokenizer: Any,
    template: str | None,
    budget: int,
    on_overlong: str,
    issues: list[DataIssue],
) -> tuple[PromptSet, int]:
    """Tokenize the prompts of `records`; over-long ones become issues (with their line), are dropped or cut.

    Returns the prompt set and how many were dropped.
    """
    kept: list[dict] = []
    ids: list[list[int]] = []
    dropped = 0
    texts = [render_chat(tokenizer, r["messages"], template, add_generation_prompt=True) for r in records]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    for rec, tokens in zip(records, encoded):
        if len(tokens) > budget:
            if on_overlong == "error":
                issues.append(
                    DataIssue(
                        src.path,
                        src.lines.get(record_key(rec), 0),
                        "messages",
                        f"prompt is {len(tokens)} tokens",
                        f"at most {budget} tokens",
                    )
                )
                continue
            if on_overlong == "drop":
                dropped += 1
                continue
            tokens = tokens[-budget:]  # keep the end: the question and the generation prompt
        kept.append(rec)
        ids.append(list(tokens))
    return PromptSet(src.name, kept, ids), dropped


def prompt_sources(
    loaded: list[SourceExamples], tokenizer: Any, template: str | None, budget: int, on_overlong: str
) -> tuple[list[PromptSource], list[DataIssue]]:
    """Every source's train and validation prompts, and every problem found (the caller raises them together)."""
    sources: list[PromptSource] = []
    issues: list[DataIssue] = []
    for src in loaded:
        train, dropped = encode_prompts(src, src.train, tokenizer, template, budget, on_overlong, issues)
        val, _ = encode_prompts(src, src.val, tokenizer, template, budget, on_overlong, issues)
        if not len(train) and not issues:
            issues.append(
                DataIssue(
                    src.path,
                    0,
                    "",
                    "no prompt fits data.max_length - generation.max_new_tokens",
                    f"prompts of at most {budget} tokens",
                )
            )
        stats = {
            **src.stats,
            "dropped_overlong": dropped,
            "cache_hit": False,
            "prompt_tokens_mean": float(np.mean([len(x) for x in train.ids])) if len(train) else 0.0,
        }
        sources.append(PromptSource(src.name, src.weight, train, val if len(val) else None, stats))
    return sources, issues
