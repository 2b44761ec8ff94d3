"""What the planner needs to know about a model, read from its ``config.json`` alone — no weights are loaded.

The model is instantiated on PyTorch's ``meta`` device (shapes, no storage), so parameter counts are exact for
any architecture transformers knows, tied embeddings counted once, and the linear layers a LoRA adapter would
wrap are listed with their shapes.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.errors import ModelError

HEADS = ("lm_head", "score", "embed_out")  # output projections LoRA's "all-linear" leaves alone


@dataclass(frozen=True)
class ModelShape:
    params: int  # unique parameters (tied embeddings once)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    head_params: int  # the output projection's own parameters (0 when tied to the embeddings)
    embed_params: int
    linears: tuple[tuple[str, int, int], ...] = field(default=(), repr=False)  # (name, in, out) in the decoder

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def decoder_matmul_params(self) -> int:
        """Weights every token multiplies through (the decoder's linears): the FLOP model's ``N``."""
        return sum(i * o for _, i, o in self.linears)

    def lora_params(self, r: int, targets: str | list[str], dora: bool = False) -> int:
        """Trainable parameters of a LoRA (or DoRA: plus a magnitude per output feature) adapter of rank `r`."""
        chosen = [
            (i, o)
            for name, i, o in self.linears
            if targets == "all-linear" or any(name.split(".")[-1] == t or name.endswith(t) for t in targets)
        ]
        return sum(r * (i + o) + (o if dora else 0) for i, o in chosen)


def _config_dict(path: str) -> dict:
    cfg = Path(path).expanduser() / "config.json"
    if not cfg.is_file():
        raise ModelError(f"model path {path}: no config.json to plan from (expected a Hugging Face model directory)")
    return json.loads(cfg.read_text())


@functools.lru_cache(maxsize=32)
def _shape(path: str, mtime_ns: int, classifier: bool) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from tuneforge.models.loading import quiet_transformers

    quiet_transformers()
    config = AutoConfig.from_pretrained(path)
    if classifier:
        config.num_labels = 1
    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    embed = model.get_input_embeddings().weight.numel()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = out is not None and out.weight is model.get_input_embeddings().weight
    head = 0 if out is None or tied else out.weight.numel()
    linears = tuple(
        (name, m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] not in HEADS
    )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return ModelShape(
        params=params,
        layers=int(text.num_hidden_layers),
        hidden=int(text.hidden_size),
        intermediate=int(getattr(text, "intermediate_size", 4 * text.hidden_size)),
        heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        vocab=int(text.vocab_size),
        head_params=head,
        embed_params=embed,
        linears=linears,
    )


def model_shape(path: str, *, classifier: bool = False) -> ModelShape:
    """The shape of the model at `path` (cached per path and config modification time)."""
    cfg = Path(path).expanduser() / "config.json"
    _config_dict(path)
    return _shape(str(Path(path).expanduser()), cfg.stat().st_mtime_ns, classifier)
