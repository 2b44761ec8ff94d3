"""Per-row vocabulary tables: adapters that train the embedding (PEFT ``modules_to_save``) in a shared batch.

A LoRA adapter may carry its own input embedding table and LM head (``modules_to_save=["embed_tokens"]``;
with a tied head PEFT's ``ensure_weight_tying`` keeps the head tied to the trained embedding). Copying the
base per adapter would defeat serving one base, and these tables are whole ``[vocab, hidden]`` matrices, so
they are not gathered per row like LoRA's ``A``/``B``: the rows of the batch are grouped by adapter (a batch
mixes few adapters), the base computes every other row, and each adapter's rows are looked up in (or
projected onto) its own table. A batch whose adapters have no tables costs nothing more.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.serve.lora import RowSlots

KEPT_GROUPINGS = 3  # batch compositions whose row groups are kept (the decode batch, a prefill, a spare)


def vocab_names(model: nn.Module) -> tuple[str | None, str | None]:
    """The paths of the model's input embedding and LM head modules (None where it has none)."""
    found = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return found.get(id(model.get_input_embeddings())), None if head is None else found.get(id(head))


class VocabTables:
    """The embedding tables and LM heads of the resident adapters that have them, by slot.

    The model's embedding and head are wrapped when the first adapter with a table arrives, so a base served
    without such adapters runs exactly as before.
    """

    def __init__(self, model: nn.Module, rows: RowSlots) -> None:
        self.model, self.rows = model, rows
        self.embed: dict[int, torch.Tensor] = {}  # slot → [vocab, hidden]
        self.head: dict[int, torch.Tensor] = {}  # slot → [vocab, hidden]; may be the same tensor as embed
        self._groups: OrderedDict[tuple[int, str], Grouping | None] = OrderedDict()

    def put(self, slot: int, embed: torch.Tensor | None, head: torch.Tensor | None) -> None:
        """Tables of the adapter in ``slot`` (``head`` may be ``embed`` itself: a tied head is stored once)."""
        self.clear(slot)
        if embed is None and head is None:
            return
        self._wrap()
        dtype = self.model.get_input_embeddings().weight.dtype
        tied = head is embed
        if embed is not None:
            self.embed[slot] = embed.to(dtype)
        if head is not None:
            self.head[slot] = self.embed[slot] if tied else head.to(dtype)
        self._groups.clear()

    def clear(self, slot: int) -> None:
        self.embed.pop(slot, None)
        self.head.pop(slot, None)
        self._groups.clear()

    def _wrap(self) -> None:
        embed_name, head_name = vocab_names(self.model)
        for name, kind in ((embed_name, RowEmbedding), (head_name, RowHead)):
            if name is None:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            module = getattr(parent, child)
            if not isinstance(module, kind):
                setattr(parent, child, kind(module, self))

    def nbytes(self) -> int:
        tables = {id(t): t for t in [*self.embed.values(), *self.head.values()]}
        return sum(t.nbytes for t in tables.values())

    def grouping(self, kind: str) -> Grouping | None:
        """The current batch's rows grouped by their adapter's ``kind`` table; None when no row has one."""
        rows = self.rows
        key = (rows.key, kind)
        if key in self._groups:
            return self._groups[key]
        which = self.embed if kind == "embed" else self.head
        by_slot: dict[int, list[int]] = {}
        rest = []
        for i, s in enumerate(rows.slots):
            if s in which:
                by_slot.setdefault(s, []).append(i)
            else:
                rest.append(i)
        out = None
        if by_slot:
            groups = [(torch.tensor(idx, dtype=torch.long), which[s]) for s, idx in by_slot.items()]
            out = Grouping(groups, torch.tensor(rest, dtype=torch.long))
        self._groups[key] = out
        while len(self._groups) > 2 * KEPT_GROUPINGS:  # two kinds of table per composition
            self._groups.popitem(last=False)
        return out


@dataclass(frozen=True)
class Grouping:
    """Rows of a batch by table: ``(rows, table)`` per adapter that has one, and the rows the base computes."""

    groups: list[tuple[torch.Tensor, torch.Tensor]]
    rest: torch.Tensor


class RowEmbedding(nn.Module):
    """The model's input embedding (kept as ``base``); rows of adapters with their own table look it up there."""

    keeps_base = True  # see lora.unwrap

    def __init__(self, base: nn.Embedding, tables: VocabTables) -> None:
        super().__init__()
        self.base, self.tables = base, tables
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tables, s = self.tables, self.tables.rows.uniform
        if s is not None:
            table = tables.embed.get(s)
            return self.base(ids) if table is None else F.embedding(ids, table)
        grouping = tables.grouping("embed")
        out = self.base(ids)  # a lookup: cheap enough to do for every row and overwrite the adapters' rows
        if grouping is not None:
            for rows, table in grouping.groups:
                out.index_copy_(0, rows, F.embedding(ids.index_select(0, rows), table))
        return out


class RowHead(nn.Module):
    """The model's LM head (kept as ``base``); rows of adapters with their own head (or tied embedding) use it."""

    keeps_base = True

    def __init__(self, base: nn.Module, tables: VocabTables) -> None:
        super().__init__()
        self.base, self.tables = base, tables
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        tables, s = self.tables, self.tables.rows.uniform
        bias = self.base.bias
        if s is not None:
            table = tables.head.get(s)
            return self.base(hidden) if table is None else F.linear(hidden, table, bias)
        grouping = tables.grouping("head")
        if grouping is None:
            return self.base(hidden)
        if type(self.base) is nn.Linear:  # a plain head: each row goes through one head only
            out = hidden.new_empty(*hidden.shape[:-1], self.out_features)
            if len(grouping.rest):
                out.index_copy_(0, grouping.rest, self.base(hidden.index_select(0, grouping.rest)))
        else:  # a head that carries LoRA gathers its deltas for the whole batch: run it on every row
            out = self.base(hidden)
        for rows, table in grouping.groups:
            out.index_copy_(0, rows, F.linear(hidden.index_select(0, rows), table, bias))
        return out
