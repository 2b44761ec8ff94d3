"""Step time: a FLOP count of the step, divided by a FLOP rate measured on this hardware and model.

The FLOP count is the standard one (Kaplan et al. 2020, §2.1; Chinchilla's appendix F): a forward pass costs
``2·N`` per token for the ``N`` weights it multiplies through, plus attention's ``2·layers·context·hidden``
(causal: half the context on average), and the vocabulary projection only where the loss needs it; the backward
pass costs twice the forward for trained weights and once for frozen ones (the input gradient only) — an
adapter's low-rank products count as trained weights — and
gradient checkpointing adds one forward. Reference and KL passes add forwards without a backward; sampling adds
one decode step per generated token.

The rate comes from a short calibration — a few timed optimizer steps on the real model and data
(:func:`tuneforge.planning.calibrate.calibrate`), cached per hardware, model and shape under
``$TUNEFORGE_HOME/cache/calibration`` — and every finished run adds its own measured rate to that cache. Only for
hardware with no calibration at all is the rate the device's peak × a typical utilisation
(:meth:`Hardware.peak_flops`), and the forecast says so.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

from tuneforge.files import atomic_write
from tuneforge.paths import cache_dir
from tuneforge.planning.shape import ModelShape


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
    """A measured FLOP rate (FLOP/s) and a per-decode-step overhead (seconds), where it came from."""

    flops_per_s: float
    decode_step_s: float = 0.0  # fixed cost of one batched decode step (kernel launches, Python), measured
    source: str = "flop model"


def hardware_key(kind: str, threads: int, precision: str) -> str:
    """Calibrations are valid for one device kind, thread count and precision on one machine type."""
    cpu = platform.processor() or platform.machine()
    return f"{kind}-{cpu}-{threads}t-{precision}"


def _cache_file(hardware: str, model_fingerprint: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{hardware}-{model_fingerprint}")
    return cache_dir("calibration") / f"{safe}.json"


def cached_rate(hardware: str, model_fingerprint: str) -> Rate | None:
    """The calibrated rate for this hardware and model, if any (the median of what was measured)."""
    path = _cache_file(hardware, model_fingerprint)
    if not path.exists():
        return None
    entries = json.loads(path.read_text()).get("entries", [])
    if not entries:
        return None
    rates = sorted(e["flops_per_s"] for e in entries)
    decode = sorted(e.get("decode_step_s", 0.0) for e in entries if e.get("decode_step_s"))
    return Rate(rates[len(rates) // 2], decode[len(decode) // 2] if decode else 0.0, f"calibrated ({len(entries)})")


def record_rate(hardware: str, model_fingerprint: str, entry: dict, keep: int = 16) -> None:
    """Add a measured rate (with the shape it was measured on) to the cache; the newest `keep` are kept."""
    path = _cache_file(hardware, model_fingerprint)
    entries = json.loads(path.read_text()).get("entries", []) if path.exists() else []
    entries = [e for e in entries if e.get("shape") != entry.get("shape")] + [entry]
    atomic_write(path, json.dumps({"hardware": hardware, "model": model_fingerprint, "entries": entries[-keep:]}))


def step_seconds(s: ModelShape, w: StepWork, rate: Rate) -> float:
    return step_flops(s, w) / rate.flops_per_s + w.decode_steps * rate.decode_step_s


def rate_entry(shape_key: str, flops: float, seconds: float, decode_step_s: float = 0.0) -> dict:
    return asdict(Rate(flops / seconds, decode_step_s, "measured")) | {"shape": shape_key}
