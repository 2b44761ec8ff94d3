"""The public chat templates of real model families, on small tokenizers built here (test helpers, not tests).

``tests/assets/chat_templates/<family>.json`` holds a family's public ``chat_template`` string and the special
tokens it uses (where each came from is in its ``source``). :func:`family_tokenizer` trains a byte-level BPE
tokenizer carrying exactly those tokens, with the family's bos / eos / pad, so the template renders and tokenizes
as it does on the real model — without downloading one.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).parent / "assets" / "chat_templates"
FAMILIES = sorted(p.stem for p in ASSETS.glob("*.json"))

# Enough text for a BPE with a few hundred merges; any other text still encodes (byte-level alphabet).
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france? paris is the capital of france.",
    "you are a helpful assistant. answer briefly and politely.",
    "first I think about the question, then I answer it step by step",
    "reverse these words: apple banana cherry. cherry banana apple",
    "one two three four five six seven eight nine ten",
]


def load_family(name: str) -> dict[str, Any]:
    return json.loads((ASSETS / f"{name}.json").read_text())


@cache
def _family_tokenizer(name: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = load_family(name)
    named = [spec[k] for k in ("bos_token", "eos_token", "pad_token") if spec[k]]
    special = list(dict.fromkeys([*spec["special_tokens"], *named]))
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS * 20, trainer=trainer)
    core.add_tokens(spec["added_tokens"])  # e.g. Qwen3's <think>: one token, but not a special (control) one
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=spec["bos_token"],
        eos_token=spec["eos_token"],
        pad_token=spec["pad_token"],
        additional_special_tokens=[t for t in special if t not in named],
    )
    tokenizer.chat_template = spec["chat_template"]
    return tokenizer


def family_tokenizer(name: str) -> Any:
    """A fresh copy of the family's tokenizer (trained once per session), with the family's template set."""
    import copy

    return copy.deepcopy(_family_tokenizer(name))


def save_family_tokenizer(name: str, out: Path) -> Path:
    """The family's tokenizer saved as a model directory tokenizer (``load_tokenizer`` reads it)."""
    tokenizer = family_tokenizer(name)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))  # what check_model_path looks for
    return out
