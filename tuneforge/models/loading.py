"""Load a base model and its tokenizer from a local directory, or from the hub when the user names one."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from tuneforge.errors import ModelError


def quiet_transformers() -> None:
    """Progress bars for loading a 5 MB model are noise in a training log."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _looks_local(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def check_model_path(name: str) -> None:
    """Fail early with a useful message, before anything heavy is imported or downloaded."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise ModelError(f"model path {name}: not a Hugging Face model directory (expected a config.json in it)")
        return
    if _looks_local(name):
        raise ModelError(
            f"model path {name}: no such directory (expected a local Hugging Face model directory "
            "or a hub id like 'org/name')"
        )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def check_tokenizer_path(name: str) -> None:
    """Like :func:`check_model_path`, but a directory with only a tokenizer (an adapter's) is fine too."""
    path = Path(name).expanduser()
    if path.is_dir() and any((path / f).is_file() for f in TOKENIZER_FILES):
        return
    check_model_path(name)


def load_tokenizer(name: str, chat_template: str | None = None, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    from tuneforge.models.chat_templates import resolve_template

    check_tokenizer_path(name)
    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load tokenizer from {name}: {e}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"tokenizer of {name} is not a fast (Rust) tokenizer; tuneforge needs offsets for loss masks")
    if chat_template is not None:
        tokenizer.chat_template = resolve_template(chat_template)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str,
    *,
    dtype: Any = None,
    device: Any = "cpu",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    quantization: Any = None,
) -> Any:
    """A causal LM in `dtype` on `device`; errors name the path and what was expected.

    ``quantization``: a transformers quantization config (QLoRA's 4-bit NF4,
    :func:`tuneforge.models.adapters.qlora_quantization`); each weight is quantized as it loads, straight onto
    `device` (a quantized model cannot be moved afterwards), so no full-precision copy of the model is allocated.
    """
    from transformers import AutoModelForCausalLM

    check_model_path(name)
    quiet_transformers()
    placement = {} if quantization is None else {"quantization_config": quantization, "device_map": {"": str(device)}}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code, **placement
        )
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load a causal LM from {name}: {e}") from None
    if quantization is None:
        return model.to(device)
    _own_storage(model)
    return model


def _own_storage(model: Any) -> None:
    """Give the weights that stayed in full precision (embeddings, norms, head) their own memory.

    On a CPU they are loaded as views into the memory-mapped checkpoint, and a view keeps the whole mapping: every
    page of the full-precision file that quantizing read would stay in the process for the whole run (measured:
    212 MB of file pages next to a 30 MB 4-bit model). Copying them lets the mapping go once loading is done.
    """
    import torch

    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu" and tensor.dtype.is_floating_point and type(tensor).__name__ != "Params4bit":
            with torch.no_grad():
                tensor.data = tensor.data.clone()


def load_frozen(
    name: str,
    device: Any,
    *,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    field: str | None = None,
) -> Any:
    """A causal LM in fp32, frozen and in eval mode: a reference policy or a teacher (no dropout in its targets).

    ``field`` names the recipe field the path came from, so a load error points at it.
    """
    import torch

    try:
        model = load_model(
            name,
            dtype=torch.float32,
            device=device,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    except ModelError as e:
        raise ModelError(f"{field}: {e}" if field else str(e)) from None
    model.eval().requires_grad_(False)
    return model


def model_fingerprint(path: str) -> str:
    """Identifies a model's weights cheaply: config plus the name, size and mtime of every weight file."""
    root = Path(path).expanduser()
    if not root.is_dir():
        return hashlib.sha256(path.encode()).hexdigest()[:16]  # a hub id: the name (and the hub's cache) decide
    h = hashlib.sha256()
    h.update((root / "config.json").read_bytes() if (root / "config.json").exists() else b"")
    for f in sorted(root.iterdir()):
        if f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
