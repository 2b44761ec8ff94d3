"""The model registry: list, show, alias and resolve versions of registered models.

Versions are what :meth:`Tracker.register_model` creates at the end of a run (the saved HF model or PEFT adapter
as a logged model's files, lineage as tags). Everything goes through an ``MlflowClient`` bound to one URI — the
embedded SQLite store by default — so nothing here changes MLflow's global state. Prompts live in the same
registry tables (MLflow marks them with a tag); they are left out of every listing here.
"""

from __future__ import annotations

import re
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge.errors import ModelError, UnknownModelError, suggest
from tuneforge.tracking.mlflow_tracker import clean_key, import_mlflow, resolve_tracking_uri

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

SCHEME = "models:/"
PROMPT_TAG = "mlflow.prompt.is_prompt"  # MLflow's marker for prompts stored as registered models
ALIAS = re.compile(r"^[A-Za-z0-9_-]{1,255}$")  # MLflow: letters, digits, '_' and '-'; never 'latest' or v<N>


@dataclass(frozen=True)
class VersionInfo:
    """One registered model version, as tuneforge shows and resolves it."""

    name: str
    version: str
    aliases: tuple[str, ...]
    tags: dict[str, str]
    source: str
    run_id: str | None
    created: int  # ms since the epoch
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.name}/{self.version}"

    def as_dict(self) -> dict[str, Any]:
        """What ``ModelRef.version`` carries: name, version, aliases and tags (plus where it came from)."""
        return {
            "name": self.name,
            "version": self.version,
            "aliases": list(self.aliases),
            "tags": dict(self.tags),
            "source": self.source,
            "run_id": self.run_id,
            "uri": self.uri,
        }


def open_client(uri: str | None = None) -> tuple[MlflowClient, str]:
    """A client on ``uri`` (default: the embedded store) for both tracking and the registry."""
    resolved = resolve_tracking_uri(uri)
    import_mlflow()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=resolved, registry_uri=resolved), resolved


def parse_uri(ref: str) -> tuple[str, str | None, str | None]:
    """``models:/name/3`` → (name, "3", None); ``models:/name@prod`` → (name, None, "prod"); ``models:/name`` →
    (name, None, None), the latest version. ``models:/name/latest`` is the latest version too."""
    if not ref.startswith(SCHEME):
        raise ModelError(f"model {ref}: a registered model reference starts with {SCHEME!r}")
    body = ref[len(SCHEME) :].strip("/")
    name, version, alias = body, None, None
    if "@" in body:
        name, _, alias = body.rpartition("@")
        if not ALIAS.match(alias):
            raise ModelError(f"model {ref}: alias {alias!r} may hold only letters, digits, '_' and '-'")
    elif "/" in body:
        name, _, version = body.rpartition("/")
        if version == "latest":
            version = None
        elif not version.isdigit():
            raise ModelError(
                f"model {ref}: expected {SCHEME}NAME/VERSION (a number), {SCHEME}NAME@ALIAS or {SCHEME}NAME"
            )
    if not name:
        raise ModelError(
            f"model {ref}: no model name (expected {SCHEME}NAME/VERSION, {SCHEME}NAME@ALIAS or {SCHEME}NAME)"
        )
    return name, version, alias


def _info(mv: Any, aliases: tuple[str, ...] | None = None) -> VersionInfo:
    return VersionInfo(
        name=mv.name,
        version=str(mv.version),
        aliases=tuple(aliases if aliases is not None else getattr(mv, "aliases", ()) or ()),
        tags=dict(mv.tags or {}),
        source=mv.source or "",
        run_id=mv.run_id or None,
        created=int(mv.creation_timestamp or 0),
        description=mv.description or "",
    )


def model_names(client: MlflowClient) -> list[str]:
    """Every registered model's name, prompts excluded."""
    out: list[str] = []
    token = None
    while True:
        page = client.search_registered_models(max_results=1000, page_token=token)
        out += [m.name for m in page if (m.tags or {}).get(PROMPT_TAG) != "true"]
        token = page.token
        if not token:
            return sorted(out)


def list_models(uri: str | None = None) -> list[dict[str, Any]]:
    """Every registered model (prompts excluded): name, number of versions, latest version, aliases, description."""
    client, _ = open_client(uri)
    out = []
    for name in model_names(client):
        model = client.get_registered_model(name)
        found = versions(name, client=client)
        out.append(
            {
                "name": name,
                "versions": len(found),
                "latest": found[-1].version if found else None,
                "aliases": {str(k): str(v) for k, v in sorted((getattr(model, "aliases", None) or {}).items())},
                "updated": int(model.last_updated_timestamp or 0),
                "description": model.description or "",
            }
        )
    return out


def _model(client: MlflowClient, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_registered_model(name)
    except MlflowException:
        found = None
    if found is None or (found.tags or {}).get(PROMPT_TAG) == "true":
        names = model_names(client)
        where = f"{len(names)} registered" if names else "none registered yet"
        raise UnknownModelError(
            f"model {SCHEME}{name}: no registered model named {name!r}{suggest(name, names)} ({where})"
        )
    return found


def versions(name: str, uri: str | None = None, *, client: MlflowClient | None = None) -> list[VersionInfo]:
    """All versions of ``name``, oldest first, with their aliases."""
    if client is None:
        client, _ = open_client(uri)
    model = _model(client, name)
    by_version: dict[str, list[str]] = {}
    for alias, version in (getattr(model, "aliases", None) or {}).items():
        by_version.setdefault(str(version), []).append(alias)
    found = client.search_model_versions(f"name = '{_quote(name)}'", max_results=10000)
    out = [_info(mv, tuple(sorted(by_version.get(str(mv.version), [])))) for mv in found]
    return sorted(out, key=lambda v: int(v.version))


def get_version(
    name: str,
    version: str | None = None,
    alias: str | None = None,
    uri: str | None = None,
    *,
    client: MlflowClient | None = None,
) -> VersionInfo:
    """One version: by number, by alias, or the latest when neither is given; errors list what exists."""
    if client is None:
        client, _ = open_client(uri)
    model = _model(client, name)
    aliases = {str(k): str(v) for k, v in (getattr(model, "aliases", None) or {}).items()}
    if alias is not None:
        if alias not in aliases:
            have = f"its aliases: {', '.join(sorted(aliases))}" if aliases else "it has no aliases yet"
            raise UnknownModelError(
                f"model {SCHEME}{name}@{alias}: {name!r} has no alias {alias!r}{suggest(alias, list(aliases))} ({have}); "
                f"set one with `tuneforge registry alias {name} VERSION {alias}`"
            )
        version = aliases[alias]
    all_versions = versions(name, client=client)
    if not all_versions:
        raise UnknownModelError(f"model {SCHEME}{name}: {name!r} has no versions")
    if version is None:
        return all_versions[-1]
    for v in all_versions:
        if v.version == str(version):
            return v
    numbers = ", ".join(v.version for v in all_versions)
    raise UnknownModelError(f"model {SCHEME}{name}/{version}: {name!r} has no version {version} (versions: {numbers})")


def resolve(ref: str, uri: str | None = None) -> VersionInfo:
    """``models:/…`` → the version it names."""
    name, version, alias = parse_uri(ref)
    return get_version(name, version, alias, uri)


def set_alias(name: str, version: str, alias: str, uri: str | None = None) -> VersionInfo:
    """Point ``alias`` (``staging``, ``production``…) at ``version``; it moves off whichever version held it."""
    if not ALIAS.match(alias) or alias == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise ModelError(
            f"alias {alias!r}: use letters, digits, '_' and '-' (not 'latest' or v<N>, which MLflow reserves)"
        )
    client, _ = open_client(uri)
    target = get_version(name, str(version), client=client)
    client.set_registered_model_alias(name, alias, target.version)
    return get_version(name, target.version, client=client)


def set_tags(name: str, version: str, tags: dict[str, Any], uri: str | None = None) -> VersionInfo:
    """Add ``tags`` to a version after the fact (e.g. an evaluation run later: ``eval.…`` tags)."""
    client, _ = open_client(uri)
    target = get_version(name, str(version), client=client)
    for key, value in tags.items():
        if value is not None:
            client.set_model_version_tag(name, target.version, clean_key(key), str(value))
    return get_version(name, target.version, client=client)


def local_files(info: VersionInfo, uri: str | None = None) -> Path:
    """A local directory with the version's files: the store's own folder for a local store, else a download
    into ``$TUNEFORGE_HOME/cache/registry`` (kept, so the next load is local)."""
    parts = urllib.parse.urlsplit(info.source)
    if parts.scheme in ("", "file"):
        path = Path(urllib.request.url2pathname(parts.path) if parts.scheme else info.source)
        if not path.is_dir():
            raise ModelError(
                f"model {info.uri}: its files at {path} are gone (the artifact store was moved or deleted)"
            )
        return path
    from tuneforge.paths import cache_dir

    dest = cache_dir("registry") / re.sub(r"[^\w.-]", "_", info.name) / info.version
    if dest.is_dir() and any(dest.iterdir()):
        return dest
    import mlflow.artifacts

    dest.mkdir(parents=True, exist_ok=True)
    resolved = resolve_tracking_uri(uri)
    return Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=info.source, dst_path=str(dest), tracking_uri=resolved, registry_uri=resolved
        )
    )


def _quote(text: str) -> str:
    return text.replace("'", "\\'")
