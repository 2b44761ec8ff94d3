"""The prompt registry: the chat template and system prompts a model was trained with, versioned in MLflow.

"The served prompt is the trained prompt": every registered model version carries a tag naming the prompt
versions it was trained with (``tuneforge.prompt.chat_template = prompts:/NAME.chat_template/2``), and
``resolve_model`` hands that template to eval and serving. Prompts are stored with MLflow's prompt registry on
the same store as the models, through a client bound to that store (``MlflowClient.register_prompt``, not the
fluent ``mlflow.genai.register_prompt``, which writes to the process-wide registry URI). A text that is already
the latest version is not registered again, so versions change exactly when the text does.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tuneforge.errors import ModelError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

SCHEME = "prompts:/"
TAG_PREFIX = "tuneforge.prompt."  # model-version tags: tuneforge.prompt.chat_template, tuneforge.prompt.system.0…
HASH_TAG = "tuneforge.text_sha256"
LINKED_PROMPTS_TAG = "mlflow.linkedPrompts"  # how MLflow links prompt versions to runs and logged models (UI)
_BAD = re.compile(r"[^A-Za-z0-9_.-]")  # MLflow prompt names: letters, digits, '-', '_' and '.'


@dataclass(frozen=True)
class PromptRef:
    name: str
    version: str

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.name}/{self.version}"


def prompt_name(model: str, kind: str) -> str:
    """The prompt that holds ``kind`` (``chat_template``, ``system``…) for registered model ``model``.

    A prompt shares the registered-model namespace in MLflow, so it cannot be called like the model itself.
    """
    return _BAD.sub("-", f"{model}.{kind}")


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def register_text(
    client: MlflowClient, name: str, text: str | list[dict[str, str]], *, message: str | None = None
) -> PromptRef:
    """``text`` (a template string, or chat messages) as the latest version of prompt ``name``: the existing
    version when it already is the latest, a new version otherwise."""
    latest = latest_version(client, name)
    if latest is not None and latest.template == text:
        return PromptRef(name, str(latest.version))
    digest = text_hash(text if isinstance(text, str) else json.dumps(text, sort_keys=True))
    created = client.register_prompt(name, text, commit_message=message, tags={HASH_TAG: digest})
    return PromptRef(name, str(created.version))


def latest_version(client: MlflowClient, name: str) -> Any:
    """The newest version of prompt ``name`` (``PromptVersion``), or None when there is no such prompt."""
    if client.get_prompt(name) is None:
        return None
    found = list(client.search_prompt_versions(name, max_results=1000))
    return max(found, key=lambda p: int(p.version)) if found else None


def parse_uri(uri: str) -> PromptRef:
    body = uri.removeprefix(SCHEME)
    name, _, version = body.rpartition("/")
    if not uri.startswith(SCHEME) or not name or not version.isdigit():
        raise ModelError(f"prompt {uri!r}: expected {SCHEME}NAME/VERSION")
    return PromptRef(name, version)


def load_text(client: MlflowClient, uri: str) -> Any:
    """The text (or chat messages) of ``prompts:/NAME/VERSION``; a clear error when it was deleted."""
    ref = parse_uri(uri)
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_prompt_version(ref.name, ref.version)
    except MlflowException:
        found = None
    if found is None:
        raise ModelError(f"prompt {uri}: not found in the prompt registry (deleted?)")
    return found.template


def linked_prompts(current: str | None, uris: Sequence[str]) -> str:
    """The value of MLflow's linked-prompts tag with ``uris`` added (JSON list of name/version, no duplicates)."""
    entries = json.loads(current) if current else []
    for uri in uris:
        ref = parse_uri(uri)
        entry = {"name": ref.name, "version": ref.version}
        if entry not in entries:
            entries.append(entry)
    return json.dumps(entries)
