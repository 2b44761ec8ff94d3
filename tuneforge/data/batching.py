"""Rows of examples → model inputs, with no attention across packed documents.

Labels are shifted *per document* (``labels[t]`` is the token the model must predict at ``t``), so the
last token of one document never learns to predict the first of the next. Position ids restart at 0 for
each document; with no attention mask, transformers turns restarting positions into a block-diagonal
causal mask, so packed documents cannot attend to each other. Rows holding one document keep plain
positions and take the fast causal kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tuneforge.data.token_cache import TokenizedSource

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64
    position_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64, IGNORE where no loss
    num_tokens: int  # tokens fed to the model (without padding)

    def to(self, device: torch.device | str) -> Batch:
        nb = str(device) != "cpu"
        return Batch(
            self.input_ids.to(device, non_blocking=nb),
            self.position_ids.to(device, non_blocking=nb),
            self.labels.to(device, non_blocking=nb),
            self.num_tokens,
        )


def collate(
    rows: Sequence[np.ndarray], sources: Sequence[TokenizedSource], pad_id: int, pad_to: int | None = None
) -> Batch:
    """Build a batch from rows of ``(source, example)`` refs; pads to `pad_to` or the longest row."""
    docs = [[sources[s].example(i) for s, i in row] for row in rows]
    row_lens = [sum(len(ids) for ids, _ in row) for row in docs]
    width = pad_to or max(row_lens)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
    pos = np.tile(np.arange(width, dtype=np.int64), (len(rows), 1))
    for r, row in enumerate(docs):
        at = 0
        for doc_ids, doc_mask in row:
            n = len(doc_ids)
            ids[r, at : at + n] = doc_ids
            if n > 1:
                target = np.where(doc_mask[1:] > 0, doc_ids[1:], IGNORE)
                labels[r, at : at + n - 1] = target
            if len(row) > 1:
                pos[r, at : at + n] = np.arange(n)
            at += n
        if len(row) > 1 and at < width:
            pos[r, at:] = np.arange(width - at)  # padding is its own "document"
    return Batch(torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(labels), int(sum(row_lens)))
