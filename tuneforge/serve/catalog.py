"""Served model names → the engine of their base, the adapter (if any), lineage and the chat template.

One engine per distinct base model, so each base is in memory once; every adapter of that base is a name on
the same engine, and requests for different adapters and the base itself share its batches. A name comes
from a model reference — a model or adapter directory, a run directory, ``models:/name@alias``, a jobs-service
``ft:`` name — resolved by :func:`tuneforge.models.refs.resolve_model`, so what is served is exactly what
training saved: its tokenizer and the chat template it trained with.

Names can also be resolved lazily (the jobs service serves any of its fine-tuned models on first request):
a ``finder`` turns an unknown name into a :class:`Spec`, and a spec may belong to an owner (a project), whose
callers alone see it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tuneforge.errors import TuneforgeError

log = logging.getLogger("tuneforge.serve")


class EngineLike(Protocol):
    """What the routes need of an engine (tuneforge's own :class:`~tuneforge.serve.engine.Engine`, or vLLM)."""

    tokenizer: Any

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def add_adapter(self, name: str, path: str | Path, *, pin: bool = False) -> None: ...
    def remove_adapter(self, name: str) -> None: ...
    def adapters(self) -> list[str]: ...
    def generate(self, prompt_ids: list[int], params: Any, adapter: str | None = None) -> AsyncIterator[Any]: ...
    def embed(self, batch: list[list[int]], adapter: str | None = None) -> list[list[float]]: ...


EngineFactory = Callable[[str], EngineLike]


@dataclass(frozen=True)
class Spec:
    """A name to serve and where it comes from; lineage and owner default to what the reference says."""

    ref: str
    name: str | None = None
    parent: str | None = None
    root: str | None = None
    owner: str | None = None  # None: every caller sees it


@dataclass
class Served:
    """One model name clients can ask for."""

    id: str
    engine: EngineLike
    base_path: str
    adapter: str | None  # the engine's name for the adapter; None: the base model itself
    source: str  # the reference it was resolved from
    parent: str | None
    root: str
    tokenizer: Any  # the model's own (saved with its result): same vocabulary as the base, its chat template
    chat_template: str | None
    created: int = field(default_factory=lambda: int(time.time()))
    owner: str | None = None
    version: dict[str, Any] | None = None  # registry info, for a registered version
    text_stop_ids: tuple[int, ...] = ()  # completions stop on eos
    chat_stop_ids: tuple[int, ...] = ()  # chat also on the template's end-of-turn token

    def __post_init__(self) -> None:
        if not self.chat_stop_ids:
            self.text_stop_ids, self.chat_stop_ids = stop_ids(self.tokenizer, self.base_path, self.template)

    def card(self) -> dict[str, Any]:
        """The ``model`` object of ``GET /v1/models``, with lineage."""
        return {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": self.owner or "tuneforge",
            "parent": self.parent,
            "root": self.root,
        }

    @property
    def template(self) -> str | None:
        return self.chat_template or getattr(self.tokenizer, "chat_template", None)


def stop_ids(tokenizer: Any, model_dir: str, template: str | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(text, chat) stop tokens: eos — every id the model's generation config names — plus, for chat, the
    template's end-of-turn token (Llama 3's ``<|eot_id|>`` is not its eos)."""
    from tuneforge.data.templates import end_of_turn

    ids = {tokenizer.eos_token_id} - {None}
    config = Path(model_dir) / "generation_config.json"
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    chat = set(ids)
    if template:
        eot = end_of_turn(tokenizer, template)
        eot_id = tokenizer.convert_tokens_to_ids(eot) if eot else None
        if isinstance(eot_id, int) and eot_id != tokenizer.unk_token_id:
            chat.add(eot_id)
    return tuple(sorted(ids)), tuple(sorted(chat))


def friendly_id(ref: Any) -> str:
    """The name a reference is served under by default: ``NAME@ALIAS`` for ``models:/NAME@ALIAS`` (what
    ``tuneforge deploy --alias`` serves too), else its label (run name, ``NAME/VERSION``, ``ft:`` name)."""
    text = str(ref.ref)
    if text.startswith("models:/") and "@" in text:
        return text.removeprefix("models:/").strip("/")
    return str(ref.label or Path(text).name)


class NameTaken(TuneforgeError):
    """A name that is served already, added without ``replace``."""


class Catalog:
    """Names → :class:`Served`; engines created on demand, one per base, started at once and stopped by :meth:`close`."""

    def __init__(
        self,
        engine_factory: EngineFactory,
        *,
        finder: Callable[[str, str | None], Spec | None] | None = None,
        serve_bases: bool = True,
        tracking_uri: str | None = None,
    ) -> None:
        self.engine_factory = engine_factory
        self.tracking_uri = tracking_uri  # the registry models:/ references resolve in
        self.finder = finder
        self.serve_bases = serve_bases  # an adapter's base is served under its own name too
        self.engines: dict[str, EngineLike] = {}
        self.models: dict[str, Served] = {}
        self.aliases: dict[str, str] = {}  # the reference as the user spelled it → id
        self.lock = threading.RLock()
        self.loading: dict[str, threading.Lock] = {}
        self.claims: dict[str, int] = {}  # adds in progress per base path
        self.counter = 0

    # ----------------------------------------------------------------------------------------- lookup

    def get(self, name: str, owner: str | None = None) -> Served:
        """The model `name` as `owner` may see it, found and loaded through the finder on first use; ``KeyError``
        when there is no such model (for this owner)."""
        served = self.find(name, owner)
        if served is not None:
            return served
        if self.finder is None:
            raise KeyError(name)
        with self.lock:
            gate = self.loading.setdefault(name, threading.Lock())
        try:
            with gate:  # one load per name, however many requests ask for it at once
                served = self.find(name, owner)
                if served is not None:
                    return served
                spec = self.finder(name, owner)
                if spec is None:
                    raise KeyError(name)
                return self.add(Spec(spec.ref, spec.name or name, spec.parent, spec.root, spec.owner))
        finally:
            with self.lock:
                self.loading.pop(name, None)

    def find(self, name: str, owner: str | None = None) -> Served | None:
        """The model `name` if it is served and `owner` may see it (the finder is not asked)."""
        with self.lock:
            return self._visible(name, owner)

    def _visible(self, name: str, owner: str | None) -> Served | None:
        served = self.models.get(self.aliases.get(name, name))
        if served is None or (served.owner is not None and served.owner != owner):
            return None
        return served

    def list(self, owner: str | None = None) -> list[Served]:
        with self.lock:
            return [m for m in self.models.values() if m.owner is None or m.owner == owner]

    def names(self, owner: str | None = None) -> list[str]:
        return [m.id for m in self.list(owner)]

    # ------------------------------------------------------------------------------------- add, remove

    def add(self, spec: Spec | str, *, replace: bool = True, require_adapter: bool = False) -> Served:
        """Serve a reference, loading its base on first use.

        A name already served is replaced — the new adapter is registered before the old one goes, so a
        deployment never leaves the name unanswered — or, with ``replace=False``, refused (:class:`NameTaken`).
        ``require_adapter`` refuses a full model before anything is loaded (``/v1/load_lora_adapter``).
        """
        from tuneforge.models.loading import load_tokenizer
        from tuneforge.models.refs import resolve_model

        spec = Spec(spec) if isinstance(spec, str) else spec
        ref = resolve_model(spec.ref, tracking_uri=self.tracking_uri)
        name = spec.name or friendly_id(ref)
        check_name(name)
        if require_adapter and ref.adapter is None:
            raise TuneforgeError(
                f"{spec.ref} is a full model, not a LoRA adapter (deploy it with POST /v1/deployments)"
            )
        if not replace and self.find(name) is not None:
            raise NameTaken(f"the name '{name}' is served already")
        base = Path(ref.base).expanduser()
        base_path = str(base.resolve()) if base.exists() else ref.base
        tokenizer = load_tokenizer(ref.tokenizer)
        engine = self._engine(base_path)  # outside the lock: loading a base must not stall other requests
        try:
            return self._install(spec, ref, name, base_path, engine, tokenizer, replace)
        finally:
            with self.lock:
                self.claims[base_path] -= 1
            self._release_engine(base_path)  # stops it only if nothing came to use it (a failed add)

    def _install(
        self, spec: Spec, ref: Any, name: str, base_path: str, engine: EngineLike, tokenizer: Any, replace: bool
    ) -> Served:
        base_entry = self._base_entry(base_path, engine) if ref.adapter else None
        adapter = None
        if ref.adapter:
            with self.lock:
                self.counter += 1
                adapter = f"{name}#{self.counter}"  # unique: a replacement is registered before the old one goes
            engine.add_adapter(adapter, ref.adapter)  # checks it against the base: a mismatch is refused here
        with self.lock:
            if base_entry is not None and base_entry.id not in self.models:
                self.models[base_entry.id] = base_entry
            base_id = base_entry.id if base_entry is not None else None
            old = self.models.get(name)
            if not replace and old is not None:
                if adapter:
                    engine.remove_adapter(adapter)
                raise NameTaken(f"the name '{name}' is served already")
            served = Served(
                id=name,
                engine=engine,
                base_path=base_path,
                adapter=adapter,
                source=spec.ref,
                parent=spec.parent if spec.parent is not None else base_id,
                root=spec.root or (base_entry.root if base_entry is not None else name),
                tokenizer=tokenizer,
                chat_template=ref.chat_template,
                owner=spec.owner,
                version=ref.version,
            )
            self.models[name] = served
            for alias in [a for a, target in self.aliases.items() if target == name]:
                del self.aliases[alias]  # they named what the name served before
            if spec.ref != name:
                self.aliases[spec.ref] = name
        if old is not None and old.adapter:
            old.engine.remove_adapter(old.adapter)
        if old is not None and old.base_path != base_path:
            self._release_engine(old.base_path)
        log.info("serving %s (%s)", name, f"adapter on {base_path}" if adapter else base_path)
        return served

    def _engine(self, base_path: str) -> EngineLike:
        """The engine of `base_path`, created and started by the first caller (the others wait for it), claimed
        by the caller — an engine is stopped only once no name and no claim uses it."""
        with self.lock:
            self.claims[base_path] = self.claims.get(base_path, 0) + 1
            if base_path in self.engines:
                return self.engines[base_path]
            gate = self.loading.setdefault(f"engine:{base_path}", threading.Lock())
        try:
            with gate:
                with self.lock:
                    if base_path in self.engines:
                        return self.engines[base_path]
                engine = self.engine_factory(base_path)
                engine.start()
                with self.lock:
                    self.engines[base_path] = engine
                return engine
        except BaseException:
            with self.lock:
                self.claims[base_path] -= 1
            raise

    def _base_entry(self, base_path: str, engine: EngineLike) -> Served | None:
        """The entry serving a base model: the one there is, or (``serve_bases``) a new one named for its folder."""
        from tuneforge.models.loading import load_tokenizer

        with self.lock:
            for m in self.models.values():
                if m.base_path == base_path and m.adapter is None:
                    return m
        if not self.serve_bases:
            return None
        name = Path(base_path).name or base_path
        with self.lock:
            if name in self.models:
                name = f"{name}-base"
        return Served(
            id=name,
            engine=engine,
            base_path=base_path,
            adapter=None,
            source=base_path,
            parent=None,
            root=name,
            tokenizer=load_tokenizer(base_path),
            chat_template=None,
        )

    def remove(self, name: str, owner: str | None = None) -> Served:
        """Stop serving `name`: an adapter leaves its engine; an engine no name uses any more is stopped."""
        with self.lock:
            served = self._visible(name, owner)
            if served is None:
                raise KeyError(name)
            del self.models[served.id]
            for alias in [a for a, target in self.aliases.items() if target == served.id]:
                del self.aliases[alias]
        if served.adapter:
            served.engine.remove_adapter(served.adapter)
        self._release_engine(served.base_path)
        return served

    def _release_engine(self, base_path: str) -> None:
        """Stop the engine of `base_path` if no served name or pending add uses it (its memory goes back)."""
        with self.lock:
            if self.claims.get(base_path) or any(m.base_path == base_path for m in self.models.values()):
                return
            engine = self.engines.pop(base_path, None)
        if engine is not None:
            engine.stop()

    def close(self) -> None:
        with self.lock:
            engines, self.engines = list(self.engines.values()), {}
            self.models.clear()
        for engine in engines:
            engine.stop()


def check_name(name: str) -> None:
    if not name or len(name) > 256 or any(c.isspace() for c in name):
        raise TuneforgeError(f"model name {name!r}: use 1–256 characters without spaces")


def add_all(catalog: Catalog, models: Sequence[str]) -> list[Served]:
    """``tuneforge serve`` arguments: ``REF`` or ``NAME=REF``; two references with one name are an error."""
    served = []
    for arg in models:
        name, sep, ref = arg.partition("=")
        named = sep and name and ref and "/" not in name and ":" not in name
        spec = Spec(ref, name) if named else Spec(arg)
        try:
            served.append(catalog.add(spec, replace=False))
        except NameTaken as e:
            raise TuneforgeError(f"{spec.ref}: {e}; give it another name: NAME={spec.ref}") from None
    return served
