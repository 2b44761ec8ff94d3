"""Tokenize once, memory-map forever.

Tokenized examples are stored as flat arrays under ``$TUNEFORGE_HOME/cache/tokens/<key>/``: ``ids`` (int32),
``mask`` (uint8), ``offsets`` (int64, n+1) and ``supervised`` (int64, predicted tokens per example), raw
little-endian files named in ``meta.json``. The key hashes everything that changes the tokens — data content,
tokenizer, template, max length, masking policy — so a second run (or another replica) with the same inputs
memory-maps the arrays instead of re-tokenizing, and a change to any input can never serve stale tokens.

Entries are written by :class:`CacheWriter` in batches (the whole source never sits in memory), into a
temporary directory renamed into place at the end, so a crash or a concurrent writer never leaves a torn entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

CACHE_VERSION = 2
ARRAYS = {"ids": np.int32, "mask": np.uint8, "offsets": np.int64, "supervised": np.int64}


@dataclass
class TokenizedSource:
    """All examples of one source as flat arrays; example ``i`` is ``ids[offsets[i]:offsets[i+1]]``."""

    name: str
    ids: np.ndarray  # int32
    mask: np.ndarray  # uint8, 1 where the token carries loss
    offsets: np.ndarray  # int64, len n+1
    cache_key: str = ""
    cache_hit: bool = False
    supervised: np.ndarray | None = None  # int64 per example, stored with the cache (see supervised_counts)

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
        if self.supervised is None:
            self.supervised = supervised_counts(self.mask, self.offsets)
        return self.supervised


def supervised_counts(mask: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per example: loss tokens after its first token (vectorised; `offsets` has n+1 entries)."""
    cum = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    starts, ends = offsets[:-1], offsets[1:]
    firsts = mask[np.minimum(starts, max(len(mask) - 1, 0))] if len(mask) else np.zeros(0)
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


def _map(path: Path, dtype: type, count: int) -> np.ndarray:
    # np.memmap cannot map an empty file; an empty array is the same thing.
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype)


def load(root: Path, name: str, key: str) -> TokenizedSource | None:
    """Memory-map a cached entry, or None when there is none (or it is incomplete)."""
    entry = root / key
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("v") != CACHE_VERSION:
        return None
    n, tokens = meta["examples"], meta["tokens"]
    counts = {"ids": tokens, "mask": tokens, "offsets": n + 1, "supervised": n}
    arrays = {k: _map(entry / f"{k}.bin", dtype, counts[k]) for k, dtype in ARRAYS.items()}
    return TokenizedSource(
        name, arrays["ids"], arrays["mask"], arrays["offsets"], key, True, supervised=arrays["supervised"]
    )


class CacheWriter:
    """Append tokenized examples batch by batch; :meth:`commit` makes the entry visible atomically.

    Use as a context manager: leaving it without ``commit`` (an error, a refused record) removes the partial entry.
    """

    def __init__(self, root: Path, key: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.key = root, key
        self.tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}-"))
        self.files: dict[str, BinaryIO] = {k: (self.tmp / f"{k}.bin").open("wb") for k in ARRAYS}
        self.examples = self.tokens = 0
        self.files["offsets"].write(np.zeros(1, np.int64).tobytes())

    def append(self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray, supervised: np.ndarray) -> None:
        """One batch: concatenated ids and masks, and each example's length and supervised-token count."""
        offsets = self.tokens + np.cumsum(lengths, dtype=np.int64)
        for k, a in (("ids", ids), ("mask", mask), ("offsets", offsets), ("supervised", supervised)):
            self.files[k].write(np.ascontiguousarray(a, dtype=ARRAYS[k]).tobytes())
        self.examples += len(lengths)
        self.tokens += int(lengths.sum())

    def close(self) -> None:
        """Close the files: appending is over, the entry is committed (or dropped) later."""
        for f in self.files.values():
            f.close()

    def commit(self, name: str, key: str | None = None) -> TokenizedSource:
        """Make the entry visible under `key` (default: the one given at creation — tokens written before their
        key was known, as a scan that tokenizes while it reads does, are committed under the key found at its end)."""
        self.key = key or self.key
        for f in self.files.values():
            f.close()
        meta = {"v": CACHE_VERSION, "examples": self.examples, "tokens": self.tokens}
        (self.tmp / "meta.json").write_text(json.dumps(meta))  # written last: marks the entry complete
        try:
            os.rename(self.tmp, self.root / self.key)
        except OSError:  # another process won the race; its entry is identical
            shutil.rmtree(self.tmp, ignore_errors=True)
        loaded = load(self.root, name, self.key)
        assert loaded is not None
        loaded.cache_hit = False
        return loaded

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)  # a no-op after commit (renamed away)


def store(root: Path, key: str, source: TokenizedSource) -> TokenizedSource:
    """Write a whole in-memory source (the small-data paths: preference pairs, unpaired completions)."""
    with CacheWriter(root, key) as writer:
        writer.append(source.ids, source.mask, source.lengths, source.supervised_counts())
        return writer.commit(source.name)
