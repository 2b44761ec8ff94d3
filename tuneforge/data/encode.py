"""Canonical examples → token ids and loss masks, batch by batch, on every core.

Rendering a chat template is Python (jinja) and costs more than tokenizing the text, so the Rust tokenizer's
own batch parallelism leaves most of the work on one core; worker *processes* each render and tokenize whole
batches. Batches go out and come back in order (a bounded window in flight), so the output — and the token
cache written from it — is byte-identical whatever the number of workers.

Workers are forked (the tokenizer is already in memory, nothing to pickle or import), with the Rust
tokenizer's own threads off so forking is safe, and die with their parent (``PR_SET_PDEATHSIG`` on Linux).
"""

from __future__ import annotations

import ctypes
import gc
import json
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tuneforge.data.templates import ChatTemplateError, TurnProblem, encode_chat_views, encode_texts

PARALLEL_MIN_EXAMPLES = 8192  # smaller splits are encoded in-process: forking costs more than it saves
ENCODE_BATCH = 256  # examples per tokenizer call (and per job sent to a worker)
IN_FLIGHT_PER_WORKER = 3


@dataclass(frozen=True)
class EncodeJob:
    """How examples become tokens (the settings the token cache key holds)."""

    kind: str  # the source's format: "text" is chunked for pre-training, anything else is a chat
    template: str | None
    loss_on: str
    max_length: int
    on_overlong: str


@dataclass
class Encoded:
    """One batch, tokenized: concatenated arrays, and which inputs were too long (index in batch, tokens)."""

    ids: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    supervised: np.ndarray
    too_long: list[tuple[int, int]] = field(default_factory=list)
    problems: list[TurnProblem] = field(default_factory=list)  # turns the chat template cannot train
    owner: np.ndarray | None = None  # chats: the record (index in batch) each sequence comes from


def encode_batch(tokenizer: Any, records: list[bytes], job: EncodeJob) -> Encoded:
    """Tokenize canonical JSON records; apply the overlong policy, drop examples with nothing to learn."""
    examples = [json.loads(r) for r in records]
    too_long: list[tuple[int, int]] = []
    if job.kind == "text":
        encoded = encode_texts(tokenizer, [ex["text"] for ex in examples], job.max_length)
    else:
        try:
            views = encode_chat_views(tokenizer, [ex["messages"] for ex in examples], job.template, job.loss_on)
        except ChatTemplateError as e:  # the caller names them all (FILE:LINE: messages[i]: …) and trains nothing
            empty = np.zeros(0, np.int64)
            return Encoded(np.zeros(0, np.int32), np.zeros(0, np.uint8), empty, empty, problems=e.problems)
        # (ids, mask, the chat it comes from): a template may train a chat as several sequences
        encoded = [(s.ids, s.mask, i) for i, seqs in enumerate(views) for s in seqs]
        long = [k for k, (ids, _, _) in enumerate(encoded) if len(ids) > job.max_length]
        too_long = sorted({encoded[k][2]: len(encoded[k][0]) for k in long}.items())  # per chat: its last, longest
        if long and job.on_overlong == "truncate":
            encoded = [(ids[: job.max_length], mask[: job.max_length], i) for ids, mask, i in encoded]
        elif long:  # "drop", or "error" (the caller raises; the batch's tokens are never used)
            drop = set(long)
            encoded = [e for k, e in enumerate(encoded) if k not in drop]
        encoded = [e for e in encoded if int(e[1][1:].sum()) > 0]  # nothing to learn from (all weights 0)
    owners = np.fromiter((e[2] for e in encoded), dtype=np.int64, count=len(encoded)) if job.kind != "text" else None
    lengths = np.fromiter((len(e[0]) for e in encoded), dtype=np.int64, count=len(encoded))
    if not encoded:
        return Encoded(np.zeros(0, np.int32), np.zeros(0, np.uint8), lengths, lengths.copy(), too_long, owner=owners)
    ids = np.concatenate([e[0] for e in encoded]).astype(np.int32, copy=False)
    mask = np.concatenate([e[1] for e in encoded]).astype(np.uint8, copy=False)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    supervised = np.add.reduceat(mask.astype(np.int64), starts) - mask[starts]  # the first token is no target
    return Encoded(ids, mask, lengths, supervised, too_long, owner=owners)


_WORKER_TOKENIZER: list[Any] = []


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _init_worker(tokenizer: Any) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it shuts the pool down
    # What the worker inherited (modules, the tokenizer: ~350k objects with torch loaded) lives as long as it
    # does; the collector's full passes skip it (a few % of a worker's time) and leave its pages shared.
    gc.freeze()
    _WORKER_TOKENIZER[:] = [tokenizer]


def _work(records: list[bytes], job: EncodeJob) -> Encoded:
    return encode_batch(_WORKER_TOKENIZER[0], records, job)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def encode_stream(tokenizer: Any, batches: Iterable[list[bytes]], job: EncodeJob, workers: int) -> Iterator[Encoded]:
    """:func:`encode_batch` over `batches`, in order, on `workers` processes (in this one when ``workers <= 1``)."""
    if workers <= 1:
        for batch in batches:
            yield encode_batch(tokenizer, batch, job)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the forked workers: no Rust threads after fork
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(tokenizer,))
    pending: deque[Future[Encoded]] = deque()
    try:
        for batch in batches:
            pending.append(pool.submit(_work, batch, job))
            if len(pending) == 1:  # the first submit starts the workers; then this process may use threads again
                _restore("TOKENIZERS_PARALLELISM", before)
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        _restore("TOKENIZERS_PARALLELISM", before)
        pool.shutdown(wait=True, cancel_futures=True)


class EncodePool:
    """:func:`encode_batch` on worker processes, pushed batch by batch: results come back in submission order.

    The push-side twin of :func:`encode_stream`, for a producer that cannot be a generator (the streaming scan
    feeds it while it reads). At most ``IN_FLIGHT_PER_WORKER`` batches per worker are in flight; :meth:`submit`
    hands back, in order, the results it had to wait for to stay within that window.
    """

    def __init__(self, tokenizer: Any, job: EncodeJob, workers: int) -> None:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        self.job, self.window = job, IN_FLIGHT_PER_WORKER * workers
        self.pending: deque[tuple[Any, Future[Encoded]]] = deque()
        before = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the forked workers: no Rust threads after fork
        try:
            self.pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(tokenizer,))
            self.pool.submit(int).result()  # a forking pool starts all its workers on the first submit
        finally:
            _restore("TOKENIZERS_PARALLELISM", before)

    def submit(self, records: list[bytes], tag: Any) -> list[tuple[Any, Encoded]]:
        """Queue one batch (`tag` comes back with its result); the results that had to finish to make room."""
        self.pending.append((tag, self.pool.submit(_work, records, self.job)))
        done = []
        while len(self.pending) > self.window:
            tag, future = self.pending.popleft()
            done.append((tag, future.result()))
        return done

    def drain(self) -> Iterator[tuple[Any, Encoded]]:
        """Every result still to come, in order."""
        while self.pending:
            tag, future = self.pending.popleft()
            yield tag, future.result()

    def close(self) -> None:
        self.pending.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
