"""tuneforge — customise open LLMs on your own hardware: one recipe, one PyTorch loop, real parts.

    import tuneforge
    result = tuneforge.train("recipes/sft-lora.yaml", train__lr=1e-4)
    print(result.output_dir, result.metrics)

Heavy libraries (torch, transformers, MLflow) are imported when first needed, so ``import tuneforge``
and the CLI start in milliseconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["TrainResult", "__version__", "export", "load_recipe", "train"]

if TYPE_CHECKING:
    from tuneforge.api import TrainResult, export, train
    from tuneforge.config import load_recipe


def __getattr__(name: str) -> Any:
    if name in ("train", "export", "TrainResult"):
        from tuneforge import api

        return getattr(api, name)
    if name == "load_recipe":
        from tuneforge.config import load_recipe

        return load_recipe
    raise AttributeError(f"module 'tuneforge' has no attribute {name!r}")
