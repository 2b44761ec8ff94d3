"""Request bodies of the inference routes in OpenAI's shapes (``openai.types.chat.completion_create_params``,
``completion_create_params``, ``embedding_create_params``; vLLM's LoRA routes) and OpenAI's error envelope.

Bodies are validated here, not by FastAPI, so the standalone server and the jobs service answer a bad request
with the same ``{"error": {"message", "type", "param", "code"}}`` naming the field (``messages[0].content``).
A field OpenAI defines that this server does not implement (``tools``, ``logit_bias``…) is refused when set
rather than silently ignored; fields with no effect on the answer (``user``, ``metadata``…) are accepted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, Literal, TypeVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
}


class APIError(Exception):
    """An error the client can act on: HTTP status, message, the field it is about (``param``) and a code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "server_error" if self.status >= 500 else TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def model_not_found(name: str, known: Iterable[str] = ()) -> APIError:
    from tuneforge.errors import suggest

    return APIError(
        404,
        f"The model '{name}' does not exist{suggest(name, sorted(known))}",
        param="model",
        code="model_not_found",
    )


# What pydantic puts in an error's location for the member of a union it tried (``str``, ``list[int]``,
# ``function-after[...]``, a class name): not a field of the request.
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|[a-z-]+\[.*\]|[A-Z]\w*)$")


def param_of(loc: Iterable[Any]) -> str:
    """``("messages", 0, "content")`` → ``messages[0].content`` (OpenAI's spelling of a field path)."""
    out = ""
    for part in loc:
        if isinstance(part, str) and _UNION_TAG.match(part):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _texts_or_tokens(v: Any, what: str) -> Any:
    """A string, strings, token ids, or lists of token ids — each non-empty (``prompt``, ``input``)."""
    expected = f"expected {what} as a string, a list of strings, a list of token ids or a list of such lists"
    if isinstance(v, str):
        return v
    if not isinstance(v, list) or not v:
        raise ValueError(expected)
    if all(isinstance(x, str) for x in v) or all(type(x) is int for x in v):
        return v
    if all(isinstance(x, list) and x and all(type(t) is int for t in x) for x in v):
        return v
    raise ValueError(expected)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """``"temperature": null`` (as clients send for "unset") means the default, as at OpenAI."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            k: v
            for k, v in data.items()
            if not (v is None and k in fields and not fields[k].is_required() and fields[k].default is not None)
        }


class StreamOptions(_Body):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # no effect here: the stream is not obfuscated


class ChatMessage(BaseModel):
    """One message; keys beyond OpenAI's (``reasoning_content``…) go to the chat template, as in training data."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, v: Any) -> Any:
        """A string, or a list of text parts (joined by line breaks); images and audio are refused."""
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list):
            texts = []
            for i, part in enumerate(v):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"part {i} is {kind!r}; expected a text part {{'type': 'text', 'text': ...}}")
                texts.append(part["text"])
            return "\n".join(texts)
        raise ValueError("expected a string or a list of text parts")

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template (and training data) sees it: ``developer`` is a system prompt."""
        out = self.model_dump(exclude_none=True)
        if out["role"] == "developer":
            out["role"] = "system"
        out.setdefault("content", "")
        return out


Stop = str | list[str] | None


class _Sampling(_Body):
    model: str
    n: int = Field(1, ge=1, le=128)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate to the token limit (benchmarks)

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, v: Any) -> Any:
        if not (v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))):
            raise ValueError("expected a string or a list of strings")
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        return _texts_or_tokens(v, "the prompt")

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # one prompt of token ids
        return list(p)


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v: Any) -> Any:
        return _texts_or_tokens(v, "the input")

    @property
    def inputs(self) -> list[str | list[int]]:
        x = self.input
        if isinstance(x, str):
            return [x]
        if x and all(isinstance(t, int) for t in x):
            return [list(x)]
        return list(x)


class LoadAdapterRequest(_Body):
    """vLLM's ``/v1/load_lora_adapter`` body; ``lora_path`` is any model reference ``tuneforge serve`` takes."""

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(_Body):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's; names identify adapters here


class DeploymentRequest(_Body):
    """``POST /v1/deployments``: serve a model reference (adapter, model, run dir, registry version) by name."""

    model: str = Field(min_length=1)
    name: str | None = Field(None, min_length=1, max_length=256)


# Fields OpenAI defines that change nothing here (accepted and dropped), and fields whose effect this server
# does not implement: accepted only at their neutral value, so a request never silently means something else.
NO_EFFECT = {
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
    "safety_identifier",
}
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "moderation": (None,),
    "suffix": (None, ""),
}

Request = TypeVar("Request", bound=BaseModel)


def parse_body(raw: bytes, schema: type[Request]) -> Request:
    """The request body as `schema`, or a 400 naming the first bad field."""
    try:
        body = json.loads(raw or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"The request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object", code="invalid_json")
    known = set(schema.model_fields)
    for key in list(body):
        if key in known:
            continue
        if key in NO_EFFECT:
            body.pop(key)
        elif key in NEUTRAL:
            if body[key] not in NEUTRAL[key]:
                raise APIError(400, f"{key}: not supported by this server", param=key, code="unsupported_parameter")
            body.pop(key)
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        loc = tuple(first.get("loc", ()))
        param = param_of(loc)
        kind = first.get("type")
        if kind == "missing":
            message = f"{param}: a required field is missing"
        elif kind == "extra_forbidden":
            from tuneforge.errors import suggest

            message = f"{param}: unknown field{suggest(str(loc[-1]), sorted(known))}"
        else:
            message = f"{param}: {first.get('msg', 'invalid value')}".removesuffix(".")
            message = message.replace("Value error, ", "")
        raise APIError(400, message, param=param or None, code="invalid_value") from None
