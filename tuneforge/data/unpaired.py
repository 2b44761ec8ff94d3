"""Unpaired, labelled completions (KTO) → token ids, completion masks and labels, through the token cache.

A canonical record is ``{"prompt": [...], "completion": [...assistant messages], "label": bool}`` (see
``formats.to_canonical``); it is rendered as one conversation with the same chat template as SFT, and only the
completion's tokens carry loss (assistant turns inside the prompt are context: weight 0). The labels are stored
beside the token arrays in the same cache entry, aligned with the examples that were kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tuneforge.data import token_cache
from tuneforge.data.pipeline import record_key
from tuneforge.data.sanitize import content_hash
from tuneforge.data.templates import encode_chats
from tuneforge.data.token_cache import TokenizedSource
from tuneforge.errors import DataError, DataIssue
from tuneforge.files import atomic_path
from tuneforge.paths import cache_dir

LABELS_FILE = "labels.npy"


@dataclass
class LabelledSource:
    """Tokenized examples of one split of one source and whether each is desirable."""

    name: str
    seqs: TokenizedSource
    labels: np.ndarray  # (examples,) bool

    def __len__(self) -> int:
        return len(self.seqs)

    def supervised_counts(self) -> np.ndarray:
        """One loss unit per example: KTO's loss is a mean over examples, whatever their lengths."""
        return np.ones(len(self), dtype=np.int64)

    @property
    def lengths(self) -> np.ndarray:
        return self.seqs.lengths

    def split(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Example `i` as (prompt ids, completion ids, completion mask): the completion starts at its first target."""
        ids, mask = self.seqs.example(i)
        start = int(np.argmax(mask > 0))
        return np.asarray(ids[:start]), np.asarray(ids[start:]), np.asarray(mask[start:])


@dataclass
class LabelledTokens:
    name: str
    weight: float
    train: LabelledSource
    val: LabelledSource | None
    stats: dict[str, Any] = field(default_factory=dict)


def unpair(examples: Sequence[dict]) -> list[dict]:
    """Preference pairs as unpaired examples (as TRL does for KTO): the chosen answer desirable, the rejected not."""
    out = []
    for ex in examples:
        extra = {"tools": ex["tools"]} if "tools" in ex else {}
        out.append({"prompt": ex["prompt"], "completion": ex["chosen"], "label": True, **extra})
        out.append({"prompt": ex["prompt"], "completion": ex["rejected"], "label": False, **extra})
    return out


def _conversation(example: dict) -> list[dict]:
    prompt = [dict(m, weight=0) if m.get("role") == "assistant" else dict(m) for m in example["prompt"]]
    return prompt + [dict(m, weight=1) for m in example["completion"]]


def tokenize_labelled_split(
    name: str,
    examples: list[dict],
    *,
    path: str,
    lines: dict[str, int],
    tokenizer: Any,
    template: str | None,
    max_length: int,
    on_overlong: str,
    use_cache: bool,
    split_name: str,
) -> tuple[LabelledSource, int]:
    """One split through the token cache; returns the examples and how many were dropped."""
    key = token_cache.cache_key(
        data_hash=content_hash(examples) if examples else "empty",
        tokenizer_hash=token_cache.tokenizer_fingerprint(tokenizer),
        template=template,
        max_length=max_length,
        kind="unpaired",
        loss_on="completion",
        on_overlong=on_overlong,
    )
    root = cache_dir("tokens")
    if use_cache:
        hit = token_cache.load(root, name, key)
        if hit is not None and (root / key / LABELS_FILE).exists():
            labels = np.load(root / key / LABELS_FILE)
            return LabelledSource(name, hit, labels), len(examples) - len(hit)
    encoded = encode_chats(tokenizer, [_conversation(ex) for ex in examples], template, "assistant")
    kept, labels, issues, dropped = [], [], [], 0
    for ex, (ids, mask) in zip(examples, encoded):
        if len(ids) > max_length:
            if on_overlong == "error":
                issues.append(
                    DataIssue(
                        path,
                        lines.get(record_key(ex), 0),
                        "completion",
                        f"too long after tokenization: prompt + completion is {len(ids)} tokens",
                        f"at most data.max_length={max_length}, or set data.on_overlong: truncate|drop",
                    )
                )
                continue
            if on_overlong == "drop":
                dropped += 1
                continue
            ids, mask = ids[:max_length], mask[:max_length]
        if int(mask[1:].sum()) == 0:  # the prompt filled the budget: no completion token left to score
            dropped += 1
            continue
        kept.append((ids, mask))
        labels.append(bool(ex["label"]))
    if issues:
        raise DataError(sorted(issues, key=lambda x: x.line), f"{path}: {len(issues)} example(s) too long")
    if not kept:
        raise DataError(
            [
                DataIssue(
                    path,
                    0,
                    "",
                    f"no {split_name} examples left with a completion to score",
                    f"prompts shorter than data.max_length={max_length}",
                )
            ]
        )
    seqs = token_cache.pack_arrays(name, kept)
    seqs.cache_key = key
    label_array = np.asarray(labels, dtype=bool)
    if use_cache:
        seqs = token_cache.store(root, key, seqs)
        with atomic_path(root / key / LABELS_FILE, fsync=False) as tmp, tmp.open("wb") as f:
            np.save(f, label_array)
    return LabelledSource(name, seqs, label_array), dropped


def tokenize_labelled_sources(
    loaded: Sequence[Any], tokenizer: Any, template: str | None, recipe: Any
) -> list[LabelledTokens]:
    """Tokenize every loaded source of unpaired records and its validation split."""
    out = []
    d = recipe.data
    for src in loaded:
        train_ex, val_ex, lines = src.train, src.val, src.lines
        if src.format == "preference":  # each pair becomes two labelled examples; errors still name the pair's line
            train_ex, val_ex = unpair(src.train), unpair(src.val)
            lines = {
                record_key(u): src.lines.get(record_key(p), 0) for p in [*src.train, *src.val] for u in unpair([p])
            }
        common = dict(
            path=src.path,
            lines=lines,
            tokenizer=tokenizer,
            template=template,
            max_length=d.max_length,
            on_overlong=d.on_overlong,
            use_cache=d.cache,
        )
        train, dropped = tokenize_labelled_split(src.name, train_ex, split_name="training", **common)
        val = tokenize_labelled_split(src.name, val_ex, split_name="validation", **common)[0] if val_ex else None
        stats = dict(
            src.stats,
            examples=len(train),
            desirable=int(train.labels.sum()),
            undesirable=int((~train.labels).sum()),
            dropped=dropped,
            cache_hit=train.seqs.cache_hit,
            train_tokens=len(train.seqs.ids),
        )
        out.append(LabelledTokens(src.name, src.weight, train, val, stats))
    return out
