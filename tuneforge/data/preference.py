"""Preference pairs → token ids and completion masks, through the token cache.

A canonical preference record is ``{"prompt": [...], "chosen": [...], "rejected": [...]}`` (see
``formats.to_canonical``). Each pair becomes two sequences, ``prompt + chosen`` and ``prompt + rejected``,
rendered with the same chat template as SFT. Only the response's tokens carry loss: assistant turns inside the
prompt (multi-turn context) are rendered but masked, because a preference says nothing about them.

Both sequences of all pairs live in one :class:`~tuneforge.data.token_cache.TokenizedSource`, interleaved
(example ``2i`` is pair ``i``'s chosen side, ``2i + 1`` its rejected side), so the token cache, the memory map and
``batching.collate`` work unchanged. :class:`PairSource` is the view the mixing plan sees: one sample per pair,
each costing 1 (preference data is mixed by pairs, not tokens). :func:`collate_pairs` turns pairs into model
inputs, by default with the prompt shared by both answers (computed once, not twice).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tuneforge.data import token_cache
from tuneforge.data.sanitize import content_hash
from tuneforge.data.templates import encode_chats
from tuneforge.data.token_cache import TokenizedSource
from tuneforge.errors import DataError, DataIssue
from tuneforge.paths import cache_dir

SIDES = ("chosen", "rejected")


@dataclass
class PairSource:
    """Tokenized pairs of one source; pair ``i`` is sequences ``2i`` (chosen) and ``2i + 1`` (rejected) of `seqs`."""

    name: str
    seqs: TokenizedSource

    def __len__(self) -> int:
        return len(self.seqs) // 2

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of both sides of each pair (what a pair costs to feed)."""
        lengths = self.seqs.lengths
        return lengths[0::2] + lengths[1::2]

    def supervised_counts(self) -> np.ndarray:
        """One loss unit per pair: a preference loss is a mean over pairs, whatever their lengths."""
        return np.ones(len(self), dtype=np.int64)

    @property
    def completion_tokens(self) -> np.ndarray:
        """``(pairs, 2)`` predicted response tokens of the chosen and rejected side."""
        counts = self.seqs.supervised_counts()
        return np.stack([counts[0::2], counts[1::2]], axis=1)

    @property
    def cache_key(self) -> str:
        return self.seqs.cache_key

    @property
    def cache_hit(self) -> bool:
        return self.seqs.cache_hit


@dataclass
class PairTokens:
    """One preference source after tokenization: train pairs, optional validation pairs, and stats."""

    name: str
    weight: float
    train: PairSource
    val: PairSource | None
    stats: dict[str, Any] = field(default_factory=dict)


def _record_key(example: dict) -> str:
    """The key ``pipeline.load_sources`` uses to remember each record's line."""
    return json.dumps(example, sort_keys=True, ensure_ascii=False)


def _unweighted_prompt(prompt: Sequence[dict]) -> list[dict]:
    """Earlier assistant turns are context, not a response being judged: weight 0 keeps them out of the mask."""
    return [dict(m, weight=0) if m.get("role") == "assistant" else dict(m) for m in prompt]


def encode_pairs(tokenizer: Any, examples: Sequence[dict], template: str | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[chosen_0, rejected_0, chosen_1, …]`` as (ids, completion mask), one batched tokenizer call."""
    conversations = []
    for ex in examples:
        prompt = _unweighted_prompt(ex["prompt"])
        conversations.append(prompt + list(ex["chosen"]))
        conversations.append(prompt + list(ex["rejected"]))
    return encode_chats(tokenizer, conversations, template, "assistant")


def fit_pairs(
    encoded: list[tuple[np.ndarray, np.ndarray]], max_length: int, on_overlong: str
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[int, str, int]], int]:
    """Apply the length policy to interleaved pairs.

    Returns the kept sequences (still interleaved), the over-long sides ``(pair, side, tokens)`` and how many pairs
    were dropped. ``truncate`` cuts the end (the prompt stays whole); a pair left with no response token on either
    side has nothing to compare and is dropped, as is any over-long pair under ``drop``.
    """
    too_long = [(k // 2, SIDES[k % 2], len(ids)) for k, (ids, _) in enumerate(encoded) if len(ids) > max_length]
    long_pairs = {p for p, _, _ in too_long}
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    dropped = 0
    for p in range(len(encoded) // 2):
        pair = [encoded[2 * p], encoded[2 * p + 1]]
        if p in long_pairs:
            if on_overlong == "drop":
                dropped += 1
                continue
            pair = [(ids[:max_length], mask[:max_length]) for ids, mask in pair]
        if any(int(mask[1:].sum()) == 0 for _, mask in pair):
            dropped += 1
            continue
        kept.extend(pair)
    return kept, too_long, dropped


def tokenize_pair_split(
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
) -> tuple[PairSource, int]:
    """Tokenize one split of one source through the token cache; returns the pairs and how many were dropped."""
    key = token_cache.cache_key(
        data_hash=content_hash(examples) if examples else "empty",
        tokenizer_hash=token_cache.tokenizer_fingerprint(tokenizer),
        template=template,
        max_length=max_length,
        kind="preference",
        loss_on="completion",
        on_overlong=on_overlong,
    )
    root = cache_dir("tokens")
    if use_cache:
        hit = token_cache.load(root, name, key)
        if hit is not None:
            return PairSource(name, hit), len(examples) - len(hit) // 2
    kept, too_long, dropped = fit_pairs(encode_pairs(tokenizer, examples, template), max_length, on_overlong)
    if too_long and on_overlong == "error":
        issues = [
            DataIssue(
                path,
                lines.get(_record_key(examples[p]), 0),
                side,
                f"too long after tokenization: prompt + {side} is {n} tokens",
                f"at most data.max_length={max_length}, or set data.on_overlong: truncate|drop",
            )
            for p, side, n in too_long
        ]
        raise DataError(sorted(issues, key=lambda x: x.line), f"{path}: {len(issues)} response(s) too long")
    if not kept:
        raise DataError(
            [
                DataIssue(
                    path,
                    0,
                    "",
                    f"no {split_name} pairs left with a response to compare",
                    f"prompts shorter than data.max_length={max_length}",
                )
            ]
        )
    seqs = token_cache.pack_arrays(name, kept)
    seqs.cache_key = key
    if use_cache:
        seqs = token_cache.store(root, key, seqs)
    return PairSource(name, seqs), dropped


def tokenize_preference_sources(
    loaded: Sequence[Any], tokenizer: Any, template: str | None, recipe: Any
) -> list[PairTokens]:
    """Tokenize every loaded source (``pipeline.SourceExamples`` of preference records) and its validation split."""
    out = []
    d = recipe.data
    for src in loaded:
        common = dict(
            path=src.path,
            lines=src.lines,
            tokenizer=tokenizer,
            template=template,
            max_length=d.max_length,
            on_overlong=d.on_overlong,
            use_cache=d.cache,
        )
        train, dropped = tokenize_pair_split(src.name, src.train, split_name="training", **common)
        val = None
        if src.val:
            val, _ = tokenize_pair_split(src.name, src.val, split_name="validation", **common)
        stats = dict(
            src.stats,
            pairs=len(train),
            dropped_pairs=dropped,
            cache_hit=train.cache_hit,
            train_tokens=len(train.seqs.ids),
            completion_tokens=int(train.completion_tokens.sum()),
        )
        out.append(PairTokens(src.name, src.weight, train, val, stats))
    return out


# --------------------------------------------------------------------------------------------- batches


@dataclass
class PairBatch:
    """A micro-batch of pairs as model inputs, plus where each scored token and each sequence end sits.

    Sequence ``p`` is pair ``p``'s chosen side and sequence ``P + p`` its rejected side (``P`` pairs). ``positions``
    index the flattened ``(rows × width)`` hidden states whose next-token distribution scores ``targets[k]``, a token
    of sequence ``seq[k]``; ``last[j]`` is the flat index of sequence ``j``'s final token (where a reward head reads).
    """

    input_ids: torch.Tensor  # (rows, width) int64
    position_ids: torch.Tensor  # (rows, width) int64
    attention_mask: torch.Tensor | None  # (rows, 1, width, width) bool for shared prompts; None: plain causal
    positions: torch.Tensor  # (N,) int64
    targets: torch.Tensor  # (N,) int64
    seq: torch.Tensor  # (N,) int64 in [0, 2P)
    last: torch.Tensor  # (2P,) int64
    pairs: int
    num_tokens: int  # tokens fed to the model, without padding

    def to(self, device: torch.device | str) -> PairBatch:
        nb = str(device) != "cpu"
        mask = None if self.attention_mask is None else self.attention_mask.to(device, non_blocking=nb)
        ids, pos, at, tgt, seq, last = (
            t.to(device, non_blocking=nb)
            for t in (self.input_ids, self.position_ids, self.positions, self.targets, self.seq, self.last)
        )
        return PairBatch(ids, pos, mask, at, tgt, seq, last, self.pairs, self.num_tokens)


def shared_prefix_length(chosen: tuple[np.ndarray, np.ndarray], rejected: tuple[np.ndarray, np.ndarray]) -> int:
    """Leading tokens both sides have in common (ids and loss mask), leaving each side at least one token of its own."""
    (c_ids, c_mask), (r_ids, r_mask) = chosen, rejected
    n = min(len(c_ids), len(r_ids)) - 1
    if n <= 0:
        return 0
    differ = (c_ids[:n] != r_ids[:n]) | (c_mask[:n] != r_mask[:n])
    return int(np.argmax(differ)) if differ.any() else n


def collate_pairs(
    refs: Sequence[tuple[int, int]], sources: Sequence[PairSource], pad_id: int, *, share_prompt: bool
) -> PairBatch:
    """Pairs ``(source, pair)`` → one batch; with `share_prompt`, one row per pair and the prompt computed once.

    Shared layout: ``prompt · chosen-rest · rejected-rest`` in one row. The rejected tokens see the prompt and
    themselves but not the chosen tokens (a block attention mask), and their positions continue from the prompt, so
    every token's context is exactly what it is in its own sequence — the same log-probs as two separate rows, for
    the prompt's share of the work less. Plain layout: chosen rows then rejected rows, right-padded, causal.
    """
    sides = [(sources[s].seqs.example(2 * i), sources[s].seqs.example(2 * i + 1)) for s, i in refs]
    n_pairs = len(sides)
    # Each sequence j (chosen p = p, rejected p = P + p) is placed in a row; slot[k] is where its position k sits.
    rows: list[tuple[np.ndarray, np.ndarray]] = []  # (ids, position ids) per row
    placed: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []  # (row, ids, mask, slot) per sequence
    spans: list[tuple[int, int, int]] = []  # shared prefix, end of chosen, row length (shared layout)
    if share_prompt:
        for p, (chosen, rejected) in enumerate(sides):
            (c_ids, c_mask), (r_ids, r_mask) = chosen, rejected
            shared = shared_prefix_length(chosen, rejected)
            lc, lr = len(c_ids), len(r_ids)
            positions_in_row = np.concatenate([np.arange(lc), np.arange(shared, lr)])
            rows.append((np.concatenate([c_ids, r_ids[shared:]]), positions_in_row))
            spans.append((shared, lc, lc + lr - shared))
            placed.append((p, c_ids, c_mask, np.arange(lc)))
            placed.append((p, r_ids, r_mask, np.concatenate([np.arange(shared), lc + np.arange(lr - shared)])))
        order = [2 * p for p in range(n_pairs)] + [2 * p + 1 for p in range(n_pairs)]  # chosen first, then rejected
        placed = [placed[j] for j in order]
    else:
        for j, (ids, mask) in enumerate([c for c, _ in sides] + [r for _, r in sides]):
            rows.append((ids, np.arange(len(ids))))
            placed.append((j, ids, mask, np.arange(len(ids))))

    width = max(len(ids) for ids, _ in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    position_ids = np.tile(np.arange(width, dtype=np.int64), (len(rows), 1))
    for r, (ids, pos) in enumerate(rows):
        input_ids[r, : len(ids)] = ids
        position_ids[r, : len(ids)] = pos
    positions, targets, seq = [], [], []
    last = np.zeros(len(placed), dtype=np.int64)
    for j, (row, ids, mask, slot) in enumerate(placed):
        ks = np.nonzero(mask[1:])[0] + 1  # token k carries loss and is predicted at position k - 1
        positions.append(row * width + slot[ks - 1])
        targets.append(ids[ks].astype(np.int64))
        seq.append(np.full(len(ks), j, dtype=np.int64))
        last[j] = row * width + slot[-1]

    attention = None
    if share_prompt:
        q = np.arange(width)[:, None]
        k = np.arange(width)[None, :]
        masks = np.empty((len(rows), 1, width, width), dtype=bool)
        for r, (shared, end_chosen, length) in enumerate(spans):
            allowed = (k <= q) & ((q < end_chosen) | (k < shared) | (k >= end_chosen))
            allowed[length:] = False
            pad = np.arange(length, width)
            allowed[pad, pad] = True  # padding attends to itself only: no empty softmax rows
            masks[r, 0] = allowed
        attention = torch.from_numpy(masks)
    return PairBatch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        attention_mask=attention,
        positions=torch.from_numpy(np.concatenate(positions)),
        targets=torch.from_numpy(np.concatenate(targets)),
        seq=torch.from_numpy(np.concatenate(seq)),
        last=torch.from_numpy(last),
        pairs=n_pairs,
        num_tokens=int(sum(len(ids) for ids, _ in rows)),
    )
