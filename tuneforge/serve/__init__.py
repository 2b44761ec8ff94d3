"""Serving: one base model in memory, many LoRA adapters in the same batch, continuous batching.

The engine (``engine.py``) is what the HTTP routes call; ``lora.py`` computes every row's adapter in one
forward pass (``vocab.py`` its own embedding and LM head, for adapters that train them), ``kv.py`` keeps the running batch's cache, ``adapters.py`` checks, loads and evicts adapters,
``sampling.py`` picks tokens. The names below load on first use, so importing a sibling module (the routes,
the catalog) does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {
    "Engine": "tuneforge.serve.engine",
    "TokenEvent": "tuneforge.serve.engine",
    "SamplingParams": "tuneforge.serve.sampling",
    "RequestError": "tuneforge.serve.sampling",
    "AdapterError": "tuneforge.serve.adapters",
    "UnknownAdapterError": "tuneforge.serve.adapters",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'tuneforge.serve' has no attribute {name!r}")
    return getattr(import_module(_WHERE[name]), name)
