"""The serving engine: one base model in memory, many LoRA adapters per batch, continuous batching.

A background thread owns the model and runs a loop; each turn it

1. drops rows whose consumer went away (a cancelled stream frees its row before the next step),
2. prefills at most one chunk of newcomers (up to ``max_prefill_tokens`` tokens), samples their first token and
   copies their keys/values into the running batch — so a prefill delays running rows by at most one step,
3. runs one decode step for every running row at once, whatever adapter each row uses (``lora.py``),
4. hands each row's token to its request's asyncio queue and lets finished rows leave at once.

Requests are async generators of :class:`TokenEvent`; the HTTP layer uses only this module's API.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuneforge.serve.adapters import AdapterError, AdapterPool, Entry, UnknownAdapterError
from tuneforge.serve.kv import SlotCache
from tuneforge.serve.lora import LoraBank
from tuneforge.serve.sampling import Choice, RequestError, SamplingParams, choose, make_generator

__all__ = ["AdapterError", "Engine", "RequestError", "SamplingParams", "TokenEvent", "UnknownAdapterError"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token (or the end of a request) as its consumer sees it."""

    token_id: int | None  # None only on a final event that carries no new token
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None  # None while running; "stop", "length" or "abort" on the last event
    prompt_tokens: int
    completion_tokens: int  # generated so far, this one included (a stop token counts)


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    params: SamplingParams
    entry: Entry | None
    limit: int  # max_tokens, cut to what fits in the context
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    generator: torch.Generator
    stops: frozenset[int]
    slot: int = 0
    generated: int = 0
    acquired: bool = False
    cancelled: bool = False
    done: bool = False


@dataclass(eq=False)
class _Prefill:
    """Newcomers being prefilled together; a prompt longer than the token budget goes alone, chunk by chunk."""

    requests: list[_Request]
    cache: SlotCache
    ids: torch.Tensor
    offset: int = 0


class Engine:
    """One base model in memory; any number of LoRA adapters; continuous batching in a background thread.

    ``max_batch_size`` rows decode together; ``max_prefill_tokens`` bounds one prefill chunk (padded tokens), so
    a newcomer delays running rows by at most one chunk per step. ``adapter_budget_bytes`` bounds the resident
    adapters' own weights (rank × (in + out) per layer, in ``dtype``, plus the vocabulary × hidden table of an
    adapter that trains the embedding or LM head; a tied one once); the slot stacks pad every adapter of a
    layer to the largest resident rank, so mixing very different ranks uses more. ``max_model_len`` (default:
    the model's ``max_position_embeddings``) bounds prompt + answer.
    """

    def __init__(
        self,
        base_path: str | Path,
        *,
        max_batch_size: int = 32,
        adapter_budget_bytes: int | None = None,
        max_model_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        max_prefill_tokens: int = 512,
    ) -> None:
        from tuneforge.models.loading import load_model, load_tokenizer

        torch.set_flush_denormal(True)  # denormal activations make CPU kernels an order of magnitude slower
        self.base_path = Path(base_path).expanduser()
        self.tokenizer = load_tokenizer(str(base_path))
        self.model = load_model(str(base_path), dtype=dtype, attn_implementation="sdpa").eval().requires_grad_(False)
        config = self.model.config
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self.max_model_len = int(max_model_len or config.max_position_embeddings)
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.num_layers = config.num_hidden_layers
        self._bank = LoraBank(self.model)
        self._pool = AdapterPool(self._bank, self.model, self.base_path, adapter_budget_bytes)
        self._cache = SlotCache(
            self.num_layers, max_batch_size, min(self.max_model_len, 64), max_cols=self.max_model_len
        )
        self._rows: list[_Request] = []
        self._next = torch.zeros(max_batch_size, 1, dtype=torch.long)  # each row's token to feed next
        self._pending: deque[_Request] = deque()
        self._prefill: _Prefill | None = None
        self._lock = threading.RLock()  # the model: one forward at a time (decode loop, embed, adapter changes)
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0

    # ------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the decoding thread (idempotent)."""
        with self._wake:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="tuneforge-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread; requests still running or waiting end with finish_reason ``abort``."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        self._thread = None
        with self._lock:
            waiting = list(self._pending) + (self._prefill.requests if self._prefill else []) + self._rows
            self._pending.clear()
            self._prefill = None
            outbox: list[Any] = []
            for req in waiting:
                self._release(req)
                self._finish(req, outbox, TokenEvent(None, None, None, "abort", len(req.prompt), req.generated))
            self._rows.clear()
            self._cache.remove(list(range(self._cache.rows)))
        _deliver_all(outbox)

    # -------------------------------------------------------------------------------------------- adapters
    def add_adapter(self, name: str, path: str | Path, *, pin: bool = False) -> None:
        """Register a PEFT LoRA adapter (checked now, loaded on first use; ``pin``: load now, never evict)."""
        with self._lock, torch.inference_mode():
            entry = self._pool.register(name, path, pin=pin)
        if pin:
            self._pool.stage(entry)  # read the weights without holding up the decoding loop
            with self._lock, torch.inference_mode():
                self._pool.load_pinned()

    def remove_adapter(self, name: str) -> None:
        """Unregister; running requests that use it finish first. Unknown names raise :class:`UnknownAdapterError`."""
        with self._lock, torch.inference_mode():
            self._pool.unregister(name)

    def adapters(self) -> list[str]:
        return self._pool.names()

    def stats(self) -> dict[str, Any]:
        """What the engine holds now (for metrics and tests)."""
        with self._lock:
            return {
                "running": len(self._rows),
                "waiting": len(self._pending) + (len(self._prefill.requests) if self._prefill else 0),
                "steps": self.steps,
                "adapters": len(self._pool.entries),
                "resident_adapters": sorted(e.info.name for e in self._pool.resident.values()),
                "adapter_bytes": self._pool.resident_bytes(),
                "kv_cache_bytes": self._cache.nbytes(),
            }

    # ------------------------------------------------------------------------------------------ generation
    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None
    ) -> AsyncIterator[TokenEvent]:
        """Generate from ``prompt_ids``; bad input raises (a :class:`~tuneforge.errors.TuneforgeError`) before
        the first event. Stop iterating (``aclose``, task cancel) and the request's row is freed at once."""
        self._check_prompt(prompt_ids)
        params.check(self.vocab_size)
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError(
                f"prompt: {len(prompt_ids)} tokens do not fit this model's context of {self.max_model_len} tokens "
                "with room for an answer (expected a shorter prompt)"
            )
        entry = self._pool.get(adapter) if adapter is not None else None
        if entry is not None and entry.slot is None:
            await asyncio.to_thread(self._pool.stage, entry)  # read the weights off the event loop and the decoder
        req = _Request(
            prompt=list(prompt_ids),
            params=params,
            entry=entry,
            limit=min(params.max_tokens, self.max_model_len - len(prompt_ids)),
            loop=asyncio.get_running_loop(),
            queue=asyncio.Queue(),
            generator=make_generator(params.seed),
            stops=frozenset(params.stop_token_ids),
        )
        self.start()
        with self._wake:
            self._pending.append(req)
            self._wake.notify()
        try:
            while True:
                event = await req.queue.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if not req.done:
                req.cancelled = True
                with self._wake:
                    self._wake.notify()

    def embed(self, batch: list[list[int]], adapter: str | None = None) -> list[list[float]]:
        """Mean-pooled last hidden states (padding masked), L2-normalised, of the base or an adapter."""
        if not batch:
            return []
        for ids in batch:
            self._check_prompt(ids)
        too_long = [i for i, ids in enumerate(batch) if len(ids) > self.max_model_len]
        if too_long:
            raise RequestError(f"input[{too_long[0]}]: longer than the model's context of {self.max_model_len} tokens")
        entry = self._pool.get(adapter) if adapter is not None else None
        width = max(len(ids) for ids in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        with self._lock, torch.inference_mode():
            slot = self._acquire(entry) if entry is not None else 0
            try:
                self._bank.use([slot] * len(batch))
                hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            finally:
                if entry is not None:
                    self._pool.release(entry)
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1)
            return torch.nn.functional.normalize(pooled, dim=-1).tolist()

    def _check_prompt(self, ids: Any) -> None:
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
            raise RequestError("prompt: expected a non-empty list of token ids (integers)")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(
                f"prompt: token ids {bad[:5]} are outside this model's vocabulary (0 … {self.vocab_size - 1})"
            )

    def _acquire(self, entry: Entry) -> int:
        slot = self._pool.acquire(entry)
        if slot is None:
            raise AdapterError(
                f"adapter {entry.info.name}: the adapter budget is full with adapters that are pinned or in use"
            )
        return slot

    # ------------------------------------------------------------------------------------------ the loop
    def _run(self) -> None:
        torch.set_flush_denormal(True)  # a per-thread CPU flag
        while True:
            with self._wake:
                while not (self._stopping or self._rows or self._pending or self._prefill):
                    self._wake.wait()
                if self._stopping:
                    return
            outbox: list[Any] = []
            busy = True
            try:
                with self._lock, torch.inference_mode():
                    busy = self._step(outbox)
            except Exception as e:  # a bug or out of memory: fail what is in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(e, outbox)
            _deliver_all(outbox)
            if not busy:  # only requests whose adapter waits for room: wait for a release, do not spin
                with self._wake:
                    self._wake.wait(0.01)

    def _step(self, outbox: list[Any]) -> bool:
        """One turn of the loop; False when there was nothing it could do."""
        self._drop_cancelled()
        if self._prefill is None:
            self._prefill = self._admit(outbox)
        busy = self._prefill is not None or bool(self._rows) or bool(outbox)
        if self._prefill is not None:
            self._prefill_chunk(self._prefill, outbox)
        if self._rows:
            self._decode(outbox)
            self.steps += 1
        return busy

    def _drop_cancelled(self) -> None:
        with self._wake:
            if any(r.cancelled for r in self._pending):
                self._pending = deque(r for r in self._pending if not r.cancelled)
        gone = [i for i, r in enumerate(self._rows) if r.cancelled]
        for i in gone:
            self._release(self._rows[i])
        self._remove_rows(gone)

    def _admit(self, outbox: list[Any]) -> _Prefill | None:
        """Take newcomers in arrival order while rows and the prefill budget last (at least one)."""
        taken: list[_Request] = []
        skipped: list[_Request] = []
        room = self.max_batch_size - len(self._rows)
        width = 0
        with self._wake:
            while self._pending and len(taken) < room:
                req = self._pending[0]
                w = max(width, len(req.prompt))
                if taken and w * (len(taken) + 1) > self.max_prefill_tokens:
                    break
                self._pending.popleft()
                try:
                    if req.entry is not None:
                        if req.entry.removed:
                            raise UnknownAdapterError(f"adapter {req.entry.info.name!r} was removed")
                        slot = self._pool.acquire(req.entry)
                        if slot is None:
                            skipped.append(req)  # its adapter waits for room; others may go ahead
                            continue
                        req.slot, req.acquired = slot, True
                except AdapterError as e:
                    req.done = True
                    outbox.append((req, e))
                    continue
                taken.append(req)
                width = w
            self._pending.extendleft(reversed(skipped))
        if not taken:
            return None
        # Rows of one adapter side by side: the LoRA layers then compute each adapter's rows in place (lora.py).
        taken.sort(key=lambda r: r.slot)
        cache, ids = SlotCache.for_prompts(self.num_layers, [r.prompt for r in taken], self.max_model_len)
        return _Prefill(taken, cache, ids)

    def _prefill_chunk(self, job: _Prefill, outbox: list[Any]) -> None:
        n, width = len(job.requests), job.ids.shape[1]
        chunk = min(width - job.offset, max(1, self.max_prefill_tokens // n))
        self._bank.use([r.slot for r in job.requests])
        mask, positions = job.cache.prefill_inputs(chunk)
        out = self.model(
            input_ids=job.ids[:, job.offset : job.offset + chunk],
            attention_mask=mask,
            position_ids=positions,
            past_key_values=job.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        job.cache.advance(chunk, count=False)
        job.offset += chunk
        if job.offset < width:
            return
        self._prefill = None
        choices = choose(
            out.logits[:, -1].float(), [r.params for r in job.requests], [r.generator for r in job.requests]
        )
        ended = [i for i, (r, c) in enumerate(zip(job.requests, choices)) if r.cancelled or self._emit(r, c, outbox)]
        requests, first = list(job.requests), [c.token_id for c in choices]
        for src, dst in job.cache.remove(ended):
            requests[dst], first[dst] = requests[src], first[src]
        keep = len(requests) - len(ended)
        if keep:
            b = len(self._rows)
            self._cache.append(job.cache)
            self._rows.extend(requests[:keep])
            self._next[b : b + keep, 0] = torch.tensor(first[:keep], dtype=torch.long)
        for r in job.requests:
            if r.done or r.cancelled:
                self._release(r)

    def _decode(self, outbox: list[Any]) -> None:
        rows = self._rows
        b = len(rows)
        self._bank.use([r.slot for r in rows])
        mask, positions = self._cache.decode_inputs()
        out = self.model(
            input_ids=self._next[:b],
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self._cache.advance(1)
        choices = choose(out.logits[:, -1].float(), [r.params for r in rows], [r.generator for r in rows])
        self._next[:b, 0] = torch.tensor([c.token_id for c in choices], dtype=torch.long)
        ended = [i for i, (r, c) in enumerate(zip(rows, choices)) if self._emit(r, c, outbox)]
        for i in ended:
            self._release(rows[i])
        self._remove_rows(ended)

    def _emit(self, req: _Request, choice: Choice, outbox: list[Any]) -> bool:
        """Queue the event for ``choice``; True when the request is finished."""
        req.generated += 1
        prompt = len(req.prompt)
        if choice.token_id in req.stops:
            self._finish(req, outbox, TokenEvent(None, None, None, "stop", prompt, req.generated))
            return True
        reason = "length" if req.generated >= req.limit else None
        event = TokenEvent(choice.token_id, choice.logprob, choice.top_logprobs, reason, prompt, req.generated)
        if reason is None:
            outbox.append((req, event))
            return False
        self._finish(req, outbox, event)
        return True

    def _finish(self, req: _Request, outbox: list[Any], event: TokenEvent) -> None:
        req.done = True
        outbox.append((req, event))

    def _release(self, req: _Request) -> None:
        if req.acquired and req.entry is not None:
            req.acquired = False
            self._pool.release(req.entry)

    def _remove_rows(self, rows: list[int]) -> None:
        if not rows:
            return
        for src, dst in self._cache.remove(rows):
            self._rows[dst] = self._rows[src]
            self._next[dst] = self._next[src]
        del self._rows[len(self._rows) - len(rows) :]

    def _fail_all(self, error: Exception, outbox: list[Any]) -> None:
        with self._lock:
            failed = self._rows + (self._prefill.requests if self._prefill else [])
            for req in failed:
                req.done = True
                self._release(req)
                outbox.append((req, RuntimeError(f"the engine failed: {error}")))
            self._rows = []
            self._prefill = None
            self._cache = SlotCache(
                self.num_layers, self.max_batch_size, min(self.max_model_len, 64), max_cols=self.max_model_len
            )


def _deliver_all(outbox: list[Any]) -> None:
    """Hand events to their requests' event loops: one wake-up per loop per step, not one per token."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
    for req, item in outbox:
        by_loop.setdefault(req.loop, []).append((req.queue, item))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            for req, _ in outbox:
                if req.loop is loop:
                    req.cancelled = True


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
