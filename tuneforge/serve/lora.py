"""Many LoRA adapters in one forward pass: each targeted ``nn.Linear`` adds a per-row low-rank delta.

The idea of BGMV/SGMV (S-LoRA, Punica) in plain PyTorch: every adapted layer keeps the loaded adapters'
matrices stacked in *slots* (``A`` as ``[slots, in, r]``, ``B`` scaled as ``[slots, r, out]``; ranks padded
with zeros to the largest), so rows for different adapters — and rows for the base, whose slot is empty —
share one batched matmul instead of one pass per adapter. The batch's rows are grouped by adapter: each
layer gathers the stacks of the batch's *adapters* (not one copy per row: at decode time reading those
copies is most of what LoRA costs), the rows go through ``bmm`` group by group (padded to the largest group)
and come back in place. When every row has its own adapter, or rows of one adapter sit together in groups of
one size, no row moves and a step costs two ``bmm`` per layer. The grouping is worked out once per batch
composition for all layers; a layer gathers again only when the batch's set of adapters changes, not when
requests join or leave (a few sets are kept, as the engine alternates a newcomers' prefill with decode).
The engine admits newcomers side by side in slot order, so a batch that started together is laid out in
place.

DoRA works too: its output is ``bias + m ⊙ (x Wᵀ + s·x Aᵀ Bᵀ)`` with ``m = magnitude / ‖W + s·B A‖`` per output
feature, a vector per adapter computed once when the adapter is installed (inference detaches the norm, as
PEFT does).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

KEPT = 3  # groupings and gathered stacks kept: the decode batch's, a prefill's, a spare


@dataclass(frozen=True)
class LayerDelta:
    """One adapter's update of one layer: ``y += scale · (x Aᵀ) Bᵀ``; ``magnitude`` for DoRA."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float
    magnitude: torch.Tensor | None = None  # [out]


@dataclass
class RowSlots:
    """Which slot each row of the current forward reads, shared by every adapted layer of the model."""

    slots: list[int] = field(default_factory=list)
    index: torch.Tensor | None = None  # slots as a tensor; None when every row uses the same slot
    uniform: int | None = 0  # the one slot of every row, or None when rows differ
    key: int = 0  # one per composition and weights (a composition seen lately gets its key back)
    groups: Grouping | None = None  # the rows by adapter, when they differ


@dataclass(frozen=True)
class Grouping:
    """A batch's rows by adapter: ``order`` the adapters' slots (ascending), ``width`` the largest group.

    Group ``g`` takes positions ``g·width …`` of the padded layout; ``pad`` is the row at each position (a
    group's spare positions repeat one of its rows). The results of positions ``keep`` (None: all of them) are
    added to rows ``dest``. Rows of the base (slot 0) are left out unless that makes the layout the batch itself
    (``moves`` False: every group as wide, each in consecutive rows, in slot order — the engine admits
    newcomers so), where no row has to move at all.
    """

    order: tuple[int, ...]
    width: int
    pad: torch.Tensor
    keep: torch.Tensor | None
    dest: torch.Tensor
    moves: bool

    @classmethod
    def of(cls, slots: list[int]) -> Grouping:
        grouping = cls._layout(slots, with_base=True)
        return grouping if not grouping.moves or 0 not in slots else cls._layout(slots, with_base=False)

    @classmethod
    def _layout(cls, slots: list[int], with_base: bool) -> Grouping:
        members: dict[int, list[int]] = {}
        for i, s in enumerate(slots):
            if s or with_base:
                members.setdefault(s, []).append(i)
        width = max(len(m) for m in members.values())
        pad: list[int] = []
        keep: list[int] = []
        dest: list[int] = []
        members = {s: members[s] for s in sorted(members)}  # one order per set of adapters: one gather
        for g, rows in enumerate(members.values()):
            keep += range(g * width, g * width + len(rows))
            dest += rows
            pad += rows + [rows[0]] * (width - len(rows))
        moves = pad != list(range(len(slots)))
        padded = len(keep) < len(pad)
        return cls(
            tuple(members), width, torch.tensor(pad), torch.tensor(keep) if padded else None, torch.tensor(dest), moves
        )


class MultiLoraLinear(nn.Module):
    """``base(x)`` plus each row's adapter delta; wraps the model's own ``nn.Linear`` (its weights are not copied)."""

    keeps_base = True  # see unwrap

    def __init__(self, base: nn.Linear, rows: RowSlots, slots: int, rank: int) -> None:
        super().__init__()
        self.base = base
        self.rows = rows
        w = base.weight
        self.a_t = w.new_zeros(slots, base.in_features, rank)
        self.b_t = w.new_zeros(slots, rank, base.out_features)
        self.mag = w.new_ones(slots, base.out_features)
        self.used = [False] * slots  # slots holding an adapter that adapts this layer
        self.dora = [False] * slots
        # The stacks of a batch's adapters, by their order; per-row DoRA scales, by composition key.
        self._stacks: OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor] | None] = OrderedDict()
        self._mags: OrderedDict[int, torch.Tensor | None] = OrderedDict()

    @property
    def rank(self) -> int:
        return self.a_t.shape[2]

    def resize(self, slots: int, rank: int) -> None:
        """Grow to ``slots`` slots of rank ``rank`` (zero padding changes no result)."""
        old_s, old_r = self.a_t.shape[0], self.rank
        slots, rank = max(slots, old_s), max(rank, old_r)
        if (slots, rank) == (old_s, old_r):
            return
        a_t = self.a_t.new_zeros(slots, self.base.in_features, rank)
        b_t = self.b_t.new_zeros(slots, rank, self.base.out_features)
        a_t[:old_s, :, :old_r] = self.a_t
        b_t[:old_s, :old_r] = self.b_t
        mag = self.mag.new_ones(slots, self.base.out_features)
        mag[:old_s] = self.mag
        self.a_t, self.b_t, self.mag = a_t, b_t, mag
        self.used += [False] * (slots - old_s)
        self.dora += [False] * (slots - old_s)
        self._stacks.clear()
        self._mags.clear()

    def put(self, slot: int, delta: LayerDelta) -> None:
        """Write an adapter into ``slot``; the scale is folded into ``B``."""
        r = delta.a.shape[0]
        self.resize(slot + 1, r)
        dtype = self.a_t.dtype
        self.a_t[slot].zero_()
        self.b_t[slot].zero_()
        self.a_t[slot, :, :r] = delta.a.t().to(dtype)
        self.b_t[slot, :r] = (delta.b.t().float() * delta.scale).to(dtype)
        self.mag[slot] = 1.0
        if delta.magnitude is not None:
            self.mag[slot] = self._dora_scale(delta).to(dtype)
        self.used[slot] = True
        self.dora[slot] = delta.magnitude is not None
        self._stacks.clear()
        self._mags.clear()

    def clear(self, slot: int) -> None:
        if slot < len(self.used) and self.used[slot]:
            self.a_t[slot].zero_()
            self.b_t[slot].zero_()
            self.mag[slot] = 1.0
            self.used[slot] = self.dora[slot] = False
            self._stacks.clear()
        self._mags.clear()

    def _dora_scale(self, delta: LayerDelta) -> torch.Tensor:
        """``magnitude / ‖W + s·B A‖`` per output feature, in fp32."""
        w = self.base.weight.float()
        merged = w + delta.scale * (delta.b.float() @ delta.a.float())
        return delta.magnitude.float() / torch.linalg.norm(merged, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The base layer's weights called directly, and the delta added in place: at decode time a step is
        # dozens of tiny ops per layer, where the calls themselves cost as much as the arithmetic.
        y = F.linear(x, self.base.weight, self.base.bias)
        rows = self.rows
        s = rows.uniform
        if s is not None:
            if not self.used[s]:
                return y
            y += (x @ self.a_t[s]) @ self.b_t[s]
            return self._apply_dora(y, self.mag[s]) if self.dora[s] else y
        groups = rows.groups
        stacks = self._stacks.get(groups.order, False)
        if stacks is False:
            stacks = self._gather(groups.order)
        if stacks is None:
            return y  # no row of this batch has an adapter for this layer
        a_t, b_t = stacks
        n, k, out = len(rows.slots), len(groups.order), y.shape[-1]
        x3, y3 = x.reshape(n, -1, x.shape[-1]), y.view(n, -1, out)
        if groups.moves:  # rows to their group's positions, through the group's adapter, and back
            h = torch.bmm(x3.index_select(0, groups.pad).view(k, -1, x.shape[-1]), a_t)
            delta = torch.bmm(h, b_t).view(k * groups.width, -1, out)
            y3.index_add_(0, groups.dest, delta if groups.keep is None else delta.index_select(0, groups.keep))
        else:
            y3.view(k, -1, out).baddbmm_(torch.bmm(x3.reshape(k, -1, x.shape[-1]), a_t), b_t)
        mag = self._mags.get(rows.key, False)
        if mag is False:
            mag = self._mag_rows(rows)
        if mag is not None:
            y = self._apply_dora(y3, mag[:, None, :]).view(y.shape)
        return y

    def _gather(self, order: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stacks of the adapters in ``order``, one per adapter (None when none adapts this layer)."""
        stacks = None
        if any(self.used[s] for s in order):
            idx = torch.tensor(order)
            stacks = self.a_t.index_select(0, idx), self.b_t.index_select(0, idx)
        self._stacks[order] = stacks
        while len(self._stacks) > KEPT:
            self._stacks.popitem(last=False)
        return stacks

    def _mag_rows(self, rows: RowSlots) -> torch.Tensor | None:
        """Each row's DoRA scales (a vector per row: small), or None when no row's adapter is DoRA here."""
        mag = self.mag.index_select(0, rows.index) if any(self.dora[s] for s in rows.slots) else None
        self._mags[rows.key] = mag
        while len(self._mags) > KEPT:
            self._mags.popitem(last=False)
        return mag

    def _apply_dora(self, y: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
        bias = self.base.bias
        return mag * y if bias is None else bias + mag * (y - bias)


class LoraBank:
    """The adapter slots of one model: which layers are adapted, which slot holds what, what each row reads.

    Slot 0 stays empty: it is what rows for the base model read.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.rows = RowSlots()
        self.layers: dict[str, MultiLoraLinear] = {}
        self.free: list[int] = []
        self.slots = 1  # slot 0: the base
        self._key = 0
        self._recent: OrderedDict[tuple[int, ...], tuple[int, Grouping | None]] = OrderedDict()  # newest last

    def install(self, deltas: dict[str, LayerDelta]) -> int:
        """Put one adapter's layers into a free slot; returns the slot."""
        slot = self.free.pop() if self.free else self._new_slot()
        for layer in self.layers.values():
            layer.resize(self.slots, 1)  # every layer has every slot, so a row's slot indexes any layer
        for name, delta in deltas.items():
            layer = self.layers.get(name) or self._wrap(name)
            layer.put(slot, delta)
        self._touch()
        return slot

    def release(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear(slot)
        self.free.append(slot)
        self._touch()

    def use(self, slots: list[int]) -> None:
        """Set the slot of every row of the next forward (a no-op when it is what the last forward used)."""
        rows = self.rows
        if slots == rows.slots:
            return
        rows.slots = list(slots)
        rows.uniform = slots[0] if slots and all(s == slots[0] for s in slots) else None
        rows.index = None if rows.uniform is not None else torch.tensor(slots, dtype=torch.long)
        composition = tuple(slots)
        seen = self._recent.get(composition)
        if seen is None:  # a prefill chunk between decode steps comes back to the decode batch's grouping
            self._key += 1
            seen = self._recent[composition] = (self._key, None if rows.uniform is not None else Grouping.of(slots))
            while len(self._recent) > KEPT:
                self._recent.popitem(last=False)
        self._recent.move_to_end(composition)
        rows.key, rows.groups = seen

    def nbytes(self) -> int:
        """Memory of the slot stacks (all slots, padded ranks)."""
        return sum(layer.a_t.nbytes + layer.b_t.nbytes + layer.mag.nbytes for layer in self.layers.values())

    def _new_slot(self) -> int:
        slot = self.slots
        self.slots += 1
        return slot

    def _touch(self) -> None:
        """Weights changed: every layer gathers again before the next forward."""
        self._recent.clear()
        self._key += 1
        self.rows.key = self._key
        if self.rows.slots:
            self._recent[tuple(self.rows.slots)] = (self._key, self.rows.groups)

    def _wrap(self, name: str) -> MultiLoraLinear:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        base = getattr(parent, child)
        while getattr(base, "keeps_base", False):  # another serving wrapper (vocab.py's head): wrap what it keeps
            parent, child, base = base, "base", base.base
        layer = MultiLoraLinear(base, self.rows, self.slots, 1)
        setattr(parent, child, layer)
        self.layers[name] = layer
        return layer


def base_linear(model: nn.Module, name: str) -> nn.Module | None:
    """The model's own layer called ``name`` (inside its wrapper once adapted), or None if there is none."""
    try:
        return unwrap(model.get_submodule(name))
    except AttributeError:
        return None


def unwrap(module: nn.Module) -> nn.Module:
    """The model's own module inside the serving wrappers, which keep it as ``base`` (and say so: ``keeps_base``)."""
    while getattr(module, "keeps_base", False):
        module = module.base
    return module
