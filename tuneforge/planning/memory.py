"""The memory model: peak bytes of a training step, from the model's shape, the method and the batch.

Counted the way the autograd engine holds them (fp32 master weights, as :func:`tuneforge.models.policy.build_model`
loads them): weights, gradients and AdamW's two moments of the trainable parameters, frozen models a method keeps
next to the policy (a reference copy for full fine-tuning, a teacher, a reward model), and activations. The
activation count follows the approach of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", §4), redone for a Llama-style block (RMSNorm, rotary attention through SDPA's flash kernel,
SwiGLU), per token per layer::

    2h (norm in/out) + h + 2·kv + h (q, k, v into attention, output) + 2h (GQA's repeated k, v) + h (o_proj in)
    + 2h (norm in/out) + 4·I (gate, silu, up, product)  ≈  9.8·h + 2·kv + 4·I   floats

(the 0.8·h is rotary and reshape copies, measured), and at the head, which tuneforge applies only at supervised
positions, four vocabulary-wide rows per position at the start of the backward pass (logits, log-softmax, their
gradients). Gradient checkpointing keeps each layer's input and recomputes one layer at a time. Checked against
PyTorch's own allocation log by ``benchmarks/planner_accuracy.py``.

QLoRA stores the decoder's linear weights in 4-bit NF4 (bitsandbytes, double quantization): half a byte per weight,
one 8-bit absmax per block of 64 and one fp32 absmax of those per 256 blocks, plus each layer's 256-entry
second-level code table; embeddings, norms, biases and the LM head stay fp32. Each 4-bit layer dequantizes its
weight for the matmul (forward, and again in the backward: only the packed weight is saved), so one layer's
weight in full precision is live on top of the training pass. On a CPU the full-precision checkpoint is memory-mapped
while it is quantized, so loading peaks at the checkpoint file plus the 4-bit model (``loading``; the mapping is
released once the model is loaded, see :func:`tuneforge.models.loading.load_model`); on a GPU the mapping is host
memory and only one layer at a time is quantized on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneforge.planning.shape import ModelShape

FP32 = 4
NF4_BYTES = 0.5 + 1 / 64 + FP32 / (64 * 256)  # per 4-bit weight: packed nibble, 8-bit absmax / 64, fp32 absmax / 16384
NF4_TENSOR_BYTES = (256 + 16) * FP32  # per 4-bit layer: the absmax code table and the NF4 code (measured: 1.1 kB)


@dataclass(frozen=True)
class Workload:
    """One forward/backward pass's shape and what the method keeps in memory besides it."""

    tokens: int  # tokens through the model in one micro-batch (padded)
    supervised: int  # positions that reach the vocabulary projection in it
    trainable: int  # trainable parameters (all of them for full fine-tuning)
    grad_accumulation: int = 1
    gradient_checkpointing: bool = False
    act_bytes: int = FP32  # bytes per activation element (2 under bf16/fp16 autocast)
    frozen_params: int = 0  # parameters of frozen models next to the policy (reference copy, teacher, reward model)
    generation_kv_tokens: int = 0  # sequences × context held in a KV cache while sampling (online methods)
    generation_rows: int = 0  # sequences decoded together (their logits are live at each decode step)
    frozen_base: bool = False  # an adapter trains: norms' weights are frozen, so autograd keeps less (see below)
    quantized: int = 0  # base weights stored in 4-bit NF4 (QLoRA: the decoder's linears)
    quantized_layers: int = 0  # 4-bit layers (each has its own quantization tables)
    largest_quantized: int = 0  # weights of the largest 4-bit layer (dequantized for each matmul)
    mapped_checkpoint: int = 0  # bytes of the checkpoint mapped into memory while it is quantized (CPU)


@dataclass
class MemoryForecast:
    """Peak bytes of the training phase and what they are made of (bytes)."""

    parts: dict[str, int] = field(default_factory=dict)
    peak: int = 0

    def as_dict(self) -> dict[str, float]:
        mb = {k: round(v / 2**20, 1) for k, v in self.parts.items()}
        return {"peak_mb": round(self.peak / 2**20, 1), **{f"{k}_mb": v for k, v in mb.items()}}


def layer_floats(s: ModelShape, frozen_base: bool = False) -> float:
    """Activation elements one token leaves saved in one decoder layer (see the module docstring).

    With a frozen base (adapters) an RMSNorm's scale needs no gradient, so its normalised input is not kept: one
    ``h`` less per norm, two per layer."""
    return (7.8 if frozen_base else 9.8) * s.hidden + 2 * s.kv_dim + 4 * s.intermediate


def activation_bytes(s: ModelShape, w: Workload) -> int:
    """Peak activation bytes of one micro-batch's forward + backward."""
    n, sup, b = w.tokens, w.supervised, w.act_bytes
    head = sup * 4 * s.vocab * FP32 + n * 4 * s.hidden * b  # the loss is computed in fp32
    if not w.gradient_checkpointing:
        return int(n * s.layers * layer_floats(s, w.frozen_base) * b + head)
    inputs = n * s.layers * s.hidden * b  # each layer's input, kept for the recomputation
    recompute = n * (layer_floats(s, w.frozen_base) + 2 * s.hidden) * b + sup * s.vocab * FP32  # one layer, logits
    return int(inputs + max(head, recompute))


def generation_bytes(s: ModelShape, w: Workload) -> int:
    """Sampling without gradients: the KV cache of every decoded sequence plus one step's logits."""
    if not w.generation_kv_tokens:
        return 0
    kv = 2 * s.layers * s.kv_dim * w.generation_kv_tokens * w.act_bytes
    return int(kv + 2 * w.generation_rows * s.vocab * FP32)


def forecast_memory(s: ModelShape, w: Workload) -> MemoryForecast:
    """Peak memory of a step: static state, plus the larger of the training pass and sampling.

    Gradients are freed between steps (``zero_grad(set_to_none=True)``), so with one micro-batch per step the
    backward pass's activations and the gradients it writes overlap only partly: the later of the two is counted.
    """
    weights = (s.params - w.quantized) * FP32 + w.quantized * NF4_BYTES + w.quantized_layers * NF4_TENSOR_BYTES
    trainable_extra = 0 if w.trainable >= s.params else w.trainable * FP32  # adapter weights next to the base
    # A 4-bit layer's weight dequantized to fp32 (then cast to the compute dtype under autocast) for one matmul.
    dequant = w.largest_quantized * (FP32 + (w.act_bytes if w.act_bytes != FP32 else 0))
    parts = {
        "weights": int(weights) + trainable_extra,
        "frozen_models": w.frozen_params * FP32,
        "gradients": w.trainable * FP32,
        "optimizer": 2 * w.trainable * FP32,  # AdamW's exp_avg and exp_avg_sq
        "activations": activation_bytes(s, w),
        "generation": generation_bytes(s, w),
        "dequantized": dequant,
        # Quantizing one layer takes about 1.5× its fp32 weight in temporaries (absolute values, scaled, clamped;
        # measured 1.2–1.5× on 3–53 M-parameter models).
        "loading": int(w.mapped_checkpoint + weights + 1.5 * w.largest_quantized * FP32) if w.mapped_checkpoint else 0,
    }
    static = parts["weights"] + parts["frozen_models"] + parts["optimizer"]
    if w.grad_accumulation > 1:
        train = parts["gradients"] + parts["activations"]
    else:
        train = max(parts["activations"], parts["gradients"] + parts["activations"] // 2)
    train += dequant
    peak = static + max(train, parts["generation"])  # sampling runs with no gradients
    return MemoryForecast(parts, max(peak, parts["loading"]))  # loading comes before the optimizer exists
