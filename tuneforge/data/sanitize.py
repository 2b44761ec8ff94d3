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
    stats = SanitizeStats(n_in=len(examples), max_chars=max_chars)
    seen: set[bytes] = set()
    kept: list[dict] = []
    for example in examples:
        if drop_empty and _is_empty(example):
            stats.empty += 1
            continue
        if max_chars is not None and sum(map(len, _texts(example))) > max_chars:
            stats.too_long += 1
            continue
        if dedup:
            key = hashlib.sha256(canonical_json(example).encode("utf-8")).digest()
            if key in seen:
                stats.duplicates += 1
                continue
            seen.add(key)
        kept.append(example)
    stats.n_out = len(kept)
    return kept, stats


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
    if not 0.0 <= val_fraction < 1.0:
        raise TuneforgeError(f"val_fraction is {val_fraction} (expected a number in [0, 1))")
    n = len(examples)
    if n == 0 or val_fraction == 0.0:
        return list(examples), []
    salt = f"{seed}\n".encode()
    keys = [_unit_interval(salt + canonical_json(ex).encode("utf-8")) for ex in examples]
    if n >= EXACT_SPLIT_BELOW:
        is_val = [k < val_fraction for k in keys]
        if 0 < sum(is_val) < n:
            return _partition(examples, is_val)
    k = min(n - 1, max(1, round(n * val_fraction)))
    chosen = set(sorted(range(n), key=lambda i: (keys[i], i))[:k])
    return _partition(examples, [i in chosen for i in range(n)])


def _partition(examples: Sequence[dict], is_val: list[bool]) -> tuple[list[dict], list[dict]]:
    train = [ex for ex, v in zip(examples, is_val) if not v]
    val = [ex for ex, v in zip(examples, is_val) if v]
    return train, val


def _unit_interval(data: bytes) -> float:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") / 2**64


def _texts(example: dict) -> list[str]:
    """Every piece of text in a canonical example (contents of all messages, or the text)."""
    if isinstance(example.get("text"), str):
        return [example["text"]]
    texts: list[str] = []
    for key in ("messages", "prompt", "chosen", "rejected"):
        for m in example.get(key) or ():
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                texts.append(m["content"])
    return texts


def _is_empty(example: dict) -> bool:
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
