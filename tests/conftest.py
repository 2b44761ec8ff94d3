"""Shared fixtures: an isolated state directory per test and tiny models built once per session."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = "apple banana cherry delta echo fox golf hotel india juliet kilo lima mango nova oscar papa".split()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "tuneforge-home"
    monkeypatch.setenv("TUNEFORGE_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def reverse_task(n: int, seed: int = 0) -> list[dict]:
    """A learnable chat task: reverse three words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = rng.sample(WORDS, 3)
        out.append({"messages": [{"role": "user", "content": "reverse: " + " ".join(w)},
                                 {"role": "assistant", "content": " ".join(reversed(w))}]})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~0.3 M-parameter Llama with a BPE tokenizer trained on the reverse task's words."""
    from tuneforge.models.tiny import TinySpec, build_tiny

    out = tmp_path_factory.mktemp("tiny") / "base"
    texts = [m["content"] for r in reverse_task(300) for m in r["messages"]]
    texts += ["the quick brown fox jumps over the lazy dog", "one two three four five six seven"]
    spec = TinySpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=176)
    return build_tiny(out, texts, vocab_size=320, spec=spec)


def base_recipe(model: Path, data: Path, out: Path, **train: object) -> dict:
    return {
        "name": "test",
        "model": {"path": str(model)},
        "data": {"sources": [{"path": str(data)}], "max_length": 64, "val_fraction": 0.1},
        "adapter": {"kind": "full"},
        "train": {"max_steps": 12, "global_batch_size": 8, "lr": 3e-3, "log_every": 4, "warmup_steps": 0,
                  "num_threads": 1, **train},
        "tracking": {"enabled": False},
        "output": {"dir": str(out)},
    }
