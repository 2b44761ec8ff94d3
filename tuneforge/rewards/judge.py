"""The ``score_model`` grader: a judge model reads the rendered prompt and answers with a score.

The judge is either any OpenAI-compatible endpoint, called with the official ``openai`` client (OpenAI,
vLLM, ``tuneforge serve``…), or a local Hugging Face model directory run with transformers. The reply is
free text; :func:`parse_score` takes the number out of it (JSON ``{"score": …}``, ``Score: 7``, or the
last number) and the result is clamped to the grader's ``range``. A failed call or a reply without a
number scores 0 with the error attached, so a judge outage degrades a run instead of killing it.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from tuneforge.errors import RecipeError, suggest
from tuneforge.rewards import templates
from tuneforge.rewards.base import Grader, GradeResult

# OpenAI's score_model sampling_params (note the plural "completions" in its token limit's name).
SAMPLING_PARAMS = {
    "temperature": float,
    "top_p": float,
    "seed": int,
    "max_completions_tokens": int,
    "reasoning_effort": str,
}
DEFAULT_MAX_TOKENS = 256

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_LABELLED = re.compile(rf"\b(?:score|rating|grade|reward)\b\s*(?:is|of|=|:)?\s*\**\s*({_NUMBER})", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)
_JSON_OBJECT = re.compile(r"\{[^{}]*\}")


def parse_score(reply: str) -> float:
    """The judge's score: a JSON ``score`` field, else the last ``score: N``, else the last number."""
    text = _THINK.sub("", reply)
    for blob in reversed(_JSON_OBJECT.findall(text)):
        try:
            obj = json.loads(blob)
        except ValueError:
            continue
        for key in ("score", "result", "rating", "grade", "reward"):
            value = obj.get(key) if isinstance(obj, dict) else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    labelled = _LABELLED.findall(text)
    if labelled:
        return float(labelled[-1])
    numbers = _ANY_NUMBER.findall(text)
    if numbers:
        return float(numbers[-1])
    raise ValueError(f"no number in the judge's reply: {reply[:200]!r}")


class Judge(Protocol):
    def reply(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> str: ...


@dataclass
class OpenAIJudge:
    """A chat-completions endpoint reached with the official ``openai`` client."""

    model: str
    base_url: str | None
    api_key: str
    timeout: float = 60.0
    max_retries: int = 2
    _client: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import openai

        self._client = openai.OpenAI(
            base_url=self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=self.max_retries
        )

    def reply(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
        passed = ("temperature", "top_p", "seed", "reasoning_effort")
        kwargs: dict[str, Any] = {k: params[k] for k in passed if k in params}
        if "max_completions_tokens" in params:
            kwargs["max_completion_tokens"] = params["max_completions_tokens"]
        response = self._client.chat.completions.create(model=self.model, messages=messages, **kwargs)
        if not response.choices:
            raise ValueError("the judge returned no choices")
        return response.choices[0].message.content or ""


_LOCAL_CACHE: dict[str, tuple[Any, Any]] = {}
_LOCAL_LOCK = threading.Lock()


@dataclass
class LocalJudge:
    """A Hugging Face model directory, loaded once per process and run greedily unless asked to sample."""

    path: str

    def _load(self) -> tuple[Any, Any]:
        with _LOCAL_LOCK:
            if self.path not in _LOCAL_CACHE:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(self.path)
                model = AutoModelForCausalLM.from_pretrained(self.path)
                model.eval()
                _LOCAL_CACHE[self.path] = (tokenizer, model)
            return _LOCAL_CACHE[self.path]

    def reply(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
        import torch

        tokenizer, model = self._load()
        if not tokenizer.chat_template:
            raise ValueError(f"the judge model at {self.path} has no chat template")
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        temperature = float(params.get("temperature", 0.0))
        gen: dict[str, Any] = {"max_new_tokens": int(params.get("max_completions_tokens", DEFAULT_MAX_TOKENS))}
        if temperature > 0:
            gen.update(do_sample=True, temperature=temperature, top_p=float(params.get("top_p", 1.0)))
            if "seed" in params:
                torch.manual_seed(int(params["seed"]))
        else:
            gen["do_sample"] = False
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            gen["pad_token_id"] = tokenizer.eos_token_id
        with torch.no_grad(), _LOCAL_LOCK:
            out = model.generate(**inputs, **gen)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@dataclass
class ScoreModelGrader(Grader):
    """A judge's score for the rendered chat ``input``, clamped to ``range``."""

    type = "score_model"  # type: ignore[misc]
    name: str
    model: str
    input: list[dict[str, Any]]
    judge: Judge
    range: tuple[float, float] = (0.0, 1.0)
    sampling_params: dict[str, Any] = field(default_factory=dict)
    max_concurrency: int = 8
    pass_threshold: float | None = None

    def score_reply(self, reply: str) -> GradeResult:
        raw = parse_score(reply)
        lo, hi = self.range
        return GradeResult(min(max(raw, lo), hi), None, {"reply": reply, "raw_score": raw})

    def _one(self, messages: list[dict[str, Any]] | str) -> GradeResult:
        if isinstance(messages, str):  # a template error while rendering
            return GradeResult(0.0, messages)
        try:
            reply = self.judge.reply(messages, self.sampling_params)
        except Exception as e:  # any failure of the call (network, HTTP status, model) costs one sample
            return GradeResult(0.0, f"judge call failed: {type(e).__name__}: {e}")
        try:
            return self.score_reply(reply)
        except ValueError as e:
            return GradeResult(0.0, str(e), {"reply": reply})

    def _evaluate_batch(self, samples: list[dict[str, Any]], items: list[dict[str, Any]]) -> list[GradeResult]:
        conversations: list[list[dict[str, Any]] | str] = []
        for sample, item in zip(samples, items):
            try:
                conversations.append(templates.render_messages(self.input, sample, item))
            except templates.TemplateError as e:
                conversations.append(str(e))
        workers = 1 if isinstance(self.judge, LocalJudge) else max(1, min(self.max_concurrency, len(conversations)))
        if workers == 1:
            return [self._one(c) for c in conversations]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(self._one, conversations))


def build_score_model(
    raw: dict[str, Any],
    name: str,
    at: Callable[[str], str],
    error: Callable[[str, str], RecipeError],
    *,
    base_url: str | None = None,
    api_key: str | None = None,
) -> ScoreModelGrader:
    """Validate the judge-specific fields of a ``score_model`` config and pick its backend.

    Credentials, first found wins: the grader's ``api_key``, the variable its ``api_key_env`` names,
    the recipe's ``api_key``, ``$OPENAI_API_KEY``. A local endpoint (``base_url`` set) needs none.
    """
    bounds = raw.get("range", [0, 1])
    if (
        len(bounds) != 2
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
        or bounds[0] >= bounds[1]
    ):
        raise error(at("range"), f"expected [low, high] with low < high, got {json.dumps(bounds)}")
    params = raw.get("sampling_params", {})
    for key, value in params.items():
        if key not in SAMPLING_PARAMS:
            hint = suggest(key, list(SAMPLING_PARAMS), cutoff=0.5, list_all=True)
            raise error(f"{at('sampling_params')}.{key}", f"unknown sampling parameter{hint}")
        kind = SAMPLING_PARAMS[key]
        if kind is str:
            ok = isinstance(value, str)
        else:
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = numeric and (kind is float or float(value).is_integer())
        if not ok:
            expected = {str: "a string", int: "an integer", float: "a number"}[kind]
            raise error(f"{at('sampling_params')}.{key}", f"expected {expected}, got {value!r}")
    if raw.get("max_concurrency", 1) < 1:
        raise error(at("max_concurrency"), f"must be at least 1, got {raw['max_concurrency']!r}")
    if raw.get("max_retries", 0) < 0:
        raise error(at("max_retries"), f"must be 0 or more, got {raw['max_retries']!r}")
    if raw.get("timeout", 1) <= 0:
        raise error(at("timeout"), f"must be a positive number of seconds, got {raw['timeout']!r}")

    model = raw["model"]
    if os.path.isdir(os.path.expanduser(model)):
        judge: Judge = LocalJudge(os.path.expanduser(model))
    else:
        url = raw.get("base_url") or base_url
        key = raw.get("api_key")
        if key is None and "api_key_env" in raw:
            key = os.environ.get(raw["api_key_env"])
            if not key:
                raise error(at("api_key_env"), f"the environment variable {raw['api_key_env']} is not set")
        key = key or api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            if not (url or os.environ.get("OPENAI_BASE_URL")):
                raise error(
                    at("model"),
                    f"{model!r} is not a local model directory and no endpoint is configured: set base_url "
                    "(any OpenAI-compatible server) or an API key (api_key_env, or $OPENAI_API_KEY)",
                )
            key = "unused"  # self-hosted endpoints usually ignore the key, but the client wants one
        judge = OpenAIJudge(model, url, key, float(raw.get("timeout", 60.0)), int(raw.get("max_retries", 2)))
    return ScoreModelGrader(
        name=name,
        model=model,
        input=raw["input"],
        judge=judge,
        range=(float(bounds[0]), float(bounds[1])),
        sampling_params=dict(params),
        max_concurrency=int(raw.get("max_concurrency", 8)),
        pass_threshold=raw.get("pass_threshold"),
    )
