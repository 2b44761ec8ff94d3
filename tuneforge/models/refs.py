"""Model references: every way a user names a model, resolved to the files that load it.

One function, :func:`resolve_model`, is what train, eval and serve call with whatever the user typed:

* a model directory (``config.json``) → that directory;
* a PEFT adapter directory (``adapter_config.json``) → the base its ``base_model_name_or_path`` names + the adapter;
* a tuneforge run directory → its result (``adapter/`` or ``model/``; ``final/…`` for elastic runs);
* ``models:/NAME/3``, ``models:/NAME@ALIAS``, ``models:/NAME`` (latest) → that registered version's files, with
  the chat template of the prompt version it was trained with;
* ``ft:BASE:PROJECT:SUFFIX:JOBID`` (and ``…:ckpt-step-N``) → the jobs service's result (or checkpoint), through
  the index the scheduler writes (:mod:`tuneforge.models.fine_tuned`);
* a training checkpoint (``checkpoints/step-N``) → the adapter or model it holds, exported once beside it;
* a hub id (``org/name``) → itself: the only case in which loading may download anything.

Resolving reads a few small JSON files (and, for ``models:/``, the registry); no weights are touched until
:func:`load_model` — except a training checkpoint's first resolution, which writes its export.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge.errors import ModelError
from tuneforge.models.loading import TOKENIZER_FILES

if TYPE_CHECKING:
    from tuneforge.config import Recipe

REGISTRY_SCHEME = "models:/"
FT_PREFIX = "ft:"
CKPT = re.compile(r"^(?P<model>.+):ckpt-step-(?P<step>\d+)$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
RESULT_DIRS = ("adapter", "model", "final/adapter", "final/model")  # where runs save (api.py, training/elastic.py)
SOURCE_FILE = "tuneforge_source.json"  # in a starting point tuneforge made from a reference: what it came from


@dataclass(frozen=True)
class ModelRef:
    """What a reference resolved to; see the module docstring for each kind."""

    ref: str  # what the user typed
    base: str  # full-weights model dir or hub id
    adapter: str | None  # PEFT adapter dir applied on top, if any
    tokenizer: str  # dir with the tokenizer + chat template training used
    chat_template: str | None  # template text to use (registry prompt version / saved tokenizer); None: unknown
    label: str  # short display name
    version: dict | None  # registry info (name, version, aliases, tags) when it came from the registry


def resolve_model(ref: str | Path, *, tracking_uri: str | None = None) -> ModelRef:
    """Resolve ``ref``; a :class:`ModelError` that says what was expected when it names nothing loadable.

    ``tracking_uri`` is the MLflow store ``models:/`` references are looked up in (default: the embedded one).
    """
    text = str(ref).strip()
    if not text:
        raise ModelError("model: empty model reference")
    if text.startswith(REGISTRY_SCHEME):
        return _from_registry(text, tracking_uri)
    if text.startswith(FT_PREFIX):
        return _from_fine_tuned(text)
    path = Path(text).expanduser()
    if path.exists():
        return _from_path(text, path)
    if _looks_local(text) or not HUB_ID.match(text):
        raise ModelError(
            f"model {text}: no such file or directory (expected a model or adapter directory, a run directory, "
            f"{REGISTRY_SCHEME}NAME/VERSION, {REGISTRY_SCHEME}NAME@ALIAS, an ft:… model name or a hub id like 'org/name')"
        )
    return ModelRef(ref=text, base=text, adapter=None, tokenizer=text, chat_template=None, label=text, version=None)


def load_model(ref: ModelRef | str, *, dtype: Any = None, device: Any = "cpu") -> tuple[Any, Any]:
    """The causal LM (PEFT adapter applied, not merged) in eval mode and its tokenizer with the trained template."""
    import torch

    from tuneforge.models import loading

    resolved = ref if isinstance(ref, ModelRef) else resolve_model(ref)
    model = loading.load_model(resolved.base, dtype=dtype or torch.float32, device=device)
    if resolved.adapter is not None:
        model = _apply_adapter(model, resolved)
    tokenizer = loading.load_tokenizer(resolved.tokenizer, resolved.chat_template)
    model.eval()
    return model, tokenizer


def training_start(ref: str, *, tracking_uri: str | None = None) -> tuple[str, dict[str, Any] | None]:
    """The full-weights directory a run starts from when ``model.path`` is a reference, and where it came from.

    A plain directory or hub id is returned as it is (no provenance). A ``models:/`` or ``ft:`` reference becomes a
    directory under ``$TUNEFORGE_HOME/cache/models`` (keyed by the files it names) holding ``tuneforge_source.json``,
    so the run's lineage names the reference: for a full model, links to its files; for an adapter, the adapter
    merged into its base once. Merging means the new run trains its own adapter — or all weights — on a plain
    model, so every method, adapter kind and reference model works unchanged, and the saved result needs only
    that one directory as its base (an adapter on an adapter would need both at every load).
    """
    if not is_reference(ref):
        return ref, None
    resolved = resolve_model(ref, tracking_uri=tracking_uri)
    source = {"ref": ref, "label": resolved.label, "base": resolved.base, "adapter": resolved.adapter}
    if resolved.version is not None:
        source["registered"] = {k: resolved.version[k] for k in ("name", "version", "uri")}
    return str(_start_dir(resolved, source)), source


def resolve_recipe_model(recipe: Recipe) -> Recipe:
    """``recipe`` with every model it names that is a ``models:/`` or ``ft:`` reference replaced by a directory.

    ``model.path`` and ``distill.teacher`` become full-weights directories (:func:`training_start`: an adapter is
    merged into its base once); ``ppo.reward_model`` becomes the reward model's own directory — a full model or
    the scalar-head adapter a ``method: reward`` run saved, which is what PPO loads. Errors name the field.
    """
    uri = recipe.tracking.uri
    out = recipe.model_copy(deep=True)
    changed = False
    path, source = training_start(recipe.model.path, tracking_uri=uri)
    if source is not None:
        out.model.path, changed = path, True
    if out.distill is not None and is_reference(out.distill.teacher):
        out.distill.teacher = _field(
            lambda: training_start(recipe.distill.teacher, tracking_uri=uri)[0], "distill.teacher"
        )
        changed = True
    if out.ppo is not None and is_reference(out.ppo.reward_model):
        ref = _field(lambda: resolve_model(recipe.ppo.reward_model, tracking_uri=uri), "ppo.reward_model")
        out.ppo.reward_model, changed = ref.adapter or ref.base, True
    return out if changed else recipe


def is_reference(text: str) -> bool:
    """Whether ``text`` names a registered version or a jobs-service model rather than a path or hub id."""
    return text.startswith((REGISTRY_SCHEME, FT_PREFIX))


def source_of(model_dir: str | Path) -> dict[str, Any] | None:
    """The provenance :func:`training_start` wrote into a merged starting point, if ``model_dir`` is one."""
    path = Path(model_dir) / SOURCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_chat_template(tokenizer_dir: str | Path) -> str | None:
    """The chat template saved with a tokenizer (``chat_template.jinja`` or ``tokenizer_config.json``), or None."""
    root = Path(tokenizer_dir)
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text()
    config = root / "tokenizer_config.json"
    if config.is_file():
        template = _read_json(config).get("chat_template")
        if isinstance(template, list):  # named templates: the default one is what chat rendering uses
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return template if isinstance(template, str) else None
    return None


# ----------------------------------------------------------------------------------------- kinds of reference


def _from_path(ref: str, path: Path, label: str | None = None) -> ModelRef:
    """A model, adapter or run directory."""
    if not path.is_dir():
        raise ModelError(f"model {ref}: {path} is a file; expected a model, adapter or run directory")
    if (path / "adapter_config.json").is_file():
        return _adapter_ref(ref, path, label)
    if (path / "config.json").is_file():
        tokenizer = str(path)
        return ModelRef(ref, str(path), None, tokenizer, read_chat_template(path), label or _label(path), None)
    from tuneforge.models.checkpoint_model import export_checkpoint, is_training_checkpoint

    if is_training_checkpoint(path):
        return _from_path(ref, export_checkpoint(path), label or f"{_label(path.parent.parent)}:{path.name}")
    for sub in RESULT_DIRS:
        if (path / sub).is_dir():
            return _from_path(ref, path / sub, label or path.name)
    if (path / "recipe.yaml").is_file():
        raise ModelError(f"model {ref}: run directory without a result yet (no {' or '.join(RESULT_DIRS[:2])}/ in it)")
    raise ModelError(
        f"model {ref}: {path} is not a model directory (expected config.json), an adapter directory "
        "(adapter_config.json) or a tuneforge run directory (adapter/ or model/)"
    )


def _adapter_ref(ref: str, path: Path, label: str | None) -> ModelRef:
    config = _read_json(path / "adapter_config.json")
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{path / 'adapter_config.json'}: base_model_name_or_path: missing (the adapter's base model)")
    base_path = Path(base).expanduser()
    if base_path.is_dir():
        base = str(base_path.resolve())
    elif _looks_local(base) or not HUB_ID.match(base):
        raise ModelError(
            f"model {ref}: the adapter's base model {base} (base_model_name_or_path in "
            f"{path / 'adapter_config.json'}) does not exist here; copy it back or load the adapter with another base"
        )
    has_tokenizer = any((path / f).is_file() for f in TOKENIZER_FILES)
    tokenizer = str(path) if has_tokenizer else base
    template = read_chat_template(tokenizer) if Path(tokenizer).is_dir() else None
    return ModelRef(ref, base, str(path), tokenizer, template, label or _label(path), None)


def _from_registry(ref: str, tracking_uri: str | None) -> ModelRef:
    from tuneforge.tracking import registry

    info = registry.resolve(ref, tracking_uri)
    files = registry.local_files(info, tracking_uri)
    resolved = _from_path(ref, files, label=f"{info.name}/{info.version}")
    return replace(
        resolved,
        chat_template=_registered_template(info, tracking_uri) or resolved.chat_template,
        version=info.as_dict(),
    )


def _registered_template(info: Any, tracking_uri: str | None) -> str | None:
    """The chat template of the prompt version the model version was trained with (its tag), if it has one."""
    from tuneforge.tracking import prompts, registry

    uri = info.tags.get(f"{prompts.TAG_PREFIX}chat_template")
    if not uri:
        return None
    client, _ = registry.open_client(tracking_uri)
    text = prompts.load_text(client, uri)
    return text if isinstance(text, str) else None


def _from_fine_tuned(ref: str) -> ModelRef:
    from tuneforge.models import fine_tuned

    entry = fine_tuned.lookup(ref)
    path = Path(entry.path)
    if not path.exists():
        gone = "the checkpoint was pruned or its job deleted" if CKPT.match(ref) else "its job directory was deleted"
        raise ModelError(f"model {ref}: its files at {path} are gone ({gone})")
    return _from_path(ref, path, label=ref)


# ------------------------------------------------------------------------------------------------- helpers


def _apply_adapter(model: Any, resolved: ModelRef) -> Any:
    from peft import PeftConfig, PeftModel

    from tuneforge.models.adapters import peft_quietly

    assert resolved.adapter is not None
    task = str(getattr(PeftConfig.from_pretrained(resolved.adapter).task_type, "value", "") or "CAUSAL_LM")
    if task != "CAUSAL_LM":
        raise ModelError(
            f"model {resolved.ref}: a {task} adapter (a reward model), not a language model; "
            "load it with tuneforge.models.reward.load_reward_model"
        )
    with peft_quietly():
        return PeftModel.from_pretrained(model, resolved.adapter, is_trainable=False)


def _start_dir(resolved: ModelRef, source: dict[str, Any]) -> Path:
    import shutil

    from tuneforge.files import atomic_write
    from tuneforge.models.export import merge_adapter
    from tuneforge.models.loading import model_fingerprint
    from tuneforge.paths import cache_dir

    parts = [model_fingerprint(resolved.base), _files_fingerprint(Path(resolved.adapter or resolved.base))]
    key = hashlib.sha256(":".join([*parts, resolved.chat_template or ""]).encode()).hexdigest()[:16]
    out = cache_dir("models") / f"start-{re.sub(r'[^A-Za-z0-9_.-]', '-', resolved.label)[:64]}-{key}"
    if (out / "config.json").exists() and (out / SOURCE_FILE).is_file():
        return out
    tmp = out.with_name(f".{out.name}-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if resolved.adapter is not None:
        merge_adapter(resolved.adapter, tmp, base=resolved.base)
    else:  # links, not copies: a registered full model can be gigabytes
        tmp.mkdir(parents=True)
        for f in Path(resolved.base).iterdir():
            (tmp / f.name).symlink_to(f.resolve(), target_is_directory=f.is_dir())
    if resolved.chat_template is not None:  # the registry's prompt version is the trained template
        (tmp / "chat_template.jinja").unlink(missing_ok=True)
        atomic_write(tmp / "chat_template.jinja", resolved.chat_template)
    atomic_write(tmp / SOURCE_FILE, json.dumps(source, indent=2))
    try:
        tmp.rename(out)
    except OSError:  # made by another process meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _field(resolve: Any, field: str) -> Any:
    """``resolve()``, with a failure's message prefixed by the recipe field the reference came from."""
    try:
        return resolve()
    except ModelError as e:
        raise type(e)(f"{field}: {e}") from None


def _files_fingerprint(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def _looks_local(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _label(path: Path) -> str:
    """A run's name for its result folders (``run/adapter`` → ``run``), else the folder's own name."""
    path = path.resolve()
    if path.name in ("adapter", "model", "merged", "export"):
        parent = path.parent.parent if path.parent.name in ("final", "checkpoints") else path.parent
        return parent.name
    return path.name
