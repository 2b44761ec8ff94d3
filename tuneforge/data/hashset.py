"""A set of 64-bit hashes in one flat numpy table: exact-duplicate detection for millions of records.

A Python ``set`` of digests costs ~80 bytes a record; this costs 16-32 (open addressing, linear probing, load
kept under a half). Records are added in batches and the test-and-insert is vectorised, keeping the *first*
occurrence of each key, in order, as ``sanitize`` requires.
"""

from __future__ import annotations

import numpy as np

EMPTY = np.uint64(0)  # marks a free slot; a real key of 0 is stored as 1 (one collision in 2**64)


class HashSet:
    def __init__(self, capacity: int = 1 << 12) -> None:
        self.table = np.zeros(1 << max(4, (capacity - 1).bit_length()), dtype=np.uint64)
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, keys: np.ndarray) -> np.ndarray:
        """Insert `keys` (uint64) in order; True for each key seen for the first time (earlier in it or before)."""
        keys = np.where(keys == EMPTY, np.uint64(1), keys.astype(np.uint64))
        new = np.zeros(len(keys), dtype=bool)
        if not len(keys):
            return new
        _, first = np.unique(keys, return_index=True)  # the first occurrence of each key within the batch
        first.sort()
        while 2 * (self.size + len(first)) > len(self.table):
            self._grow()
        new[first[self._insert(keys[first])]] = True
        return new

    def _insert(self, keys: np.ndarray) -> np.ndarray:
        """Insert distinct keys; True where the key was absent."""
        table, mask = self.table, np.uint64(len(self.table) - 1)
        inserted = np.zeros(len(keys), dtype=bool)
        pending = np.arange(len(keys))
        pos = keys & mask
        while len(pending):
            k, p = keys[pending], pos[pending]
            slot = table[p]
            empty = slot == EMPTY
            table[p[empty]] = k[empty]  # several keys may claim one free slot: one of them wins
            won = empty & (table[p] == k)
            inserted[pending[won]] = True
            clash = ~won & (slot != k)  # lost a claim, or the slot holds another key: probe on
            moving = pending[clash]
            pos[moving] = np.where(empty[clash], p[clash], (p[clash] + np.uint64(1)) & mask)
            pending = moving
        self.size += int(inserted.sum())
        return inserted

    def _grow(self) -> None:
        old = self.table[self.table != EMPTY]
        self.table = np.zeros(2 * len(self.table), dtype=np.uint64)
        self.size = 0
        self._insert(old)
