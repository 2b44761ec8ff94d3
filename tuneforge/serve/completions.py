"""One request's generations on an engine, and the OpenAI bodies they make (whole, or as stream chunks).

A request asks for ``n`` choices of each of its prompts; every choice is its own engine request (seeds
``seed``, ``seed + 1``, … so a seeded request is reproducible whatever else is running), all run at once and
their pieces arrive in one queue. Closing a :class:`Run` — the client went away, a stop string matched —
cancels every generation, which frees their engine slots immediately.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tuneforge.serve.text import ChoiceText, Piece, TokenLogprob, chat_logprobs, completion_logprobs

_DONE = object()


class EngineAborted(Exception):
    """The engine stopped (server shutting down) before the generation finished."""


@dataclass(frozen=True)
class Generation:
    """One choice to generate: its prompt, sampling parameters and where it goes in the response."""

    index: int
    prompt_ids: list[int]
    params: Any  # tuneforge.serve.engine.SamplingParams
    prompt: int = 0  # which prompt of the request (completions may send several)


def generations(prompts: Sequence[list[int]], n: int, params: Any) -> list[Generation]:
    """``n`` choices per prompt; choice ``j`` samples with ``seed + j`` (unseeded stays unseeded)."""
    out = []
    for p, ids in enumerate(prompts):
        for j in range(n):
            seeded = replace(params, seed=params.seed + j) if params.seed is not None else params
            out.append(Generation(p * n + j, list(ids), seeded, p))
    return out


class Run:
    """The generations of one request, running concurrently; iterate for their pieces, :meth:`close` to cancel."""

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        adapter: str | None,
        gens: Sequence[Generation],
        stops: Sequence[str],
    ) -> None:
        self.engine, self.tokenizer, self.adapter, self.stops = engine, tokenizer, adapter, list(stops)
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.tasks = [asyncio.create_task(self._generate(g)) for g in gens]

    async def _generate(self, gen: Generation) -> None:
        text = ChoiceText(gen.index, self.tokenizer, self.stops, gen.params.stop_token_ids)
        try:
            stream = self.engine.generate(gen.prompt_ids, gen.params, self.adapter)
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    piece = text.push(event)
                    if piece is None:
                        continue
                    if piece.finish_reason == "abort":
                        raise EngineAborted("the model stopped before the answer was finished (server shutting down)")
                    self.queue.put_nowait(piece)
                    if piece.finish_reason is not None:
                        return  # leaving `aclosing` ends the engine request: a stop string frees the slot now
        except asyncio.CancelledError:
            raise
        except Exception as e:  # handed to the consumer, which answers with an error object
            self.queue.put_nowait(e)
        finally:
            self.queue.put_nowait(_DONE)

    async def pieces(self) -> AsyncIterator[Piece]:
        """Pieces of every choice as they come; an engine error is raised here, after cancelling the rest."""
        running = len(self.tasks)
        try:
            while running:
                item = await self.queue.get()
                if item is _DONE:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            self.close()

    def close(self) -> None:
        """Cancel whatever is still generating (no await: this runs inside cancelled scopes too)."""
        for task in self.tasks:
            if not task.done():
                task.cancel()


@dataclass
class Choice:
    """A whole choice, from its pieces."""

    index: int
    prompt: int
    text: str = ""
    tokens: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, piece: Piece) -> None:
        self.text += piece.text
        self.tokens += piece.tokens
        self.finish_reason = piece.finish_reason or self.finish_reason
        self.prompt_tokens, self.completion_tokens = piece.prompt_tokens, piece.completion_tokens


async def collect(run: Run, gens: Sequence[Generation]) -> list[Choice]:
    """Every choice, whole, in index order."""
    choices = {g.index: Choice(g.index, g.prompt, prompt_tokens=len(g.prompt_ids)) for g in gens}
    async for piece in run.pieces():
        choices[piece.index].add(piece)
    return [choices[i] for i in sorted(choices)]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def total_usage(gens: Sequence[Generation], completion_tokens: int) -> dict[str, int]:
    """Each prompt counts once, however many choices it has (as OpenAI counts ``n``)."""
    prompts = {g.prompt: len(g.prompt_ids) for g in gens}
    return usage(sum(prompts.values()), completion_tokens)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# ------------------------------------------------------------------------------------------------- chat


def chat_body(
    model: str, choices: Sequence[Choice], gens: Sequence[Generation], tokenizer: Any, logprobs: bool
) -> dict[str, Any]:
    """A ``chat.completion``."""
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": {"content": chat_logprobs(tokenizer, c.tokens), "refusal": None} if logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": total_usage(gens, sum(c.completion_tokens for c in choices)),
    }


async def chat_stream(
    model: str,
    pieces: AsyncIterator[Piece],
    gens: Sequence[Generation],
    tokenizer: Any,
    *,
    logprobs: bool,
    include_usage: bool,
) -> AsyncIterator[str]:
    """``chat.completion.chunk`` events: each choice's role, its text as it comes, its finish; usage; ``[DONE]``."""
    head = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, tokens: Any = None) -> str:
        lp = {"content": chat_logprobs(tokenizer, tokens or []), "refusal": None} if logprobs and tokens else None
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return json.dumps({**head, "system_fingerprint": None, "choices": [choice], **extra})

    for g in gens:
        yield chunk(g.index, {"role": "assistant", "content": ""})
    completion = 0
    async for p in pieces:
        if p.text or p.tokens:
            yield chunk(p.index, {"content": p.text}, tokens=p.tokens)
        if p.finish_reason is not None:
            completion += p.completion_tokens
            yield chunk(p.index, {}, p.finish_reason)
    if include_usage:
        yield json.dumps({**head, "system_fingerprint": None, "choices": [], "usage": total_usage(gens, completion)})
    yield "[DONE]"


# ------------------------------------------------------------------------------------------ completions


def completion_body(
    model: str,
    choices: Sequence[Choice],
    gens: Sequence[Generation],
    tokenizer: Any,
    *,
    logprobs: bool,
    echo: Sequence[str] | None,
) -> dict[str, Any]:
    """A ``text_completion``; `echo` holds each prompt's text when the prompt is to be repeated."""
    out = []
    for c in choices:
        prefix = echo[c.prompt] if echo is not None else ""
        out.append(
            {
                "index": c.index,
                "text": prefix + c.text,
                "logprobs": completion_logprobs(tokenizer, c.tokens, len(prefix)) if logprobs else None,
                "finish_reason": c.finish_reason,
            }
        )
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": out,
        "usage": total_usage(gens, sum(c.completion_tokens for c in choices)),
    }


async def completion_stream(
    model: str,
    pieces: AsyncIterator[Piece],
    gens: Sequence[Generation],
    tokenizer: Any,
    *,
    logprobs: bool,
    echo: Sequence[str] | None,
    include_usage: bool,
) -> AsyncIterator[str]:
    """``text_completion`` chunks (echoed prompts first), usage, ``[DONE]``."""
    head = {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model}
    extra = {"usage": None} if include_usage else {}
    offsets = {g.index: 0 for g in gens}  # where each choice's next text starts (for log-prob offsets)

    def chunk(index: int, text: str, finish: str | None = None, tokens: Sequence[TokenLogprob] = ()) -> str:
        lp = completion_logprobs(tokenizer, tokens, offsets[index]) if logprobs and tokens else None
        offsets[index] += len(text)
        choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}
        return json.dumps({**head, "system_fingerprint": None, "choices": [choice], **extra})

    if echo is not None:
        for g in gens:
            yield chunk(g.index, echo[g.prompt])
    completion = 0
    async for p in pieces:
        if p.text or p.tokens or p.finish_reason is not None:
            yield chunk(p.index, p.text, p.finish_reason, p.tokens)
        if p.finish_reason is not None:
            completion += p.completion_tokens
    if include_usage:
        yield json.dumps({**head, "system_fingerprint": None, "choices": [], "usage": total_usage(gens, completion)})
    yield "[DONE]"
