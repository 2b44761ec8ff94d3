"""Built-in chat templates, for tokenizers that have none (or to override a tokenizer's own).

The same template string is saved with the tokenizer of every result, so serving renders prompts exactly
as training did.
"""

from __future__ import annotations

CHATML = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {"chatml": CHATML}


def resolve_template(name_or_jinja: str) -> str:
    """A built-in name gives its template; anything containing Jinja syntax is taken as a template."""
    if name_or_jinja in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name_or_jinja]
    if "{%" in name_or_jinja or "{{" in name_or_jinja:
        return name_or_jinja
    from tuneforge.errors import RecipeError

    raise RecipeError(
        f"model.chat_template: unknown template {name_or_jinja!r} "
        f"(expected one of {', '.join(BUILTIN_TEMPLATES)} or a Jinja template string)"
    )
