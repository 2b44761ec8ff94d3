"""A request's prompt and sampling as the engine takes them: chat rendered exactly as training rendered it.

The chat template is the model's own — saved with its result, or the registry's prompt version — rendered by
:func:`tuneforge.data.templates.render_chat` and tokenized without added special tokens, as training tokenized
it, so the served prompt is token for token the one the model learned to answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tuneforge.serve.catalog import Served
from tuneforge.serve.openai_schemas import APIError


def chat_prompt_ids(served: Served, messages: Sequence[dict[str, Any]]) -> list[int]:
    """The prompt of a chat request, as training rendered and tokenized it (``tuneforge.data.templates``)."""
    from jinja2 import TemplateError

    from tuneforge.data.templates import render_chat

    if not served.template:
        raise APIError(
            400,
            f"The model '{served.id}' has no chat template; use /v1/completions, or serve a model trained on chat data",
            param="messages",
            code="no_chat_template",
        )
    try:
        text = render_chat(served.tokenizer, messages, served.template, add_generation_prompt=True)
    except (TemplateError, ArithmeticError, AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
        raise APIError(400, f"messages: the model's chat template refuses them: {e}", param="messages") from None
    return list(served.tokenizer(text, add_special_tokens=False)["input_ids"])


def text_prompt_ids(served: Served, text: str) -> list[int]:
    """A raw prompt as continued pre-training saw text: ``bos`` + its tokens."""
    tok = served.tokenizer
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return bos + list(tok(text, add_special_tokens=False)["input_ids"])


def sampling(
    served: Served,
    *,
    prompt_len: int,
    limit: int | None,
    limit_param: str,
    prompt_param: str,
    body: Any,
    stop_ids: tuple[int, ...],
    logprobs: int | None,
) -> Any:
    """The engine's sampling parameters; a token limit that cannot fit the context is a 400 naming it."""
    from tuneforge.serve.engine import SamplingParams

    context = getattr(served.engine, "max_model_len", None)
    room = context - prompt_len if context else None
    if room is not None and room < 1:
        raise APIError(
            400,
            f"The prompt is {prompt_len} tokens, which leaves no room in this model's context of {context} tokens",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if limit is not None and room is not None and limit > room:
        raise APIError(
            400,
            f"{limit_param}: {limit} tokens after a prompt of {prompt_len} exceed this model's context of {context}",
            param=limit_param,
            code="context_length_exceeded",
        )
    return SamplingParams(
        max_tokens=limit if limit is not None else (room or SamplingParams.max_tokens),
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop_token_ids=() if body.ignore_eos else stop_ids,
        logprobs=logprobs,
    )
