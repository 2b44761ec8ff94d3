"""Chat templates → training sequences whose prompts are exactly what serving renders, and their loss masks.

A chat model is served one turn at a time: the server renders the conversation so far with the generation
prompt, and the model writes one assistant turn, up to its end-of-turn token. So the target for assistant turn
``i`` is its *served view*: ``prompt = render(messages[:i], add_generation_prompt=True)`` and ``completion`` =
what the template writes for the turn after that prompt, up to and including the end-of-turn token — the first
control token the template writes after an assistant's words — and the line break written with it (as in the
families' own ``{% generation %}`` markers and TRL's). What follows — Phi-3.5's closing ``<|endoftext|>``, the
next header of Llama 3's original template — is never generated, so never learned. The loss mask is exactly
the completion; the family's own template renders everything, nothing is patched.

Most templates render conversations prefix-consistently: one render of the whole conversation contains every
turn's served view, and one sequence trains them all. Some do not (measured on the public templates in
``tests/assets/chat_templates``):

- Qwen3 drops earlier turns' reasoning (and their empty ``<think>`` block) once a later user turn exists;
- gpt-oss ends the final turn with ``<|return|>``, earlier ones with ``<|end|>``, and drops their reasoning;
- Mistral v0.3 attaches the system prompt to the *last* user message, so a conversation that ends with an
  assistant turn renders without it;
- Phi-3.5 ends every render without a generation prompt with eos (no difference once completions end at
  the end-of-turn token).

A turn whose served view is not inside the whole conversation's render gets its own sequence, prompt +
completion — the exact text serving shows and the model writes (for a template that moves the system prompt,
the completion is read off the conversation without it). Measured on the 59 cases of
``tests/test_chat_templates.py`` (11 families × single turn, system + user, three turns with and without a
system prompt, ``weight: 0`` turns, Qwen3 / gpt-oss reasoning):

- one render per conversation, masks from prefix renders (before): 41 right, 12 refused, 6 wrong (Llama 3
  learning the next turn's header, Phi-3.5 the closing eos);
- per-family training templates (TRL's approach): one sequence, but Qwen3's training render keeps reasoning
  that serving strips, so in 4 of its 4 multi-turn cases a later turn's served prompt is not a token prefix of
  what was trained, and gpt-oss's earlier turns learn to end in ``<|end|>``, which generation never stops on;
  each family also needs a hand-patched template;
- one sequence per trained turn: always exact, 13,001 tokens (+70 % over one render's 7,629);
- this module: exact in every case, 9,333 tokens (+22 %), all of it in the multi-turn cases of the three
  families that force it; one sequence, no extra token, wherever the template renders consistently.

Finally every turn is checked at the token level: the served prompt's tokens must be a prefix of the
sequence that trains it (a tokenizer may merge characters across the prompt/answer boundary); a turn that
fails is tokenized as prompt tokens + completion tokens instead. What cannot be trained is refused with a
:class:`ChatTemplateError` naming the conversation, the message and the reason — callers turn it into
``FILE:LINE: messages[i]: reason``.

All of that for a batch of conversations costs about one render per served view and one tokenization per distinct
piece of text: :func:`prerender` makes a batch's renders in one ``apply_chat_template`` call per kind (each
conversation's renders are memoised — a turn's render through itself is usually the whole conversation), and
sequences and their served prompts are tokenized together by :func:`tuneforge.data.tokenize.encode_texts_ids`,
which encodes each distinct piece between control tokens once. Measured on 2,048 two-to-four-message support chats
(ChatML, a 1k BPE): 2.1× faster than one render per view and one tokenizer call per sequence and per prompt, with
byte-identical ids and masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from tuneforge.data.formats import REASONING_KEYS
from tuneforge.data.tokenize import encode_texts_ids
from tuneforge.errors import TuneforgeError

_PROBE = "tuneforge-end-of-turn-probe"
# What a template raises on data it does not support, besides jinja2.TemplateError (raise_exception, undefined).
_RENDER_ERRORS = (ArithmeticError, AttributeError, KeyError, IndexError, TypeError, ValueError)


@dataclass(frozen=True)
class TurnProblem:
    """Why one message of one conversation cannot be trained; ``conversation`` indexes the batch given."""

    conversation: int
    turn: int  # message index in the conversation
    problem: str
    expected: str = ""
    key: str = ""  # the message's field at fault, if one is (e.g. "reasoning_content")

    @property
    def field(self) -> str:
        return f"messages[{self.turn}]" + (f".{self.key}" if self.key else "")

    def __str__(self) -> str:
        return f"{self.field}: {self.problem}" + (f" (expected {self.expected})" if self.expected else "")


class ChatTemplateError(TuneforgeError):
    """Conversations the chat template cannot train, every problem named (see :class:`TurnProblem`)."""

    def __init__(self, problems: Sequence[TurnProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(f"conversation {p.conversation}: {p}" for p in self.problems))

    def __reduce__(self) -> tuple:  # survives the trip back from a tokenizing worker process
        return (type(self), (self.problems,))


@dataclass
class ChatView:
    """One training sequence of a conversation: its text, the turns it trains and the character spans with loss."""

    text: str
    turns: list[tuple[int, int, int]] = field(default_factory=list)  # (message index, completion start, end)
    spans: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class EncodedChat:
    """A training sequence, tokenized: ids, loss mask, and the text and offsets they came from (for previews)."""

    ids: np.ndarray  # int32
    mask: np.ndarray  # uint8, 1 where the token carries loss
    text: str
    offsets: np.ndarray  # (tokens, 2) character range of each token in `text`
    turns: list[int]  # message indices this sequence trains


def render_chat(
    tokenizer: Any, messages: Sequence[dict], template: str | None, add_generation_prompt: bool = False
) -> str:
    """Render messages to text with `template` (or the tokenizer's own) — the one path used for train and serve.

    Reasoning is passed under both of its names, so a record written for one family trains on another
    (``null`` reasoning is no reasoning).
    """
    return tokenizer.apply_chat_template(
        _template_messages(messages),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        chat_template=template,
    )


def _template_messages(messages: Sequence[dict]) -> list[dict]:
    """The messages as the template sees them: no ``weight``, reasoning under every name it goes by."""
    clean = []
    for m in messages:
        m = {k: v for k, v in m.items() if k != "weight" and not (k in REASONING_KEYS and v is None)}
        reasoning = next((m[k] for k in REASONING_KEYS if k in m), None)
        if reasoning is not None:
            m.update(dict.fromkeys(REASONING_KEYS, reasoning))
        clean.append(m)
    return clean


def special_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's control tokens, longest first."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    names = {t.content for t in added.values() if getattr(t, "special", False)}
    names.update(getattr(tokenizer, "all_special_tokens", ()))
    return sorted(names, key=len, reverse=True)


def end_of_turn(tokenizer: Any, template: str | None) -> str | None:
    """The token that ends an assistant turn — where serving stops: the first control token after its words.

    Read off the template itself (Phi-3.5's ``<|end|>``, gpt-oss's ``<|return|>``, Llama's ``<|eot_id|>``…), so
    a tokenizer whose eos is something else (Llama 3's ``<|end_of_text|>``) still gets the right one; the
    tokenizer's eos when the template writes no control token there.
    """
    from jinja2 import TemplateError

    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = render_chat(tokenizer, probe, template)
    except (TemplateError, *_RENDER_ERRORS):  # a template with requirements of its own (a system prompt…)
        return tokenizer.eos_token
    after = text[text.find(_PROBE) + len(_PROBE) :] if _PROBE in text else ""
    found = [(after.find(t), -len(t), t) for t in special_tokens(tokenizer) if t in after]
    return min(found)[2] if found else tokenizer.eos_token


def _require_template(tokenizer: Any, template: str | None) -> None:
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise TuneforgeError(
            "the tokenizer has no chat template (expected a model that ships one, or model.chat_template "
            "set to a built-in name such as 'chatml' or a Jinja string)"
        )


class _Refused(Exception):
    def __init__(self, turn: int, problem: str, expected: str = "", key: str = "") -> None:
        self.problem = TurnProblem(0, turn, problem, expected, key)


Renders = dict[tuple[int, bool], str]  # one conversation's renders: (messages[:n], generation prompt) → text


def _render(
    tokenizer: Any, messages: Sequence[dict], template: str | None, prompt: bool = False, memo: Renders | None = None
) -> str:
    """Render, or refuse naming the first message the template chokes on (its own exception says why).

    `memo` holds renders of prefixes of the same conversation (keyed by length): a turn's render through itself is
    often the whole conversation, and :func:`encode_chat_views` renders a batch's prefixes ahead, batched."""
    from jinja2 import TemplateError

    key = (len(messages), prompt)
    if memo is not None and key in memo:
        return memo[key]
    try:
        text = render_chat(tokenizer, messages, template, add_generation_prompt=prompt)
    except (TemplateError, *_RENDER_ERRORS) as e:
        turn = next(
            (k for k in range(len(messages)) if not _renders(tokenizer, messages[: k + 1], template)),
            len(messages) - 1,
        )
        raise _Refused(
            max(turn, 0),
            f"the chat template refuses the conversation here: {e}",
            "a conversation this model's chat template accepts",
        ) from None
    if memo is not None:
        memo[key] = text
    return text


def _renders(tokenizer: Any, messages: Sequence[dict], template: str | None) -> bool:
    from jinja2 import TemplateError

    try:
        render_chat(tokenizer, messages, template)
        return True
    except (TemplateError, *_RENDER_ERRORS):
        return False


def _served_turn(
    tokenizer: Any, messages: Sequence[dict], i: int, template: str | None, stop: str | None, memo: Renders
) -> tuple[str, str]:
    """``(prompt, completion)`` of assistant message `i` as serving shows it and the model writes it."""
    prompt = _render(tokenizer, messages[:i], template, prompt=True, memo=memo)
    through = _render(tokenizer, messages[: i + 1], template, memo=memo)
    if through.startswith(prompt):
        completion = through[len(prompt) :]
    elif messages[0].get("role") == "system" and i >= 2:
        # The template moves the system prompt (Mistral v0.3: onto the last user message), so no render of the
        # conversation through this turn holds the served prompt; the turn's own text does not depend on it.
        bare = messages[1:]
        bare_prompt = _render(tokenizer, bare[: i - 1], template, prompt=True)
        bare_through = _render(tokenizer, bare[:i], template)
        if not bare_through.startswith(bare_prompt):
            raise _Refused(i, *_INCONSISTENT)
        completion = bare_through[len(bare_prompt) :]
    else:
        raise _Refused(i, *_INCONSISTENT)
    if stop and stop in completion:  # keep the line break written with it; what follows is never generated
        end = completion.index(stop) + len(stop)
        completion = completion[:end] + completion[end : len(completion) - len(completion[end:].lstrip())]
    if not completion.strip():
        raise _Refused(i, "the chat template writes nothing for this assistant message", "a non-empty answer")
    message = messages[i]
    key = next((k for k in REASONING_KEYS if isinstance(message.get(k), str) and message[k].strip()), None)
    if key is not None:  # a template that ignores reasoning writes the same with it and without it
        unreasoned = {k: v for k, v in message.items() if k not in REASONING_KEYS}
        if _render(tokenizer, [*messages[:i], unreasoned], template) == through:
            raise _Refused(
                i,
                "this model's chat template does not render reasoning, so it would not be trained",
                "a model whose template renders reasoning, such as Qwen3 or gpt-oss, or no reasoning field",
                key,
            )
    return prompt, completion


_INCONSISTENT = (
    "the chat template renders the conversation before this turn differently once the turn is added, so "
    "training cannot show the model the prompt serving will",
    "a chat template that renders earlier messages the same whatever follows them",
)


def chat_views(
    tokenizer: Any,
    messages: Sequence[dict],
    template: str | None,
    loss_on: str = "assistant",
    *,
    stop: str | None = None,
    renders: Renders | None = None,
) -> list[ChatView]:
    """The training sequences of one conversation (usually one), in turn order.

    Trained turns are assistant messages (with ``weight`` 1 under ``loss_on="assistant"``, all of them under
    ``"all"``, which supervises every character of each sequence). A conversation with no trained turn is its
    whole render with nothing supervised. `stop` defaults to :func:`end_of_turn`; `renders` may hold renders of
    the conversation's prefixes already made (see :func:`prerender`). Raises :class:`ChatTemplateError`
    (``conversation`` 0) for a turn that cannot be trained.
    """
    _require_template(tokenizer, template)
    stop = end_of_turn(tokenizer, template) if stop is None else stop
    memo: Renders = {} if renders is None else renders
    try:
        full = ChatView(_render(tokenizer, messages, template, memo=memo))
    except _Refused as e:
        raise ChatTemplateError([e.problem]) from None
    views, problems = [full], []
    for i in reversed(trained_turns(messages, loss_on)):  # later turns first: a turn's own sequence can host earlier
        try:
            prompt, completion = _served_turn(tokenizer, messages, i, template, stop, memo)
        except _Refused as e:
            problems.insert(0, e.problem)
            continue
        served = prompt + completion
        host = next((v for v in views if v.text.startswith(served)), None)
        if host is None:
            host = ChatView(served)
            views.append(host)
        host.turns.insert(0, (i, len(prompt), len(served)))
    if problems:
        raise ChatTemplateError(problems)
    views = sorted((v for v in views if v.turns), key=lambda v: v.turns[0][0]) or [full]
    for v in views:
        v.spans = [(0, len(v.text))] if loss_on == "all" else [(s, e) for _, s, e in v.turns]
    return views


def trained_turns(messages: Sequence[dict], loss_on: str = "assistant") -> list[int]:
    """Indices of the assistant messages that carry loss (``weight`` 0 ones only under ``loss_on="all"``)."""
    return [
        i
        for i, m in enumerate(messages)
        if m.get("role") == "assistant" and (loss_on == "all" or m.get("weight", 1) != 0)
    ]


def prerender(
    tokenizer: Any, conversations: Sequence[Sequence[dict]], template: str | None, loss_on: str = "assistant"
) -> list[Renders]:
    """Every render :func:`chat_views` asks for, for a batch of conversations: one ``apply_chat_template`` call per
    kind (with and without the generation prompt) instead of one per render — the same renders, about half the
    time (transformers' per-call set-up is as costly as a short template's rendering).

    A batch the template refuses anywhere is left to :func:`chat_views`, which renders it one prefix at a time and
    names the message at fault."""
    from jinja2 import TemplateError

    memos: list[Renders] = [{} for _ in conversations]
    wanted: dict[bool, list[tuple[int, int]]] = {False: [], True: []}
    for c, messages in enumerate(conversations):
        keys = {(len(messages), False)}
        for i in trained_turns(messages, loss_on):
            keys |= {(i, True), (i + 1, False)}
        for n, prompt in sorted(keys):
            if n:  # an empty conversation is an error apply_chat_template raises only for a single one
                wanted[prompt].append((c, n))
    cleaned = [_template_messages(m) for m in conversations]
    for prompt, items in wanted.items():
        if not items:
            continue
        try:
            texts = tokenizer.apply_chat_template(
                [cleaned[c][:n] for c, n in items], tokenize=False, add_generation_prompt=prompt, chat_template=template
            )
        except (TemplateError, *_RENDER_ERRORS):
            continue
        for (c, n), text in zip(items, texts):
            memos[c][(n, prompt)] = text
    return memos


def assistant_spans(
    tokenizer: Any, messages: Sequence[dict], template: str | None, loss_on: str = "assistant"
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans that carry loss, for a conversation trained as one
    sequence (raises :class:`ChatTemplateError` when the template needs several)."""
    views = chat_views(tokenizer, messages, template, loss_on)
    if len(views) > 1:
        raise ChatTemplateError([_split_problem(0, views[0].turns[-1][0] if views[0].turns else 0)])
    return views[0].text, views[0].spans


def mask_from_offsets(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """1 for each token whose character range overlaps a span, else 0 (vectorised)."""
    mask = np.zeros(len(offsets), dtype=np.uint8)
    if not spans or len(offsets) == 0:
        return mask
    starts = np.array([s for s, _ in spans])
    ends = np.array([e for _, e in spans])
    tok_start, tok_end = offsets[:, 0], offsets[:, 1]
    idx = np.searchsorted(ends, tok_start, side="right")  # first span that ends after the token starts
    valid = idx < len(spans)
    idx_c = np.minimum(idx, len(spans) - 1)
    overlap = valid & (starts[idx_c] < np.maximum(tok_end, tok_start + 1))
    mask[overlap] = 1
    return mask


def encode_chat_views(
    tokenizer: Any, conversations: Sequence[Sequence[dict]], template: str | None, loss_on: str = "assistant"
) -> list[list[EncodedChat]]:
    """Every conversation's training sequences, tokenized (batched calls into the Rust tokenizer).

    One list per conversation, in input order — usually of one sequence. Raises :class:`ChatTemplateError`
    with every problem of every conversation.
    """
    if not conversations:
        return []
    _require_template(tokenizer, template)
    stop = end_of_turn(tokenizer, template)
    per_conv: list[list[ChatView]] = []
    problems: list[TurnProblem] = []
    for c, (conv, renders) in enumerate(zip(conversations, prerender(tokenizer, conversations, template, loss_on))):
        try:
            per_conv.append(chat_views(tokenizer, conv, template, loss_on, stop=stop, renders=renders))
        except ChatTemplateError as e:
            problems.extend(replace(p, conversation=c) for p in e.problems)
            per_conv.append([])
    if problems:
        raise ChatTemplateError(problems)
    flat = [v for views in per_conv for v in views]
    prompts = [v.text[:start] for v in flat for _, start, _ in v.turns]
    # Sequences and their served prompts in one call: a prompt's pieces are its sequence's, so they cost nothing.
    tokenized = encode_texts_ids(tokenizer, [v.text for v in flat] + prompts)
    encoded, prompt_ids = iter(tokenized[: len(flat)]), iter(ids for ids, _ in tokenized[len(flat) :])
    out: list[list[EncodedChat]] = []
    for views in per_conv:
        seqs: list[EncodedChat] = []
        for v in views:
            ids, offsets = next(encoded)
            # The served prompt must tokenize as the start of the sequence that trains its turn.
            split = [t for t in v.turns if not _starts_with(ids, next(prompt_ids))]
            if split:
                seqs.extend(_own_sequence(tokenizer, v.text, t, loss_on) for t in split)
                v.turns = [t for t in v.turns if t not in split]
                if not v.turns:
                    continue
                v.spans = [(0, len(v.text))] if loss_on == "all" else [(s, e) for _, s, e in v.turns]
            seqs.append(EncodedChat(ids, mask_from_offsets(offsets, v.spans), v.text, offsets, [t[0] for t in v.turns]))
        out.append(sorted(seqs, key=lambda s: s.turns[0] if s.turns else 0))
    return out


def _starts_with(ids: np.ndarray, prefix: np.ndarray) -> bool:
    return len(prefix) <= len(ids) and bool((ids[: len(prefix)] == prefix).all())


def _own_sequence(tokenizer: Any, text: str, turn: tuple[int, int, int], loss_on: str) -> EncodedChat:
    """A turn as prompt tokens + completion tokens, each tokenized alone: the prompt is exactly what serving feeds."""
    i, start, end = turn
    (prompt, prompt_offsets), (completion, completion_offsets) = encode_texts_ids(
        tokenizer, [text[:start], text[start:end]]
    )
    ids = np.concatenate([prompt, completion])
    offsets = np.concatenate([prompt_offsets, completion_offsets + start])
    n = len(prompt)
    mask = np.ones(len(ids), np.uint8) if loss_on == "all" else np.r_[np.zeros(n), np.ones(len(ids) - n)]
    return EncodedChat(ids, mask.astype(np.uint8), text[:end], offsets, [i])


def _split_problem(conversation: int, turn: int) -> TurnProblem:
    return TurnProblem(
        conversation,
        turn,
        "this model's chat template renders this turn differently once later turns follow, so it trains as a "
        "sequence of its own, and this method takes one sequence per example",
        "one trained assistant answer per example (earlier answers with weight 0)",
    )


def encode_chats(
    tokenizer: Any, conversations: Sequence[Sequence[dict]], template: str | None, loss_on: str = "assistant"
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token ids and loss masks, one sequence per conversation (methods that pair or label whole examples).

    A conversation the template splits into several sequences (see :func:`encode_chat_views`, which SFT uses)
    is refused with a :class:`ChatTemplateError` naming the turn.
    """
    out, problems = [], []
    for c, seqs in enumerate(encode_chat_views(tokenizer, conversations, template, loss_on)):
        if len(seqs) > 1:
            problems.append(_split_problem(c, seqs[0].turns[-1] if seqs[0].turns else 0))
        out.append((seqs[0].ids, seqs[0].mask))
    if problems:
        raise ChatTemplateError(problems)
    return out


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Raw text for continued pre-training: ``bos + text + eos``, cut into chunks of `max_length`."""
    enc = tokenizer(list(texts), add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for ids in enc["input_ids"]:
        full = np.asarray(bos + list(ids) + eos, dtype=np.int32)
        for start in range(0, len(full), max_length):
            chunk = full[start : start + max_length]
            if len(chunk) >= 2:
                out.append((chunk, np.ones(len(chunk), dtype=np.uint8)))
    return out
