"""Tokenize while the scan reads: the two halves of a cold prepare, overlapped.

A cold start scans a source (validate, dedup, split: one process, ``data.stream``) and then tokenizes it (worker
processes, ``data.encode``). Done one after the other, the workers wait for the whole scan and the scan runs on
one core. :class:`TokenizeAhead` takes each batch of examples the scan keeps, as it keeps them, to the workers,
and writes the tokens of both sides of the split (a record's side is its split key against the fraction) into
two token-cache entries whose keys are only known once the scan ends.

It is speculation, always checked: the tokens are used only when nothing could make them differ from what
``pipeline.tokenize_sources`` would write from the spool — the threshold split held (no rank split for a small
set), no record was bad, no turn was refused or too long under ``on_overlong: error``, each side kept at least
one example, and the tokenizer and job are the ones ``tokenize_sources`` uses. Otherwise they are dropped and the
ordinary path runs, with its own messages. A record's tokens do not depend on the batch it is encoded in (each
conversation is rendered and tokenized on its own), so the entries are byte-identical to the ordinary path's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.data.encode import ENCODE_BATCH, PARALLEL_MIN_EXAMPLES, Encoded, EncodeJob, EncodePool
from tuneforge.data.token_cache import CacheWriter, TokenizedSource

START_AFTER = PARALLEL_MIN_EXAMPLES  # kept examples before the workers start (a smaller set is not worth a fork)


@dataclass(frozen=True)
class AheadSpec:
    """How the scan's examples are tokenized ahead: the job, the tokenizer (and its fingerprint), the workers."""

    tokenizer: Any
    tokenizer_hash: str
    job: EncodeJob
    workers: int


AheadFactory = Callable[[str], AheadSpec | None]  # the source's format → a spec, or None: do not tokenize ahead


@dataclass
class PendingTokens:
    """One side's tokens, written but not yet visible: :meth:`commit` under the key the caller computes."""

    writer: CacheWriter
    spec: AheadSpec

    def matches(self, job: EncodeJob, tokenizer_hash: str) -> bool:
        return self.spec.job == job and self.spec.tokenizer_hash == tokenizer_hash and self.writer.examples > 0

    def commit(self, name: str, key: str) -> TokenizedSource:
        return self.writer.commit(name, key)

    def discard(self) -> None:
        self.writer.__exit__(None, None, None)


class TokenizeAhead:
    """Feed :meth:`add` the scan's kept examples in order; :meth:`finish` gives each side's pending tokens."""

    def __init__(self, spec: AheadSpec, val_fraction: float, root: Path) -> None:
        self.spec, self.val_fraction, self.root = spec, val_fraction, root
        self.buffer: list[tuple[list[bytes], np.ndarray]] = []  # until START_AFTER examples: maybe never forked
        self.buffered = 0
        self.pool: EncodePool | None = None
        self.writers: list[CacheWriter] = []
        self.failed = False

    def add(self, records: list[bytes], keys: np.ndarray) -> None:
        """The next kept examples (canonical JSON lines) and their split keys."""
        if self.failed:
            return
        is_val = keys < self.val_fraction
        for i in range(0, len(records), ENCODE_BATCH):
            batch, sides = records[i : i + ENCODE_BATCH], is_val[i : i + ENCODE_BATCH]
            if self.pool is None:
                self.buffer.append((batch, sides))
                self.buffered += len(batch)
                if self.buffered >= START_AFTER:
                    self._start()
            else:
                self._write(self.pool.submit(batch, sides))
            if self.failed:
                return

    def _start(self) -> None:
        self.pool = EncodePool(self.spec.tokenizer, self.spec.job, self.spec.workers)
        self.writers = [CacheWriter(self.root, "ahead") for _ in range(2)]
        buffer, self.buffer = self.buffer, []
        for batch, sides in buffer:
            if self.pool is None:  # a batch already written made the tokens of no use
                return
            self._write(self.pool.submit(batch, sides))

    def _write(self, done: list[tuple[np.ndarray, Encoded]]) -> None:
        for is_val, enc in done:
            if self.failed:
                return
            if enc.problems or (enc.too_long and self.spec.job.on_overlong == "error") or enc.owner is None:
                self.abandon()  # the ordinary path names them (FILE:LINE: …) and trains nothing
                return
            seq_val = is_val[enc.owner]
            tok_val = np.repeat(seq_val, enc.lengths)
            for writer, seqs, toks in ((self.writers[0], ~seq_val, ~tok_val), (self.writers[1], seq_val, tok_val)):
                if seqs.any():
                    writer.append(enc.ids[toks], enc.mask[toks], enc.lengths[seqs], enc.supervised[seqs])

    def finish(self) -> list[PendingTokens] | None:
        """Both sides' pending tokens (train, validation), or None when they were not made or cannot be used."""
        if self.failed or self.pool is None:
            self.abandon()
            return None
        try:
            self._write(list(self.pool.drain()))
        except BaseException:
            self.abandon()
            raise
        if self.failed:
            return None
        self.pool.close()
        self.pool = None
        for w in self.writers:  # pending until tokenize_sources runs, maybe for many sources: no open files
            w.close()
        return [PendingTokens(w, self.spec) for w in self.writers]

    def abandon(self) -> None:
        """Stop: shut the workers down, remove what was written."""
        self.failed = True
        self.buffer = []
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        for w in self.writers:
            w.__exit__(None, None, None)
        self.writers = []
