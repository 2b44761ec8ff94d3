"""Tokenize once, memory-map forever.

Tokenized examples are stored as three flat arrays (ids, loss mask, offsets) in ``.npy`` files under
``$TUNEFORGE_HOME/cache/tokens/<key>/``. The key hashes everything that changes the tokens — data content,
tokenizer, template, max length, masking policy — so a second run (or another replica) with the same inputs
memory-maps the arrays instead of re-tokenizing, and a change to any input can never serve stale tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CACHE_VERSION = 1


@dataclass
class TokenizedSource:
    """All examples of one source as flat arrays; example ``i`` is ``ids[offsets[i]:offsets[i+1]]``."""

    name: str
    ids: np.ndarray  # int32
    mask: np.ndarray  # uint8, 1 where the token carries loss
    offsets: np.ndarray  # int64, len n+1
    cache_key: str = ""
    cache_hit: bool = False

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.mask[a:b]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def supervised_counts(self) -> np.ndarray:
        """Tokens that are *predicted* with loss per example (the first token is never a target)."""
        cum = np.concatenate([[0], np.cumsum(self.mask, dtype=np.int64)])
        starts, ends = self.offsets[:-1], self.offsets[1:]
        firsts = self.mask[np.minimum(starts, max(len(self.mask) - 1, 0))] if len(self.mask) else np.zeros(0)
        return (cum[ends] - cum[starts] - firsts).astype(np.int64)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's full definition (vocab, merges, normaliser, special tokens)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    h.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    return h.hexdigest()[:16]


def cache_key(
    *,
    data_hash: str,
    tokenizer_hash: str,
    template: str | None,
    max_length: int,
    kind: str,
    loss_on: str,
    on_overlong: str,
) -> str:
    blob = json.dumps(
        dict(
            v=CACHE_VERSION,
            data=data_hash,
            tok=tokenizer_hash,
            template=template,
            max_length=max_length,
            kind=kind,
            loss_on=loss_on,
            on_overlong=on_overlong,
        ),
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def pack_arrays(name: str, encoded: list[tuple[np.ndarray, np.ndarray]]) -> TokenizedSource:
    lengths = np.fromiter((len(ids) for ids, _ in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.concatenate([e[0] for e in encoded]).astype(np.int32) if encoded else np.zeros(0, np.int32)
    mask = np.concatenate([e[1] for e in encoded]).astype(np.uint8) if encoded else np.zeros(0, np.uint8)
    return TokenizedSource(name, ids, mask, offsets)


def load(root: Path, name: str, key: str) -> TokenizedSource | None:
    """Memory-map a cached entry, or None when there is none (or it is incomplete)."""
    entry = root / key
    if not (entry / "done").exists():
        return None
    arrays = {k: np.load(entry / f"{k}.npy", mmap_mode="r") for k in ("ids", "mask", "offsets")}
    return TokenizedSource(name, arrays["ids"], arrays["mask"], np.asarray(arrays["offsets"]), key, True)


def store(root: Path, key: str, source: TokenizedSource) -> TokenizedSource:
    """Write atomically (temp dir + rename), so concurrent writers and crashes never leave a torn entry."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}-"))
    try:
        for k in ("ids", "mask", "offsets"):
            np.save(tmp / f"{k}.npy", getattr(source, k))
        (tmp / "done").write_text(json.dumps({"examples": len(source), "tokens": len(source.ids)}))
        try:
            os.rename(tmp, root / key)
        except OSError:  # another process won the race; its entry is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    loaded = load(root, source.name, key)
    assert loaded is not None
    loaded.cache_hit = False
    return loaded
