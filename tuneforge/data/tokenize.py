"""Many texts through a fast tokenizer, each distinct piece between control tokens encoded once.

A fast tokenizer (Hugging Face ``tokenizers``) first cuts its input at the added tokens it matches on the raw text
(leftmost-longest), then normalises, pre-tokenizes and runs the model on each piece between them *on its own*.
The encoding of a text is therefore the concatenation of its pieces' encodings, and chat data repeats most of its
pieces: the system prompt, every role header (``assistant\\n``), the line breaks between turns, short answers, and
above all each served prompt, which is the start of the sequence that trains its turn. :func:`encode_texts_ids`
encodes each distinct piece once per call and assembles the rest — the same ids and offsets as
``tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)``, for a fraction of the work.

The pipeline sees a piece's position only through its offset in the original text (``Metaspace`` with
``prepend_scheme: first`` prepends only at offset 0), so a piece is encoded behind the control token that precedes
it, as in the text: the unit is a *chunk*, a control token and the piece after it. Where a piece's boundaries could depend on more than the raw
characters — an added token that strips spaces around it or needs word boundaries — every text is encoded whole.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np

Encoded = tuple[np.ndarray, np.ndarray]  # ids (int32), offsets (tokens × 2, int64: character ranges in the text)


def encode_texts_ids(tokenizer: Any, texts: Sequence[str]) -> list[Encoded]:
    """``(ids, offsets)`` of each text, as the fast tokenizer encodes it without special tokens (see the module).

    The arrays returned are views into two arrays shared by the whole call."""
    cuts = control_tokens(tokenizer)
    if not cuts:
        return [_arrays(e) for e in _encode(tokenizer, list(texts))]
    # Each text as chunks that start at a control token (the first may not): a chunk's tokens are the text's there.
    alternatives = "|".join(re.escape(c) for c in sorted(cuts, key=len, reverse=True))  # longest first, as matched
    split = re.compile(f"(?={alternatives})").split
    index: dict[str, int] = {}
    occurrences: list[int] = []
    at: list[int] = []  # character where each occurrence starts
    per_text: list[int] = []
    for text in texts:
        pos, n = 0, 0
        for chunk in split(text):
            if chunk:
                occurrences.append(index.setdefault(chunk, len(index)))
                at.append(pos)
                pos += len(chunk)
                n += 1
        per_text.append(n)
    parts = _encode_chunks(tokenizer, list(index), cuts, re.compile(alternatives))
    if parts is None:  # this tokenizer does not cut where the module assumes: encode every text whole
        return [_arrays(e) for e in _encode(tokenizer, list(texts))]
    part_ids, part_offsets, part_start, part_len = parts
    # Token t of occurrence k is token t of its chunk: one gather for every text at once.
    occ = np.asarray(occurrences, dtype=np.int64)
    lens = part_len[occ]
    out_start = np.cumsum(lens) - lens
    gather = np.repeat(part_start[occ] - out_start, lens) + np.arange(int(lens.sum()))
    ids = part_ids[gather]
    offsets = part_offsets[gather] + np.repeat(np.asarray(at, dtype=np.int64), lens)[:, None]
    bounds = np.concatenate([[0], np.cumsum(lens)])[np.concatenate([[0], np.cumsum(per_text)])]
    return [(ids[a:b], offsets[a:b]) for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]


def _encode_chunks(
    tokenizer: Any, chunks: list[str], cuts: dict[str, int], leading: re.Pattern
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Each distinct chunk encoded once, concatenated: ids, offsets (in the chunk), each chunk's start and length;
    None if a chunk that starts with a control token does not encode to that token first."""
    encodings = _encode(tokenizer, chunks)
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    starts = np.cumsum(lengths) - lengths
    ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=int(lengths.sum()))
    flat = chain.from_iterable(chain.from_iterable(e.offsets for e in encodings))
    offsets = np.fromiter(flat, dtype=np.int64, count=2 * len(ids)).reshape(-1, 2)
    for k, chunk in enumerate(chunks):  # the module's premise, checked on every distinct chunk
        m = leading.match(chunk)
        if m is not None:
            first = int(starts[k])
            if not lengths[k] or ids[first] != cuts[m.group()] or offsets[first, 1] != m.end() or offsets[first, 0]:
                return None
    return ids, offsets, starts, lengths


def control_tokens(tokenizer: Any) -> dict[str, int]:
    """The added tokens a fast tokenizer cuts its input at (content → id), or none when some added token's match
    depends on its neighbours (``lstrip``, ``rstrip``, ``single_word``): then pieces are not independent."""
    added = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    if any(t.lstrip or t.rstrip or t.single_word for t in added.values()):
        return {}
    return {t.content: i for i, t in added.items() if not t.normalized and t.content}


def _encode(tokenizer: Any, texts: list[str]) -> list[Any]:
    """The Rust tokenizer's encodings of `texts`, as ``tokenizer(texts, add_special_tokens=False)`` computes them."""
    if not texts:
        return []
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()  # what transformers sets before every call that asks for neither
    backend.no_padding()
    return backend.encode_batch(texts, add_special_tokens=False)


def _arrays(e: Any) -> Encoded:
    return np.asarray(e.ids, dtype=np.int32), np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)
