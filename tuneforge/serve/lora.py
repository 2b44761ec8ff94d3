"""Many LoRA adapters in one forward pass: each targeted ``nn.Linear`` adds a per-row low-rank delta.

The idea of BGMV/S-LoRA in plain PyTorch: every adapted layer keeps the loaded adapters' matrices stacked in
*slots* (``A`` as ``[slots, in, r]``, ``B`` scaled as ``[slots, r, out]``; ranks padded with zeros to the
largest), and a forward gathers each row's slot, so rows for different adapters — and rows for the base,
whose slot is empty — share one batched matmul instead of one pass per adapter. The gathered rows are kept
until the batch's composition changes (requests join or leave), so a decode step costs two ``bmm`` per layer.

DoRA works too: its output is ``bias + m ⊙ (x Wᵀ + s·x Aᵀ Bᵀ)`` with ``m = magnitude / ‖W + s·B A‖`` per output
feature, a vector per adapter computed once when the adapter is installed (inference detaches the norm, as
PEFT does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


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
    key: int = 0  # changes whenever slots (or the weights in them) change


class MultiLoraLinear(nn.Module):
    """``base(x)`` plus each row's adapter delta; wraps the model's own ``nn.Linear`` (its weights are not copied)."""

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
        self._key = -1
        self._gathered: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

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
        self._key = -1

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
        self._key = -1

    def clear(self, slot: int) -> None:
        if slot < len(self.used) and self.used[slot]:
            self.a_t[slot].zero_()
            self.b_t[slot].zero_()
            self.mag[slot] = 1.0
            self.used[slot] = self.dora[slot] = False
            self._key = -1

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
        if rows.key != self._key:
            self._gather(rows)
        if self._gathered is None:
            return y  # no row of this batch has an adapter for this layer
        a_t, b_t, mag = self._gathered
        n = a_t.shape[0]
        y3 = y.view(n, -1, y.shape[-1])
        y3.baddbmm_(torch.bmm(x.reshape(n, -1, x.shape[-1]), a_t), b_t)
        if mag is not None:
            y = self._apply_dora(y3, mag[:, None, :]).view(y.shape)
        return y

    def _gather(self, rows: RowSlots) -> None:
        self._key = rows.key
        if not any(self.used[s] for s in rows.slots):
            self._gathered = None
            return
        idx = rows.index
        mag = self.mag.index_select(0, idx) if any(self.dora[s] for s in rows.slots) else None
        self._gathered = (self.a_t.index_select(0, idx), self.b_t.index_select(0, idx), mag)

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
        if slots == self.rows.slots:
            return
        uniform = slots[0] if slots and all(s == slots[0] for s in slots) else None
        self._key += 1
        self.rows.slots = list(slots)
        self.rows.uniform = uniform
        self.rows.index = None if uniform is not None else torch.tensor(slots, dtype=torch.long)
        self.rows.key = self._key

    def nbytes(self) -> int:
        """Memory of the slot stacks (all slots, padded ranks)."""
        return sum(layer.a_t.nbytes + layer.b_t.nbytes + layer.mag.nbytes for layer in self.layers.values())

    def _new_slot(self) -> int:
        slot = self.slots
        self.slots += 1
        return slot

    def _touch(self) -> None:
        """Weights changed: every layer gathers again before the next forward."""
        self._key += 1
        self.rows.key = self._key

    def _wrap(self, name: str) -> MultiLoraLinear:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        base = getattr(parent, child)
        layer = MultiLoraLinear(base, self.rows, self.slots, 1)
        setattr(parent, child, layer)
        self.layers[name] = layer
        return layer


def base_linear(model: nn.Module, name: str) -> nn.Module | None:
    """The model's own layer called ``name`` (inside its wrapper once adapted), or None if there is none."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return module.base if isinstance(module, MultiLoraLinear) else module
