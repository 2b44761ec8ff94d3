"""Shared test setup and helpers.

* A temporary state directory (``$TUNEFORGE_HOME``) for the whole session — set before any fixture runs, so
  session- and module-scoped fixtures and every subprocess they start stay out of the real ``~/.tuneforge`` —
  and a fresh one per test on top of it.
* Tiny models built once per session, and the builders behind them.
* Plain helpers the test modules import (``from conftest import ...``): the reverse-three-words chat task, the
  pick-a-good-word preference task, recipes, JSONL files, a scripted OpenAI-compatible chat server, free ports.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

WORDS = [
    "apple",
    "banana",
    "cherry",
    "delta",
    "echo",
    "fox",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mango",
    "nova",
    "oscar",
    "papa",
]

# ------------------------------------------------------------------------------------------- state directory

# What the session changed in os.environ, to put back at the end: {name: value before (None: unset)}.
_SESSION_ENV: dict[str, str | None] = {}
_SESSION_HOME: list[Path] = []


def pytest_configure(config: pytest.Config) -> None:
    """A temporary ``TUNEFORGE_HOME`` for the whole session, before any fixture or subprocess runs.

    The per-test ``_isolated_home`` fixture only starts with each test, after session- and module-scoped
    fixtures (which train models and fill token caches) have run; without this they would write under
    ``~/.tuneforge``. Subprocesses inherit ``os.environ``, so they get it too.
    """
    home = Path(tempfile.mkdtemp(prefix="tuneforge-test-home-"))
    _SESSION_HOME.append(home)
    for name, value in (("TUNEFORGE_HOME", str(home)), ("HF_HUB_OFFLINE", "1")):
        _SESSION_ENV.setdefault(name, os.environ.get(name))
        os.environ[name] = value


def pytest_unconfigure(config: pytest.Config) -> None:
    for name, value in _SESSION_ENV.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _SESSION_ENV.clear()
    while _SESSION_HOME:
        shutil.rmtree(_SESSION_HOME.pop(), ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's own state directory (caches, runs, MLflow store), fresh and empty."""
    home = tmp_path / "tuneforge-home"
    monkeypatch.setenv("TUNEFORGE_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture
def no_ambient_openai(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OpenAI key or endpoint from the developer's shell reaches the code under test."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


# -------------------------------------------------------------------------------------------------- data


def reverse_task(n: int, seed: int = 0) -> list[dict]:
    """A learnable chat task: reverse three words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = rng.sample(WORDS, 3)
        out.append(
            {
                "messages": [
                    {"role": "user", "content": "reverse: " + " ".join(w)},
                    {"role": "assistant", "content": " ".join(reversed(w))},
                ]
            }
        )
    return out


GOOD, BAD = WORDS[:8], WORDS[8:]


def preference_pairs(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """``{"prompt", "chosen", "rejected"}`` pairs of a preference a tiny model learns in a few steps.

    A prompt lists four words, two from the "good" half of the vocabulary and two from the "bad" half; the
    chosen answer picks a good word, the rejected one a bad word. Prompts in ``exclude`` are skipped.
    """
    rng = random.Random(seed)
    out: list[dict] = []
    while len(out) < n:
        good, bad = rng.sample(GOOD, 2), rng.sample(BAD, 2)
        words = good + bad
        rng.shuffle(words)
        prompt = "pick one: " + " ".join(words)
        if prompt not in exclude:
            out.append({"prompt": prompt, "chosen": good[0], "rejected": bad[0]})
    return out


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    """240 training pairs of the pick-a-good-word task."""
    return write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(240, seed=0))


@pytest.fixture
def held_out_pairs() -> list[dict]:
    """40 pairs whose prompts (word combinations) ``pairs_file`` never trains on."""
    seen = {p["prompt"] for p in preference_pairs(240, seed=0)}
    return preference_pairs(40, seed=1, exclude=seen)


def write_jsonl(path: Path, records: Sequence[dict | str]) -> Path:
    """One line per record: objects are dumped as JSON, strings written as they are (broken JSON, blank lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def base_recipe(model: Path, data: Path, out: Path, **train: object) -> dict:
    return {
        "name": "test",
        "model": {"path": str(model)},
        "data": {"sources": [{"path": str(data)}], "max_length": 64, "val_fraction": 0.1},
        "adapter": {"kind": "full"},
        "train": {
            "max_steps": 12,
            "global_batch_size": 8,
            "lr": 3e-3,
            "log_every": 4,
            "warmup_steps": 0,
            "num_threads": 1,
            # Tests compare runs exactly (replicas vs one process, resumed vs not) — an fp32 property: under bf16
            # autocast each matmul rounds to 8 bits of mantissa, and its kernel (so its summation order) depends on
            # the batch's shape. `auto` picks bf16 on CPUs with AMX; tests of the bf16 paths ask for them.
            "precision": "fp32",
            **train,
        },
        "tracking": {"enabled": False},
        "output": {"dir": str(out)},
    }


# ------------------------------------------------------------------------------------------------ models

TINY_SPEC = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=176)


def build_tiny_model(
    out: Path, *, texts_seed: int = 0, extra_texts: Sequence[str] = (), vocab_size: int = 320, seed: int = 0
) -> Path:
    """A ~0.3 M-parameter Llama (``TINY_SPEC``) with a BPE tokenizer trained on the reverse task's words."""
    from tuneforge.models.tiny import TinySpec, build_tiny

    texts = [m["content"] for r in reverse_task(300, texts_seed) for m in r["messages"]] + list(extra_texts)
    return build_tiny(out, texts, vocab_size=vocab_size, spec=TinySpec(**TINY_SPEC), seed=seed)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny Llama, saved with its tokenizer (a plain transformers directory)."""
    extra = ["the quick brown fox jumps over the lazy dog", "one two three four five six seven"]
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "base", extra_texts=extra)


def tiny_llama(seed: int, *, classifier: bool = False, **config: Any) -> Any:
    """A randomly initialised transformers Llama (no tokenizer), in eval mode; ``config`` overrides the defaults.

    The defaults make a 2-layer model over 40 ids with spread-out logits (``initializer_range=0.3``), so
    log-ratios and clipping in objective tests are not all trivial.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
        pad_token_id=0,
    )
    if classifier:
        settings["num_labels"] = 1  # a scalar reward head
    model_config = LlamaConfig(**{**settings, **config})
    model = LlamaForSequenceClassification(model_config) if classifier else LlamaForCausalLM(model_config)
    return model.eval()  # no dropout; TRL reads ``training`` to pick its metric bucket


def prompt_of(record: dict) -> list[dict]:
    """A chat record's prompt: its messages without the final assistant answer (prompt records: all of them)."""
    messages = record["messages"]
    return messages[:-1] if messages[-1]["role"] == "assistant" else messages


def greedy_answers(model_dir: Path, records: Sequence[dict], max_new_tokens: int = 12) -> list[str]:
    """Greedy answers of a saved model to each record's prompt, with plain transformers loading."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.eval.generate import generate_answers

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return generate_answers(model, tokenizer, [prompt_of(r) for r in records], max_new_tokens=max_new_tokens)


def rel_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The largest relative difference between two state dicts' tensors (same keys), relative to ``b``."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in a)


# ------------------------------------------------------------------------------------------------ network


def free_port() -> int:
    """A local TCP port nobody listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ChatError:
    """A scripted reply that answers with an HTTP error instead of a completion."""

    message: str
    status: int = 500


class ChatServer:
    """A scripted chat model behind a real OpenAI-compatible HTTP server (uvicorn + FastAPI) on a free local port.

    ``reply(body)`` (a subclass's method, or the callable given) turns each request's JSON body into the
    assistant's text, or a :class:`ChatError`. Every request is kept in ``requests`` as
    ``{"body", "authorization"}``, in arrival order. Use it as a context manager: the server runs inside.
    """

    def __init__(self, reply: Callable[[dict], str | ChatError] | None = None) -> None:
        import uvicorn
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse

        if reply is not None:
            self.reply = reply  # type: ignore[method-assign]
        self.requests: list[dict] = []
        self.lock = threading.Lock()

        async def chat(request: Any) -> Any:  # a plain route: FastAPI resolves no annotation here
            body = await request.json()
            with self.lock:
                self.requests.append({"body": body, "authorization": request.headers.get("authorization")})
            answer = self.reply(body)
            if isinstance(answer, ChatError):
                return JSONResponse({"error": {"message": answer.message}}, status_code=answer.status)
            return JSONResponse(
                {
                    "id": "chatcmpl-test",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
            )

        app = FastAPI()
        app.add_route("/v1/chat/completions", chat, methods=["POST"])
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def reply(self, body: dict) -> str | ChatError:
        raise NotImplementedError("give ChatServer a reply function, or override reply()")

    def __enter__(self) -> Any:
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                return self
            threading.Event().wait(0.01)
        raise RuntimeError(f"{type(self).__name__} did not start")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
