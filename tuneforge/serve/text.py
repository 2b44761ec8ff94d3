"""Generated tokens → text as it streams: incremental detokenization, stop strings, per-token log-probs.

A token's text is only known in context: a byte-level BPE token can end in the middle of a UTF-8 character,
and SentencePiece drops or keeps a leading space depending on what came before. So text is decoded over a
short window — the tokens since the last emitted piece plus the one before them for context — and nothing is
emitted while the window ends in an incomplete character (the replacement character ``\\ufffd``). The pieces
joined are the decoding of the whole completion.

Stop strings are matched on that text. Text that could be the start of a stop string is held back until the
next tokens decide, so no client ever sees part of a stop string; on a match the caller stops iterating the
engine, which frees the request's slot at once.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

INCOMPLETE = "\ufffd"


class Detokenizer:
    """Text of a growing token sequence, one piece per call (empty while a character is incomplete)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # first token of the decoding window (context for the next piece)
        self.read = 0  # tokens whose text has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith(INCOMPLETE):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """The text still held back at the end (an incomplete character stays a replacement character)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


class StopMatcher:
    """Holds text back while it could still become a stop string; reports the first match."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0  # characters of `text` already released
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add `piece`; return the text safe to release now (up to the stop string, if one matched)."""
        self.text += piece
        hits = [i for s in self.stops if (i := self.text.find(s, self.sent)) != -1]
        if hits:
            cut = min(hits)
            out, self.sent, self.stopped = self.text[self.sent : cut], cut, True
            return out
        hold = max(
            (k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])),
            default=0,
        )
        safe = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent : safe], safe
        return out

    def flush(self) -> str:
        """What was held back, once generation has ended without a match."""
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability and the most likely alternatives (ids)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Piece:
    """What one choice releases at once: text, the tokens behind it, and the finish reason on the last one."""

    index: int
    text: str
    tokens: list[TokenLogprob]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class ChoiceText:
    """A choice's token events → :class:`Piece` values: detokenized, stop strings applied, log-probs aligned."""

    def __init__(self, index: int, tokenizer: Any, stops: Sequence[str], stop_token_ids: Sequence[int]) -> None:
        self.index = index
        self.detok = Detokenizer(tokenizer)
        self.stops = StopMatcher(stops)
        self.stop_token_ids = set(stop_token_ids)
        self.pending: list[TokenLogprob] = []  # tokens whose text is not released yet
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def push(self, event: Any) -> Piece | None:
        """One engine :class:`TokenEvent`; a piece when there is something to release (always on the last one)."""
        self.prompt_tokens, self.completion_tokens = event.prompt_tokens, event.completion_tokens
        finish = event.finish_reason
        text = ""
        # A stop token ends the turn; its text (eos, end-of-turn) is never shown.
        if event.token_id is not None and not (finish == "stop" and event.token_id in self.stop_token_ids):
            if event.logprob is not None:
                self.pending.append(TokenLogprob(event.token_id, event.logprob, list(event.top_logprobs or [])))
            text = self.stops.feed(self.detok.push(event.token_id))
        if self.stops.stopped:
            finish = "stop"
        elif finish is not None:
            text += self.stops.feed(self.detok.flush())
            text += "" if self.stops.stopped else self.stops.flush()
            if self.stops.stopped:
                finish = "stop"
        if not text and finish is None:
            return None
        tokens, self.pending = self.pending, []
        return Piece(self.index, text, tokens, finish, self.prompt_tokens, self.completion_tokens)

    @property
    def stopped(self) -> bool:
        return self.stops.stopped


def token_text(tokenizer: Any, token_id: int) -> str:
    """A token's own text, as OpenAI's log-probs show it (special tokens included)."""
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


@functools.cache
def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each of the 256 bytes, inverted (GPT-2, Llama 3, Qwen…)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece's byte fallback


def token_bytes(tokenizer: Any, token_id: int) -> list[int]:
    """A token's exact bytes — a token can hold part of a UTF-8 character, which its text cannot show."""
    if token_id in (getattr(tokenizer, "added_tokens_decoder", None) or {}):  # control tokens are their text
        return list(token_text(tokenizer, token_id).encode())
    piece = tokenizer.convert_ids_to_tokens(token_id)
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if isinstance(piece, str) and type(decoder).__name__ == "ByteLevel":
        alphabet = _byte_alphabet()
        if all(c in alphabet for c in piece):
            return [alphabet[c] for c in piece]
    if isinstance(piece, str) and (match := _BYTE_TOKEN.match(piece)):
        return [int(match.group(1), 16)]
    return list(token_text(tokenizer, token_id).encode())


def chat_logprobs(tokenizer: Any, tokens: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """``choices[].logprobs.content`` of a chat completion (``ChatCompletionTokenLogprob`` objects)."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": token_text(tokenizer, token_id), "bytes": token_bytes(tokenizer, token_id), "logprob": logprob}

    return [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in tokens]


def completion_logprobs(tokenizer: Any, tokens: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    """``choices[].logprobs`` of a text completion; `offset` is where the first token's text starts.

    A token's offset is the length of the text of the tokens before it, decoded together (a token that
    completes a character starts where that character does)."""
    texts = [token_text(tokenizer, t.token_id) for t in tokens]
    ids = [t.token_id for t in tokens]
    offsets = [
        offset
        + len(
            tokenizer.decode(ids[:i], skip_special_tokens=True, clean_up_tokenization_spaces=False).rstrip(INCOMPLETE)
        )
        for i in range(len(ids))
    ]
    return {
        "tokens": texts,
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{token_text(tokenizer, i): lp for i, lp in t.top} for t in tokens],
        "text_offset": offsets,
    }
