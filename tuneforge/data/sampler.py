"""The training plan: which samples every optimizer step sees, decided before step one.

Every packed row (a "sample") has a global index; step ``s`` takes rows ``[s·G, (s+1)·G)`` where ``G`` is
the global batch size. The plan is a pure function of (data, seed, lengths, batch), so resuming at step
``s`` is exact, replicas can split a step's rows any way they like without skipping or repeating one, and
the realised mixing ratio is known before training starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tuneforge.data.mixing import MixReport, mixture_stream
from tuneforge.data.token_cache import TokenizedSource


@dataclass
class Plan:
    """Rows of (source, example) references, grouped into steps of `global_batch_size` rows."""

    refs: np.ndarray  # (n_refs, 2) int64: source, example
    row_offsets: np.ndarray  # (n_rows + 1,) int64 into refs
    row_tokens: np.ndarray  # (n_rows,) supervised (predicted) tokens per row
    global_batch_size: int
    num_steps: int
    mix: MixReport

    def rows_for_step(self, step: int) -> range:
        g = self.global_batch_size
        return range(step * g, (step + 1) * g)

    def row(self, r: int) -> np.ndarray:
        return self.refs[self.row_offsets[r] : self.row_offsets[r + 1]]

    def step_tokens(self, step: int) -> int:
        rows = self.rows_for_step(step)
        return int(self.row_tokens[rows.start : rows.stop].sum())

    @property
    def total_tokens(self) -> int:
        return int(self.row_tokens[: self.num_steps * self.global_batch_size].sum())


def build_plan(
    sources: Sequence[TokenizedSource],
    weights: Sequence[float],
    *,
    mix_by: str,
    seed: int,
    max_length: int,
    packing: bool,
    global_batch_size: int,
    epochs: float,
    max_steps: int | None,
) -> Plan:
    """Stream the mixture, pack it into rows, and stop after `max_steps` steps or `epochs` passes of source 0."""
    supervised = [s.supervised_counts() for s in sources]
    lengths = [s.lengths for s in sources]
    costs = supervised if mix_by == "tokens" else [np.ones(len(s), dtype=np.int64) for s in sources]
    g = global_batch_size
    need_rows = max_steps * g if max_steps else None
    primary_quota = max(1, round(epochs * len(sources[0])))
    mix = MixReport(
        names=[s.name for s in sources],
        target=(np.asarray(weights) / np.sum(weights)).tolist(),
        mix_by=mix_by,
        tokens=[0] * len(sources),
        examples=[0] * len(sources),
    )

    refs: list[tuple[int, int]] = []
    row_offsets = [0]
    row_tokens: list[int] = []
    cur_len = cur_tok = primary_seen = 0
    for s, i, _ in mixture_stream(costs, weights, seed):
        length = int(lengths[s][i])
        if refs and (not packing or cur_len + length > max_length):
            row_offsets.append(len(refs))
            row_tokens.append(cur_tok)
            cur_len = cur_tok = 0
        if need_rows is not None and len(row_tokens) >= need_rows:
            break
        refs.append((s, i))
        cur_len += length
        cur_tok += int(supervised[s][i])
        mix.examples[s] += 1
        mix.tokens[s] += int(supervised[s][i])
        primary_seen += s == 0
        if need_rows is None and primary_seen >= primary_quota:
            # Epoch-based runs end on a step boundary, so no row is dropped or padded.
            need_rows = -(-(len(row_tokens) + 1) // g) * g
    if cur_len:
        row_offsets.append(len(refs))
        row_tokens.append(cur_tok)
    assert need_rows is not None and len(row_tokens) == need_rows
    mix.passes = [ex / max(len(src), 1) for ex, src in zip(mix.examples, sources)]
    return Plan(
        np.asarray(refs, dtype=np.int64).reshape(-1, 2),
        np.asarray(row_offsets, dtype=np.int64),
        np.asarray(row_tokens, dtype=np.int64),
        g,
        need_rows // g,
        mix,
    )
