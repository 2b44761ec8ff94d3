"""Step time: a FLOP count of the step, divided by a FLOP rate measured on this hardware and model.

The FLOP count is the standard one (Kaplan et al. 2020, §2.1; Chinchilla's appendix F): a forward pass costs
``2·N`` per token for the ``N`` weights it multiplies through, plus attention's ``2·layers·context·hidden``
(causal: half the context on average), and the vocabulary projection only where the loss needs it; the backward
pass costs twice the forward for trained weights and once for frozen ones (the input gradient only) — an
adapter's low-rank products count as trained weights — and
gradient checkpointing adds one forward. Reference and KL passes add forwards without a backward; sampling adds
one decode step per generated token.

FLOPs are not all of a step: every micro-batch's forward and backward pays a fixed cost besides its arithmetic
(operator dispatch and autograd bookkeeping in every layer, streaming the weights from memory once per pass — on a
CPU that is 5–30 % of a small model's pass), and the optimizer touches every trainable parameter once a step
(clipping, AdamW, fresh gradients). So a step takes::

    FLOPs / rate  +  passes × pass_s × (1 + (extra forwards + recomputation) / 3)  +  trainable × param_s

(a forward is about a third of a forward + backward) plus one ``decode_step_s`` per batched decode step when the
method samples. ``rate``, ``pass_s`` and ``param_s`` come from a short calibration — timed optimizer steps of the
real model on the real data, once as the recipe splits its batch and once one sample per micro-batch (the same
FLOPs, so the difference is the fixed cost of the extra passes), and a timed optimizer step
(:func:`tuneforge.planning.calibrate.calibrate`) — cached per hardware, model and adapter family (full fine-tuning
or a frozen base) under ``$TUNEFORGE_HOME/cache/calibration``; every finished run adds its own measured rate. Only for
hardware with no calibration at all is the rate the device's peak × a typical utilisation
(:meth:`Hardware.peak_flops`) with no fixed costs, and the forecast says so.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tuneforge.files import atomic_write
from tuneforge.models.loading import model_fingerprint
from tuneforge.paths import cache_dir
from tuneforge.planning.hardware import Hardware
from tuneforge.planning.shape import ModelShape

if TYPE_CHECKING:
    from tuneforge.config import Recipe


@dataclass(frozen=True)
class StepWork:
    """What one optimizer step computes, per replica."""

    tokens: int  # tokens through the trained model (all micro-batches)
    supervised: int  # positions projected onto the vocabulary
    context: int  # average attention span of a token (causal: half the sequence)
    full_backward: bool  # weight gradients for the decoder (full fine-tuning) or input gradients only (adapters)
    gradient_checkpointing: bool = False
    extra_forwards: int = 0  # reference / KL passes over the same tokens, no backward
    decode_tokens: int = 0  # sampled tokens (each a decode step of one sequence)
    decode_steps: int = 0  # decode steps (batched over sequences)
    adapter_params: int = 0  # LoRA/DoRA weights every token also multiplies through (trained: full backward)
    passes: int = 1  # micro-batches: forward + backward passes, each with a fixed cost
    trainable: int = 0  # parameters the optimizer updates every step


def forward_flops(s: ModelShape, tokens: int, supervised: int, context: int) -> float:
    attention = 2 * s.layers * context * s.heads * s.head_dim * 2  # QKᵀ and AV
    return tokens * (2 * s.decoder_matmul_params + attention) + supervised * 2 * s.hidden * s.vocab


def step_flops(s: ModelShape, w: StepWork) -> float:
    base = forward_flops(s, w.tokens, w.supervised, w.context)
    adapter = 2 * w.adapter_params * w.tokens  # the low-rank A and B products
    fwd = base + adapter
    backward = 2 * fwd if w.full_backward else base + 2 * adapter  # frozen base: input gradients only
    recompute = fwd if w.gradient_checkpointing else 0.0
    extra = w.extra_forwards * base  # a reference runs with the adapter off
    decode = w.decode_tokens * (2 * s.decoder_matmul_params + 2 * s.hidden * s.vocab)
    return fwd + backward + recompute + extra + decode


@dataclass
class Rate:
    """A measured FLOP rate (FLOP/s), the fixed costs that come on top (seconds), and where they came from."""

    flops_per_s: float
    decode_step_s: float = 0.0  # fixed cost of one batched decode step (kernel launches, Python), measured
    source: str = "flop model"
    pass_s: float = 0.0  # fixed cost of one micro-batch's forward + backward
    param_s: float = 0.0  # optimizer time per trainable parameter per step


def family(adapter_kind: str) -> str:
    """Calibrations are kept apart for full fine-tuning, a frozen base (adapters) and a frozen 4-bit base (QLoRA,
    which dequantizes every weight in every pass): their passes differ."""
    return {"full": "full", "qlora": "qlora"}.get(adapter_kind, "adapter")


def rate_for(recipe: Recipe, hardware: Hardware, threads: int, precision: str) -> Rate:
    """The calibrated rate for this hardware and model, else the FLOP model's device peak × utilisation."""
    if hardware.local:
        rate = cached_rate(
            hardware_key(hardware.kind, threads, precision),
            model_fingerprint(recipe.model.path),
            family(recipe.adapter.kind),
        )
        if rate is not None:
            return rate
    n = threads if hardware.kind == "cpu" else 1
    return Rate(Hardware(hardware.kind, 0, n).peak_flops(precision), 0.0, "flop model (no calibration)")


def hardware_key(kind: str, threads: int, precision: str) -> str:
    """Calibrations are valid for one device kind, thread count and precision on one machine type."""
    cpu = platform.processor() or platform.machine()
    return f"{kind}-{cpu}-{threads}t-{precision}"


def _cache_file(hardware: str, model_fingerprint: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{hardware}-{model_fingerprint}")
    return cache_dir("calibration") / f"{safe}.json"


def cached_rate(hardware: str, model_fingerprint: str, adapter_family: str | None = None) -> Rate | None:
    """The calibrated rate for this hardware and model, if any: medians of what was measured, from entries of the
    adapter family when there are some (fixed costs from any entry that measured them)."""
    path = _cache_file(hardware, model_fingerprint)
    if not path.exists():
        return None
    entries = json.loads(path.read_text()).get("entries", [])
    same = [e for e in entries if e.get("family") == adapter_family]
    entries = same or entries
    if not entries:
        return None

    def median(key: str) -> float:
        values = sorted(e[key] for e in entries if e.get(key))
        return values[len(values) // 2] if values else 0.0

    return Rate(
        median("flops_per_s"),
        median("decode_step_s"),
        f"calibrated ({len(entries)})",
        pass_s=median("pass_s"),
        param_s=median("param_s"),
    )


def record_rate(hardware: str, model_fingerprint: str, entry: dict, keep: int = 16) -> None:
    """Add a measured rate (with the shape it was measured on) to the cache; the newest `keep` are kept."""
    path = _cache_file(hardware, model_fingerprint)
    entries = json.loads(path.read_text()).get("entries", []) if path.exists() else []
    entries = [e for e in entries if e.get("shape") != entry.get("shape")] + [entry]
    atomic_write(path, json.dumps({"hardware": hardware, "model": model_fingerprint, "entries": entries[-keep:]}))


def fixed_seconds(w: StepWork, rate: Rate) -> float:
    """What a step costs besides its FLOPs: each pass's fixed cost, the optimizer, the decode steps."""
    forwards = 1 + (w.extra_forwards + int(w.gradient_checkpointing)) / 3  # a forward: ~⅓ of forward + backward
    return w.passes * rate.pass_s * forwards + w.trainable * rate.param_s + w.decode_steps * rate.decode_step_s


def step_seconds(s: ModelShape, w: StepWork, rate: Rate) -> float:
    return step_flops(s, w) / rate.flops_per_s + fixed_seconds(w, rate)


def rate_entry(
    shape_key: str, flops: float, seconds: float, adapter_family: str, fixed: Rate | None = None
) -> dict | None:
    """A cache entry from a measured step: `seconds` of arithmetic (the step's time less :func:`fixed_seconds` with
    the costs in `fixed`) for `flops`; None when nothing is left (a step that is all fixed cost)."""
    fixed = fixed or Rate(0.0)
    if seconds <= 0:
        return None
    rate = Rate(flops / seconds, fixed.decode_step_s, "measured", pass_s=fixed.pass_s, param_s=fixed.param_s)
    return asdict(rate) | {"shape": shape_key, "family": adapter_family}
