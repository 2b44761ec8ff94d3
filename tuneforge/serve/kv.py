"""The running batch's key/value cache: preallocated, right-aligned rows that requests join and leave between steps.

Every row's newest token sits in the same column (``end - 1``), so one decode step writes one column for the
whole batch in place — no ``torch.cat`` of the cache per step, as transformers' ``DynamicCache`` does. Rows of
different lengths are left-padded; ``valid`` marks each row's real tokens and is the attention mask, and
``lengths`` gives each row's next position id. A newcomer is prefilled in a cache of its own and copied in
right-aligned; a finished row is replaced by the last row (one row copied, not the batch). When the write
column reaches the end of the buffer, the columns every row pads are dropped; when none are, the buffer grows.

The cache plugs into any transformers decoder through the ``Cache`` interface: each attention layer calls
``update(key, value, layer_idx)`` and gets back its keys and values so far. The model receives a ready 4-D mask,
which transformers uses as given.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotLayer(CacheLayerMixin):
    """One attention layer's keys and values, ``[rows, kv_heads, columns, head_dim]``, written at the shared column."""

    is_compileable = False

    def __init__(self, owner: SlotCache) -> None:
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, cols = self.owner.capacity
        self.keys = key_states.new_zeros(rows, key_states.shape[1], cols, key_states.shape[3])
        self.values = value_states.new_zeros(rows, value_states.shape[1], cols, value_states.shape[3])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, start, t = key_states.shape[0], self.owner.end, key_states.shape[2]
        self.keys[:b, :, start : start + t] = key_states
        self.values[:b, :, start : start + t] = value_states
        return self.keys[:b, :, : start + t], self.values[:b, :, : start + t]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.end + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.end

    def get_max_length(self) -> int:
        return self.owner.capacity[1]

    def resize(self, rows: int, cols: int, shift: int) -> None:
        """Reallocate to ``rows × cols``, keeping the used columns, moved right by ``shift``."""
        if not self.is_initialized:
            return
        used, end = self.owner.rows, self.owner.end
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(rows, old.shape[1], cols, old.shape[3])
            new[:used, :, shift : shift + end] = old[:used, :, :end]
            setattr(self, name, new)


class SlotCache(Cache):
    """The batch's cache over all layers, with the per-row bookkeeping (validity mask, lengths) that goes with it."""

    def __init__(self, num_layers: int, rows: int, cols: int, *, max_cols: int) -> None:
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])
        self.capacity = (rows, cols)
        self.max_cols = max_cols
        self.rows = 0  # rows in use: 0 … rows-1
        self.end = 0  # columns in use; the next token of every row goes in column `end`
        self.valid = torch.zeros(rows, cols, dtype=torch.bool)
        self.lengths = torch.zeros(rows, dtype=torch.long)  # real tokens per row = the next position id

    # --------------------------------------------------------------------------------------------- one step
    def decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Reserve column ``end`` for one new token of every row; the step's 4-D mask and position ids."""
        self.reserve(1)
        b = self.rows
        self.valid[:b, self.end] = True
        return self.valid[:b, None, None, : self.end + 1], self.lengths[:b, None].clone()

    def advance(self, tokens: int, *, count: bool = True) -> None:
        """After a forward of ``tokens`` new columns for every row (``count``: they are real tokens of every row;
        a prefill's lengths are set when its cache is made)."""
        self.end += tokens
        if count:
            self.lengths[: self.rows] += tokens

    # ------------------------------------------------------------------------------------------ prefilling
    @classmethod
    def for_prompts(cls, num_layers: int, prompts: list[list[int]], max_cols: int) -> tuple[SlotCache, torch.Tensor]:
        """A cache for prefilling ``prompts`` together, left-padded; returns it and the padded input ids."""
        width = max(len(p) for p in prompts)
        cache = cls(num_layers, len(prompts), width, max_cols=max(max_cols, width))
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            cache.valid[i, width - len(p) :] = True
            cache.lengths[i] = len(p)
        cache.rows = len(prompts)
        return cache, ids

    def prefill_inputs(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The 4-D causal mask and position ids for the next ``tokens`` columns of every row (a chunk of the prompt)."""
        b, start, stop = self.rows, self.end, self.end + tokens
        valid = self.valid[:b, :stop]
        causal = torch.ones(tokens, stop, dtype=torch.bool).tril(start)
        mask = causal[None] & valid[:, None, :]
        # A padding query attends to itself only: finite garbage that nothing reads, where "attend to nothing"
        # would make the softmax NaN and spread through the padded keys and values.
        diag = torch.arange(tokens)
        mask[:, diag, diag + start] = True
        first = (~valid).sum(-1, keepdim=True)  # left padding of each row
        positions = (torch.arange(start, stop)[None] - first).clamp_min(0)
        return mask[:, None], positions

    # ------------------------------------------------------------------------------------- joining, leaving
    def append(self, other: SlotCache) -> None:
        """Add ``other``'s rows (a finished prefill) after the current rows, right-aligned with them."""
        n, width = other.rows, other.end
        shift = max(0, width - self.end)  # a newcomer longer than the batch: pad every current row on the left
        if self.rows + n > self.capacity[0] or self.end + shift > self.capacity[1]:
            rows = self.capacity[0] if self.rows + n <= self.capacity[0] else max(2 * self.capacity[0], self.rows + n)
            self._resize(rows, max(self.capacity[1], self.end + shift), shift)
        elif shift:
            self._shift_right(shift)
        lo, hi, start = self.rows, self.rows + n, self.end - width
        for mine, theirs in zip(self.layers, other.layers):
            if not mine.is_initialized:
                mine.lazy_initialization(theirs.keys, theirs.values)
            mine.keys[lo:hi, :, start : self.end] = theirs.keys[:n, :, :width]
            mine.values[lo:hi, :, start : self.end] = theirs.values[:n, :, :width]
        self.valid[lo:hi] = False
        self.valid[lo:hi, start : self.end] = other.valid[:n, :width]
        self.lengths[lo:hi] = other.lengths[:n]
        self.rows = hi

    def remove(self, rows: list[int]) -> list[tuple[int, int]]:
        """Drop ``rows``; the last rows move into the holes. Returns the moves ``(from, to)`` for the caller's lists."""
        gone = set(rows)
        keep = self.rows - len(gone)
        holes = sorted(r for r in gone if r < keep)
        movers = [r for r in range(keep, self.rows) if r not in gone]
        moves = list(zip(movers, holes))
        if moves:
            src, dst = torch.tensor(movers), torch.tensor(holes)
            end = self.end
            for layer in self.layers:
                if layer.is_initialized:
                    layer.keys[dst, :, :end] = layer.keys[src, :, :end]
                    layer.values[dst, :, :end] = layer.values[src, :, :end]
            self.valid[dst] = self.valid[src]
            self.lengths[dst] = self.lengths[src]
        self.rows = keep
        if keep == 0:
            self.end = 0
        return moves

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` more columns: drop padding every row shares, else grow the buffer."""
        if self.end + tokens <= self.capacity[1]:
            return
        longest = int(self.lengths[: self.rows].max()) if self.rows else 0
        lead = self.end - longest  # columns that are padding in every row
        if lead > 0 and longest + tokens <= self.capacity[1]:
            self._shift_left(lead)
            return
        cols = min(max(self.capacity[1] * 2, longest + tokens), max(self.max_cols, longest + tokens))
        self._resize(self.capacity[0], cols, -lead)

    def _shift_right(self, shift: int) -> None:
        b, end = self.rows, self.end
        if b:
            for layer in self.layers:
                if layer.is_initialized:
                    layer.keys[:b, :, shift : shift + end] = layer.keys[:b, :, :end].clone()
                    layer.values[:b, :, shift : shift + end] = layer.values[:b, :, :end].clone()
            self.valid[:b, shift : shift + end] = self.valid[:b, :end].clone()
            self.valid[:b, :shift] = False
        self.end = end + shift

    def _shift_left(self, lead: int) -> None:
        b, end = self.rows, self.end
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys[:b, :, : end - lead] = layer.keys[:b, :, lead:end].clone()
                layer.values[:b, :, : end - lead] = layer.values[:b, :, lead:end].clone()
        self.valid[:b, : end - lead] = self.valid[:b, lead:end].clone()
        self.valid[:b, end - lead :] = False
        self.end = end - lead

    def _resize(self, rows: int, cols: int, shift: int) -> None:
        """Reallocate; ``shift`` > 0 moves the used columns right (left padding), < 0 drops leading columns."""
        if shift < 0:
            self._shift_left(-shift)
            shift = 0
        rows = max(rows, self.capacity[0])
        for layer in self.layers:
            layer.resize(rows, cols, shift)
        valid = torch.zeros(rows, cols, dtype=torch.bool)
        valid[: self.rows, shift : shift + self.end] = self.valid[: self.rows, : self.end]
        lengths = torch.zeros(rows, dtype=torch.long)
        lengths[: self.rows] = self.lengths[: self.rows]
        self.valid, self.lengths = valid, lengths
        self.capacity = (rows, cols)
        self.end += shift

    def nbytes(self) -> int:
        return sum(
            layer.keys.nbytes + layer.values.nbytes
            for layer in self.layers
            if isinstance(layer, SlotLayer) and layer.is_initialized
        )
