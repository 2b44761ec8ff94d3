"""What a registered model version records about how it was made, so that it can be found and trusted later.

Every successful run with tracking on registers its result (``tracking.auto_register: false`` opts out). The name is
``tracking.register_as``, or else the recipe's ``name``: the recipe is the customization a user iterates on, so
re-running it — new data, new settings — adds versions 1, 2, 3 of one model to compare and alias, rather than a
new one-version model per run (which run-directory names would give).

Tags (on the version and its logged model): the base model with its content fingerprint (and hub revision, or the
registry reference it came from), every data file's hash and the realised mixture, the recipe hash, method,
adapter kind, tuneforge version, the eval reports found beside the run, and the prompt-registry versions of the
chat template and system prompts the model was trained with.
"""

from __future__ import annotations

import collections
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from tuneforge.config import Recipe

SYSTEM_SCAN_RECORDS = 10_000  # per source: enough to see a dataset's system prompts without re-reading a huge file
MAX_SYSTEM_PROMPTS = 16
MAX_EVAL_TAGS = 200


def registered_name(recipe: Recipe) -> str | None:
    """The model name a run's result registers under, or None when the recipe opts out."""
    if not recipe.tracking.enabled or not recipe.tracking.auto_register:
        return None
    return recipe.tracking.register_as or recipe.name.replace(":", "-")  # MLflow names may not hold ':'


def register_result(recipe: Recipe, prepared: Any, run_dir: Path, local_dir: Path, tracker: Any) -> str | None:
    """Register the trained prompts, then ``local_dir`` as a new version with its lineage; the version number."""
    from tuneforge.tracking.prompts import TAG_PREFIX, prompt_name

    name = registered_name(recipe)
    if name is None:
        return None
    tags = lineage_tags(recipe, prepared, run_dir)
    linked: list[str] = []
    template = getattr(prepared, "template", None)
    if template:
        uri = tracker.register_prompt(prompt_name(name, "chat_template"), template, f"chat template of {run_dir.name}")
        tags[f"{TAG_PREFIX}chat_template"] = uri
        linked.append(uri)
    system = system_prompts(recipe)
    if system:
        messages = [{"role": "system", "content": text} for text in system]
        uri = tracker.register_prompt(prompt_name(name, "system"), messages, f"system prompts of {run_dir.name}")
        tags[f"{TAG_PREFIX}system"] = uri
        linked.append(uri)
    version = tracker.register_model(local_dir, name, tags=tags, prompts=linked)
    return None if version is None else str(version)


def lineage_tags(recipe: Recipe, prepared: Any, run_dir: Path) -> dict[str, Any]:
    from tuneforge.models.loading import model_fingerprint
    from tuneforge.models.refs import source_of

    base = recipe.model.path
    tags: dict[str, Any] = {
        "base_model": base,
        "base_model.hash": model_fingerprint(base),
        "base_model.revision": hub_revision(base),
        "tokenizer": recipe.model.tokenizer,
        "recipe_hash": recipe.hash(),
        "method": recipe.method,
        "adapter": recipe.adapter.kind,
        "tuneforge_version": tuneforge_version(),
        "run_dir": str(run_dir),
        **{f"data_hash.{k}": v for k, v in prepared.data_hashes.items()},
    }
    source = source_of(base) if Path(base).is_dir() else None
    if source is not None:  # the run started from a registered version or a fine-tuned model
        tags["base_model.ref"] = source["ref"]
        if "registered" in source:
            tags["base_model.registered"] = source["registered"]["uri"]
    mix = prepared.mix_dict()
    tags["data.mix"] = json.dumps(mix, default=str)
    for i, src in enumerate(mix.get("names") or []):
        realised = mix.get("realised") or []
        if i < len(realised):
            tags[f"mix.{src}"] = f"{float(realised[i]):.4f}"
    tags.update(eval_tags(run_dir))
    return {k: v for k, v in tags.items() if v is not None}


def hub_revision(name: str) -> str | None:
    """The commit of a hub model in the local cache (what was actually trained on), or None for local dirs."""
    if Path(name).expanduser().exists():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid repo id, or no cache: the name is all there is
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def tuneforge_version() -> str:
    try:
        return metadata.version("tuneforge")
    except metadata.PackageNotFoundError:
        return "unknown"


def system_prompts(recipe: Recipe) -> list[str]:
    """The distinct system messages of the training data, most frequent first (the first records of each source)."""
    from tuneforge.data.readers import read_records
    from tuneforge.errors import TuneforgeError

    counts: collections.Counter[str] = collections.Counter()
    for source in recipe.data.sources:
        try:
            for i, record in enumerate(read_records(source.path)):
                if i >= SYSTEM_SCAN_RECORDS:
                    break
                for message in _messages(record.value):
                    if isinstance(message, dict) and message.get("role") == "system":
                        content = message.get("content")
                        if isinstance(content, str) and content:
                            counts[content] += 1
        except (OSError, TuneforgeError):  # the data moved since training: lineage without system prompts
            continue
    return [text for text, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_SYSTEM_PROMPTS]]


def _messages(value: Any) -> list[Any]:
    """The chat messages of a record in any tuneforge format (messages, prompt lists, OpenAI's DPO ``input``)."""
    if not isinstance(value, dict):
        return []
    for key in ("messages", "prompt"):
        if isinstance(value.get(key), list):
            return value[key]
    inner = value.get("input")
    if isinstance(inner, dict) and isinstance(inner.get("messages"), list):
        return inner["messages"]
    return []


def eval_tags(run_dir: Path) -> dict[str, Any]:
    """Scalars of the eval results beside the run, as ``eval.…`` tags.

    ``tuneforge eval`` writes ``run_dir/eval/summary.json`` (scalars per ``task/metric``) next to the full
    ``report.json`` (per-item statistics, too big for tags); the summaries are used where there are any, else
    every JSON file under ``eval/``. ``eval/summary.json`` gives ``eval.metrics.<task>/<metric>.value`` and so on;
    a report in a sub-folder or under another name gets that path in its keys.
    """
    folder = run_dir / "eval"
    if not folder.is_dir():
        return {}
    files = sorted(folder.rglob("summary.json")) or sorted(folder.rglob("*.json"))
    tags: dict[str, Any] = {}
    for path in files:
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        rel = path.relative_to(folder)
        parts = [*rel.parent.parts, *([] if rel.stem == "summary" else [rel.stem])]
        prefix = ".".join(["eval", *parts])
        for key, value in _scalars(report, prefix):
            if len(tags) >= MAX_EVAL_TAGS:
                return tags
            tags[key] = value
    return tags


def _scalars(value: Any, prefix: str) -> list[tuple[str, Any]]:
    """Numbers, booleans and short strings of a JSON tree by dotted key; lists (per-item scores) are skipped."""
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in _scalars(v, f"{prefix}.{k}")]
    if isinstance(value, (bool, int, float)):
        return [(prefix, value)]
    if isinstance(value, str) and len(value) <= 200:
        return [(prefix, value)]
    return []
