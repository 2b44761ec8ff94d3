"""Build tiny Llama-architecture models and BPE tokenizers locally — for tests and the demo, offline.

A tokenizer is trained on the caller's texts with the `tokenizers` library and wrapped as a standard
Hugging Face fast tokenizer with a ChatML template, so everything downstream treats it like a hub model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tuneforge.models.chat_templates import CHATML

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny Llama; the defaults give ~0.87 M parameters (tied embeddings) with a 1k vocabulary."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 352
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer and wrap it as a `PreTrainedTokenizerFast` with ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|bos|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML
    tokenizer.padding_side = "right"
    return tokenizer


def build_model(tokenizer, spec: TinySpec = TinySpec(), seed: int = 0):
    """A randomly initialised `LlamaForCausalLM` sized by `spec`, matched to the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_tiny(
    out_dir: str | Path, texts: Iterable[str], *, vocab_size: int = 1024, spec: TinySpec = TinySpec(), seed: int = 0
) -> Path:
    """Train a tokenizer on `texts`, build a fresh tiny model and save both to `out_dir` (safetensors)."""
    from tuneforge.models.loading import quiet_transformers

    quiet_transformers()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    model = build_model(tokenizer, spec, seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
