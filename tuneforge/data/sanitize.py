"""Clean canonical examples and split them into train/validation, reproducibly.

Everything here keys on the *canonical JSON* of an example (sorted keys, no whitespace), so the same
example gets the same hash on every machine and in every run: that is what makes dedup exact, the split
stable, and ``content_hash`` usable as a cache key and an MLflow tag.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from tuneforge.data.hashset import HashSet
from tuneforge.errors import TuneforgeError

# Below this many examples the threshold rule's validation size is too noisy (10 examples at 10% can
# easily give 0 or 3), so small sets are split exactly by rank; see ``split``.
EXACT_SPLIT_BELOW = 1000


@dataclass
class SanitizeStats:
    """How many examples came in, went out, and were dropped for each reason."""

    n_in: int = 0
    n_out: int = 0
    duplicates: int = 0
    empty: int = 0
    too_long: int = 0
    max_chars: int | None = None

    def summary(self) -> str:
        limit = f" (> {self.max_chars} chars)" if self.max_chars is not None else ""
        return (
            f"sanitize: {self.n_in} in, {self.n_out} kept; dropped {self.duplicates} duplicate(s), "
            f"{self.empty} empty, {self.too_long} too long{limit}"
        )

    def as_dict(self) -> dict:
        return asdict(self)


def canonical_json(example: dict) -> str:
    """The one string form of an example: sorted keys, no spaces, UTF-8 kept as is."""
    return json.dumps(example, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def content_hash(examples: Sequence[dict]) -> str:
    """sha256 over the examples' canonical JSON, in order (order changes training, so it changes the hash)."""
    h = hashlib.sha256()
    for example in examples:
        h.update(canonical_json(example).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def record_digest(canonical: str) -> bytes:
    """sha256 of an example's canonical JSON: its identity for dedup."""
    return hashlib.sha256(canonical.encode("utf-8")).digest()


class Sanitizer:
    """Streaming :func:`sanitize`: feed batches in order, get back which examples to keep; stats accumulate.

    Duplicates are found with a :class:`~tuneforge.data.hashset.HashSet` of 64-bit digests (16-32 bytes a
    record, so millions of records fit in a few tens of MB).
    """

    def __init__(self, *, dedup: bool = True, drop_empty: bool = True, max_chars: int | None = None) -> None:
        self.dedup, self.drop_empty = dedup, drop_empty
        self.stats = SanitizeStats(max_chars=max_chars)
        self.seen = HashSet()

    def keep(self, examples: Sequence[dict], canonicals: Sequence[str]) -> list[bool]:
        """Which of `examples` (with their :func:`canonical_json`) survive; counts each drop under one reason."""
        s = self.stats
        s.n_in += len(examples)
        keep = [True] * len(examples)
        for i, example in enumerate(examples):
            if self.drop_empty and is_empty(example):
                s.empty += 1
                keep[i] = False
            elif s.max_chars is not None and sum(map(len, texts(example))) > s.max_chars:
                s.too_long += 1
                keep[i] = False
        if self.dedup:
            idx = [i for i, k in enumerate(keep) if k]
            digests = b"".join(record_digest(canonicals[i])[:8] for i in idx)
            new = self.seen.add(np.frombuffer(digests, dtype=">u8").astype(np.uint64))
            for i, fresh in zip(idx, new.tolist()):
                if not fresh:
                    keep[i] = False
                    s.duplicates += 1
        s.n_out += sum(keep)
        return keep


def sanitize(
    examples: Sequence[dict],
    *,
    dedup: bool = True,
    drop_empty: bool = True,
    max_chars: int | None = None,
) -> tuple[list[dict], SanitizeStats]:
    """Drop empty, over-long and exactly duplicated examples, keeping the first of each and the order.

    *Empty* means the part that is trained on is blank: the text, the assistant messages with a non-zero
    weight (content and tool calls), or either side of a preference pair. ``max_chars`` bounds the total
    characters of all text in an example — a cheap pre-filter before tokenization. Each dropped example
    is counted once, under the first reason in the order empty, too long, duplicate.
    """
    sanitizer = Sanitizer(dedup=dedup, drop_empty=drop_empty, max_chars=max_chars)
    keep = sanitizer.keep(examples, [canonical_json(ex) for ex in examples])
    return [ex for ex, k in zip(examples, keep) if k], sanitizer.stats


def split_key(canonical: str, seed: int) -> float:
    """An example's number in [0, 1) for the split: sha256 of (seed, canonical JSON)."""
    return _unit_interval(f"{seed}\n".encode() + canonical.encode("utf-8"))


def split_mask(keys: np.ndarray, val_fraction: float) -> np.ndarray:
    """True for the examples (given their :func:`split_key`) that go to validation; see :func:`split`."""
    if not 0.0 <= val_fraction < 1.0:
        raise TuneforgeError(f"val_fraction is {val_fraction} (expected a number in [0, 1))")
    n = len(keys)
    if n == 0 or val_fraction == 0.0:
        return np.zeros(n, dtype=bool)
    if n >= EXACT_SPLIT_BELOW:
        is_val = keys < val_fraction
        if 0 < int(is_val.sum()) < n:
            return is_val
    k = min(n - 1, max(1, round(n * val_fraction)))
    is_val = np.zeros(n, dtype=bool)
    is_val[np.argsort(keys, kind="stable")[:k]] = True  # ties broken by position, as (key, index)
    return is_val


def split(examples: Sequence[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split into (train, validation), deterministically and stably; both keep the input order.

    Each example gets a number in [0, 1) from sha256 of (seed, canonical JSON). With at least
    ``EXACT_SPLIT_BELOW`` examples, those below ``val_fraction`` go to validation: an example's side
    depends on nothing but itself and the seed, so adding or removing records never moves the others,
    and duplicates always land on the same side (no leakage). The size is ``val_fraction`` of the set up
    to sampling noise. Smaller sets (or a threshold split that left one side empty) are split exactly:
    the ``max(1, round(n * val_fraction))`` examples with the smallest numbers go to validation, keeping
    at least one for training — still deterministic, and adding a record moves at most one other.
    """
    keys = np.array([split_key(canonical_json(ex), seed) for ex in examples], dtype=np.float64)
    is_val = split_mask(keys, val_fraction).tolist()
    train = [ex for ex, v in zip(examples, is_val) if not v]
    val = [ex for ex, v in zip(examples, is_val) if v]
    return train, val


def _unit_interval(data: bytes) -> float:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") / 2**64


def texts(example: dict) -> list[str]:
    """Every piece of text in a canonical example (contents of all messages, or the text)."""
    if isinstance(example.get("text"), str):
        return [example["text"]]
    texts: list[str] = []
    for key in ("messages", "prompt", "chosen", "rejected"):
        for m in example.get(key) or ():
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                texts.append(m["content"])
    return texts


def is_empty(example: dict) -> bool:
    if "text" in example:
        return not str(example["text"]).strip()
    if "messages" in example:
        msgs = example["messages"]
        if msgs and msgs[-1].get("role") in ("user", "tool"):  # a prompt for online RL: the prompt must say something
            return not any(_message_has_output(m) for m in msgs)
        trained = [m for m in msgs if m.get("role") == "assistant" and m.get("weight", 1) != 0]
        return not any(_message_has_output(m) for m in trained)
    if "chosen" in example:
        return not any(map(_message_has_output, example["chosen"])) or not any(
            map(_message_has_output, example["rejected"])
        )
    return False


def _message_has_output(m: dict) -> bool:
    return bool(m.get("tool_calls")) or bool(str(m.get("content") or "").strip())
