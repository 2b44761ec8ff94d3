"""Record formats: what a valid record looks like, and its one canonical shape.

Five formats, with OpenAI's fine-tuning rules where they exist:

- ``messages``: ``{"messages": [...], "tools"?: [...]}`` — a chat; assistant messages may carry
  ``weight`` 0/1 (0 = shown as context, not trained on) and their reasoning as ``reasoning_content``
  (or ``thinking``: the same field under gpt-oss's name).
- ``prompt_completion``: ``{"prompt": str, "completion": str}``.
- ``text``: ``{"text": str}`` for continued pre-training.
- ``preference``: OpenAI's DPO shape ``{"input": {"messages": [...]}, "preferred_output": [...],
  "non_preferred_output": [...]}`` or ``{"prompt", "chosen", "rejected"}`` (strings or message lists).
- ``prompt``: ``{"messages": [... ending with a user message], ...}`` for online RL (GRPO, PPO), as in
  OpenAI's reinforcement fine-tuning; any other keys are kept for the graders (``{{item.answer}}``).
  Never auto-detected: the method asks for it.
- ``unpaired``: one completion with a thumbs-up / thumbs-down ``label`` (KTO): ``{"prompt", "completion",
  "label": true|false}`` (strings or message lists, as TRL's unpaired-preference data), or an OpenAI-style chat
  ``{"messages": [... ending with an assistant message], "label": true|false}``.

``check_record`` returns every problem as ``(field, problem, expected)`` with a field path such as
``messages[2].role``; ``to_canonical`` turns a record that passed into the shape the rest of tuneforge
uses, so no later stage needs to know which file format or record format the data came in.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from tuneforge.errors import TuneforgeError, suggest

FORMATS = ("messages", "prompt_completion", "text", "preference", "prompt", "unpaired")
ROLES = ("system", "user", "assistant", "tool")
REASONING_KEYS = ("reasoning_content", "thinking")  # the templates that render reasoning read one or the other
MESSAGE_KEYS = ("role", "content", "weight", "name", "tool_calls", "tool_call_id", *REASONING_KEYS)

# Top-level keys each format (or preference shape) may carry.
_KEYS = {
    "messages": ("messages", "tools"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "pairs": ("prompt", "chosen", "rejected"),
    "openai_dpo": ("input", "preferred_output", "non_preferred_output"),
    "prompt": ("messages", "tools"),
    "unpaired": ("prompt", "completion", "label"),
    "unpaired_chat": ("messages", "tools", "label"),
}
_REQUIRED = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "pairs": ("prompt", "chosen", "rejected"),
    "openai_dpo": ("input", "preferred_output", "non_preferred_output"),
    "prompt": ("messages",),
    "unpaired": ("prompt", "completion", "label"),
    "unpaired_chat": ("messages", "label"),
}
_DPO_INPUT_KEYS = ("messages", "tools")
_ALL_KEYS = tuple(dict.fromkeys(k for keys in _KEYS.values() for k in keys))
_ONE_OF_ROLES = "one of " + ", ".join(ROLES)
_NON_EMPTY = "a non-empty string"

Issue = tuple[str, str, str]  # (field path, problem, expected)


def resolve_format(fmt: str, *, allow_auto: bool = True) -> str:
    """Check a format name given by the user (``auto`` allowed unless told otherwise)."""
    names = (*FORMATS, "auto") if allow_auto else FORMATS
    if fmt in names:
        return fmt
    raise TuneforgeError(f"unknown data format {fmt!r} (expected {_one_of(names, fmt)})")


def detect_format(value: Any) -> str | None:
    """The format a record's keys point to, or ``None`` when they match none."""
    if not isinstance(value, dict):
        return None
    if "label" in value and ("completion" in value or "messages" in value):
        return "unpaired"
    if "messages" in value:
        return "messages"
    if any(k in value for k in ("chosen", "rejected", "input", "preferred_output", "non_preferred_output")):
        return "preference"
    if "completion" in value:
        return "prompt_completion"
    if "text" in value:
        return "text"
    return None


def describe_unknown(value: Any) -> Issue:
    """The issue for a record whose format cannot be told from its keys (with a spelling hint)."""
    if not isinstance(value, dict):
        return ("", f"record is {_json_type(value)}", "a JSON object")
    expected = (
        "the keys of one format: messages | prompt+completion | text | prompt+chosen+rejected | "
        "input+preferred_output+non_preferred_output | prompt+completion+label"
    )
    for key in value:
        hint = suggest(str(key), _ALL_KEYS)
        if hint and key not in _ALL_KEYS:
            expected += f"{hint[:-1]} for {key!r}?"
            break
    keys = ", ".join(map(str, value)) or "none"
    return ("", f"unknown format: cannot tell it from the keys ({keys})", expected)


def check_record(value: Any, fmt: str, *, allow_extra: Collection[str] = ()) -> list[Issue]:
    """Every problem of ``value`` as a record of format ``fmt``; empty when the record is valid.

    ``allow_extra`` names top-level keys a record may carry beyond its format's own (RL grader data keeps
    reference answers there); ``"*"`` allows any.
    """
    if not isinstance(value, dict):
        return [("", f"record is {_json_type(value)}", "a JSON object")]
    issues: list[Issue] = []
    shape = _shape(value, fmt)
    _check_keys(value, shape, ("*",) if shape == "prompt" else allow_extra, issues)  # prompts carry grader keys
    if shape == "messages":
        if "messages" in value:
            _check_chat(value["messages"], "messages", issues)
        if "tools" in value:
            _check_tools(value["tools"], "tools", issues)
    elif shape == "prompt":
        if "messages" in value:
            _check_prompt(value["messages"], "messages", issues)
        if "tools" in value:
            _check_tools(value["tools"], "tools", issues)
    elif shape == "prompt_completion":
        for key in ("prompt", "completion"):
            if key in value:
                _check_text(value[key], key, issues)
    elif shape == "text":
        if "text" in value:
            _check_text(value["text"], "text", issues)
    elif shape in ("unpaired", "unpaired_chat"):
        _check_unpaired(value, shape, issues)
    elif shape == "pairs":
        if isinstance(value.get("prompt"), str):
            _check_text(value["prompt"], "prompt", issues)
        elif "prompt" in value:
            _check_prompt(value["prompt"], "prompt", issues)
        for key in ("chosen", "rejected"):
            if isinstance(value.get(key), str):
                _check_text(value[key], key, issues)
            elif key in value:
                _check_response(value[key], key, issues)
        _check_differ(value, "chosen", "rejected", issues)
    else:  # openai_dpo
        if "input" in value:
            _check_dpo_input(value["input"], issues)
        for key in ("preferred_output", "non_preferred_output"):
            if key in value:
                _check_response(value[key], key, issues)
        _check_differ(value, "preferred_output", "non_preferred_output", issues)
    return issues


def to_canonical(value: dict, fmt: str) -> dict:
    """The canonical form of a valid record; keys outside the format (allowed extras) are kept as they are.

    chat → ``{"messages": [...]}`` (``weight`` kept, as an int); prompt/completion → a user and an assistant
    message; text → ``{"text": ...}``; preference → ``{"prompt": [...], "chosen": [...], "rejected": [...]}``.
    """
    shape = _shape(value, fmt)
    own = _KEYS[shape]
    extra = {k: v for k, v in value.items() if k not in own}
    if shape in ("messages", "prompt"):
        out: dict = {"messages": [_canonical_message(m) for m in value["messages"]]}
        if "tools" in value:
            out["tools"] = value["tools"]
    elif shape == "prompt_completion":
        out = {
            "messages": [
                {"role": "user", "content": value["prompt"]},
                {"role": "assistant", "content": value["completion"]},
            ]
        }
    elif shape == "text":
        out = {"text": value["text"]}
    elif shape == "unpaired":
        out = {
            "prompt": _as_messages(value["prompt"], "user"),
            "completion": _as_messages(value["completion"], "assistant"),
            "label": value["label"],
        }
    elif shape == "unpaired_chat":
        msgs = [_canonical_message(m) for m in value["messages"]]
        cut = len(msgs)
        while cut > 0 and msgs[cut - 1]["role"] == "assistant":
            cut -= 1
        out = {"prompt": msgs[:cut], "completion": msgs[cut:], "label": value["label"]}
        if "tools" in value:
            out["tools"] = value["tools"]
    elif shape == "pairs":
        out = {
            "prompt": _as_messages(value["prompt"], "user"),
            "chosen": _as_messages(value["chosen"], "assistant"),
            "rejected": _as_messages(value["rejected"], "assistant"),
        }
    else:
        inp = value["input"]
        out = {
            "prompt": [_canonical_message(m) for m in inp["messages"]],
            "chosen": [_canonical_message(m) for m in value["preferred_output"]],
            "rejected": [_canonical_message(m) for m in value["non_preferred_output"]],
        }
        if "tools" in inp:
            out["tools"] = inp["tools"]
    return {**out, **extra}


# ---------------------------------------------------------------------------------------------- helpers


def _shape(value: dict, fmt: str) -> str:
    """The key layout to check: a format name, or one of the two preference shapes."""
    fmt = resolve_format(fmt, allow_auto=False)
    if fmt == "unpaired":
        return "unpaired_chat" if "messages" in value else "unpaired"
    if fmt != "preference":
        return fmt
    dpo_keys = ("input", "preferred_output", "non_preferred_output")
    return "openai_dpo" if any(k in value for k in dpo_keys) else "pairs"


def _check_keys(value: dict, shape: str, allow_extra: Collection[str], issues: list[Issue]) -> None:
    own = _KEYS[shape]
    for key in _REQUIRED[shape]:
        if key not in value:
            expected = "a string or an array of prompt messages" if shape == "pairs" and key == "prompt" else None
            issues.append((key, "missing", expected or _REQUIRED_TEXT.get(key, _NON_EMPTY)))
    if "*" in allow_extra:
        return
    for key in value:
        if key not in own and key not in allow_extra:
            issues.append((str(key), "unknown key", _one_of((*own, *sorted(allow_extra)), str(key))))


_REQUIRED_TEXT = {
    "messages": "an array of messages",
    "input": 'an object {"messages": [...]}',
    "preferred_output": "an array with the preferred assistant message",
    "non_preferred_output": "an array with the non-preferred assistant message",
    "chosen": "a string or an array of assistant messages",
    "rejected": "a string or an array of assistant messages",
    "completion": "a string or an array of assistant messages",
    "label": "true (desirable) or false (undesirable)",
}


def _check_text(text: Any, field: str, issues: list[Issue]) -> None:
    if not isinstance(text, str):
        issues.append((field, f"is {_json_type(text)}", _NON_EMPTY))
    elif not text.strip():
        issues.append((field, "is empty" if not text else "is only whitespace", _NON_EMPTY))


def _check_message(m: Any, where: str, issues: list[Issue], *, allow_weight: bool) -> str | None:
    """Check one message on its own; returns its role when that role is valid."""
    if not isinstance(m, dict):
        issues.append((where, f"is {_json_type(m)}", "a message object with 'role' and 'content'"))
        return None
    for key in m:
        if key not in MESSAGE_KEYS:
            issues.append((f"{where}.{key}", "unknown key", _one_of(MESSAGE_KEYS, str(key))))
    role = m.get("role")
    if role is None:
        issues.append((f"{where}.role", "missing", _ONE_OF_ROLES))
        role_ok = None
    elif role not in ROLES:
        issues.append((f"{where}.role", f"unknown role {role!r}", _one_of(ROLES, str(role))))
        role_ok = None
    else:
        role_ok = role

    has_tool_calls = False
    if "tool_calls" in m:
        if role_ok is not None and role_ok != "assistant":
            issues.append((f"{where}.tool_calls", f"not allowed on a {role_ok} message", "only on assistant messages"))
        else:
            has_tool_calls = _check_tool_calls(m["tool_calls"], f"{where}.tool_calls", issues)

    content = m.get("content")
    if has_tool_calls and (content is None or isinstance(content, str)):
        pass  # an assistant message that only calls tools may have no text
    elif content is None:
        issues.append((f"{where}.content", "missing" if "content" not in m else "is null", _NON_EMPTY))
    else:
        _check_text(content, f"{where}.content", issues)

    if "weight" in m:
        w = m["weight"]
        if role_ok is not None and role_ok != "assistant":
            issues.append((f"{where}.weight", f"not allowed on a {role_ok} message", "only on assistant messages"))
        elif not allow_weight:
            issues.append((f"{where}.weight", "not used in this format", "no weight key"))
        elif isinstance(w, bool) or not isinstance(w, (int, float)) or w not in (0, 1):
            issues.append((f"{where}.weight", f"is {w!r}", "0 or 1"))
    for key in REASONING_KEYS:
        if key not in m:
            continue
        if role_ok is not None and role_ok != "assistant":
            issues.append((f"{where}.{key}", f"not allowed on a {role_ok} message", "only on assistant messages"))
        elif m[key] is not None and not isinstance(m[key], str):  # null: no reasoning
            issues.append((f"{where}.{key}", f"is {_json_type(m[key])}", "a string"))
    if "name" in m:
        _check_text(m["name"], f"{where}.name", issues)
    if "tool_call_id" in m:
        if role_ok is not None and role_ok != "tool":
            issues.append((f"{where}.tool_call_id", f"not allowed on a {role_ok} message", "only on tool messages"))
        else:
            _check_text(m["tool_call_id"], f"{where}.tool_call_id", issues)
    return role_ok


def _check_tool_calls(calls: Any, where: str, issues: list[Issue]) -> bool:
    """Check an assistant's ``tool_calls``; True when they are usable (so content may be empty)."""
    if not isinstance(calls, list) or not calls:
        got = "is empty" if calls == [] else f"is {_json_type(calls)}"
        issues.append((where, got, "a non-empty array of tool calls"))
        return False
    ok = True
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            issues.append((f"{where}[{i}]", "has no function name", '{"function": {"name": …, "arguments": …}}'))
            ok = False
        elif "arguments" in fn and not isinstance(fn["arguments"], (str, dict)):
            got = f"is {_json_type(fn['arguments'])}"
            issues.append((f"{where}[{i}].function.arguments", got, "a JSON string or object"))
            ok = False
    return ok


def _check_tools(tools: Any, where: str, issues: list[Issue]) -> None:
    if not isinstance(tools, list):
        issues.append((where, f"is {_json_type(tools)}", "an array of tool definitions"))
        return
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            issues.append((f"{where}[{i}]", f"is {_json_type(tool)}", "a tool definition object"))


def _check_sequence(msgs: Any, where: str, issues: list[Issue], *, allow_weight: bool) -> list[str | None] | None:
    """Check a list of messages and the role-order rules shared by chats and prompts; returns the roles."""
    if not isinstance(msgs, list):
        issues.append((where, f"is {_json_type(msgs)}", "a non-empty array of messages"))
        return None
    if not msgs:
        issues.append((where, "is empty", "a non-empty array of messages"))
        return None
    roles: list[str | None] = []
    for i, m in enumerate(msgs):
        roles.append(_check_message(m, f"{where}[{i}]", issues, allow_weight=allow_weight))
    for i, role in enumerate(roles):
        if role == "system" and i > 0:
            issues.append((f"{where}[{i}].role", "system message after the start", "system only as the first message"))
        elif role == "tool" and not _follows_tool_call(msgs, roles, i):
            issues.append(
                (f"{where}[{i}].role", "tool message without a tool call", "an assistant tool_calls message before it")
            )
    first = 1 if roles[0] == "system" else 0
    if first < len(roles) and roles[first] == "assistant":  # a misplaced system or tool is flagged above
        got = f"conversation starts with {roles[first]!r}"
        issues.append((f"{where}[{first}].role", got, "'user' first (after an optional system message)"))
    return roles


def _follows_tool_call(msgs: list, roles: list[str | None], i: int) -> bool:
    j = i - 1
    while j >= 0 and roles[j] == "tool":
        j -= 1
    return j >= 0 and roles[j] == "assistant" and bool(msgs[j].get("tool_calls"))


def _check_chat(msgs: Any, where: str, issues: list[Issue]) -> None:
    roles = _check_sequence(msgs, where, issues, allow_weight=True)
    if roles is None:
        return
    assistant = [m for m, r in zip(msgs, roles) if r == "assistant"]
    if not assistant:
        issues.append((where, "has no assistant message", "at least one assistant message to learn from"))
    elif all(m.get("weight", 1) == 0 for m in assistant):
        issues.append((where, "every assistant message has weight 0", "at least one assistant message with weight 1"))


def _check_prompt(msgs: Any, where: str, issues: list[Issue]) -> None:
    roles = _check_sequence(msgs, where, issues, allow_weight=False)
    if roles and roles[-1] is not None and roles[-1] not in ("user", "tool"):
        got = f"prompt ends with {roles[-1]!r}"
        issues.append((f"{where}[{len(roles) - 1}].role", got, "a prompt ending with a user (or tool) message"))


def _check_response(msgs: Any, where: str, issues: list[Issue]) -> None:
    if not isinstance(msgs, list) or not msgs:
        got = "is empty" if msgs == [] else f"is {_json_type(msgs)}"
        issues.append((where, got, "a non-empty array of assistant messages"))
        return
    for i, m in enumerate(msgs):
        role = _check_message(m, f"{where}[{i}]", issues, allow_weight=False)
        if role is not None and role != "assistant":
            issues.append((f"{where}[{i}].role", f"is {role!r}", "'assistant' (a response is assistant messages)"))


def _check_unpaired(value: dict, shape: str, issues: list[Issue]) -> None:
    """A KTO example: a prompt, one completion and a boolean label (desirable or not)."""
    if "label" in value and not isinstance(value["label"], bool):
        issues.append(("label", f"is {_json_type(value['label'])}", "true (desirable) or false (undesirable)"))
    if shape == "unpaired_chat":
        if "messages" in value:
            roles = _check_sequence(value["messages"], "messages", issues, allow_weight=False)
            if roles and roles[-1] is not None and roles[-1] != "assistant":
                issues.append(
                    (
                        f"messages[{len(roles) - 1}].role",
                        f"conversation ends with {roles[-1]!r}",
                        "the labelled assistant answer last",
                    )
                )
            elif roles and all(r == "assistant" for r in roles):
                issues.append(("messages", "has no prompt", "user (or system) messages before the labelled answer"))
        if "tools" in value:
            _check_tools(value["tools"], "tools", issues)
        return
    if isinstance(value.get("prompt"), str):
        _check_text(value["prompt"], "prompt", issues)
    elif "prompt" in value:
        _check_prompt(value["prompt"], "prompt", issues)
    if isinstance(value.get("completion"), str):
        _check_text(value["completion"], "completion", issues)
    elif "completion" in value:
        _check_response(value["completion"], "completion", issues)


def _check_dpo_input(inp: Any, issues: list[Issue]) -> None:
    if not isinstance(inp, dict):
        issues.append(("input", f"is {_json_type(inp)}", _REQUIRED_TEXT["input"]))
        return
    for key in inp:
        if key not in _DPO_INPUT_KEYS:
            issues.append((f"input.{key}", "unknown key", _one_of(_DPO_INPUT_KEYS, str(key))))
    if "messages" not in inp:
        issues.append(("input.messages", "missing", "an array of prompt messages"))
    else:
        _check_prompt(inp["messages"], "input.messages", issues)
    if "tools" in inp:
        _check_tools(inp["tools"], "input.tools", issues)


def _check_differ(value: dict, a: str, b: str, issues: list[Issue]) -> None:
    if a in value and b in value and value[a] == value[b]:
        issues.append((b, f"is identical to {a}", f"a response different from {a} (an identical pair teaches nothing)"))


def _canonical_message(m: dict) -> dict:
    out = dict(m)
    if "weight" in out:
        out["weight"] = int(out["weight"])
    return out


def _as_messages(value: str | list, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [_canonical_message(m) for m in value]


def _one_of(valid: Collection[str], got: str) -> str:
    return "one of " + ", ".join(valid) + suggest(got, list(valid))


def _json_type(value: Any) -> str:
    """JSON's name for a Python value's type, since users think in their file's terms."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"
