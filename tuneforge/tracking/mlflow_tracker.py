"""One MLflow run per training run: the recipe as params, per-step metrics, artifacts, a registered model.

The training loop calls ``log_metrics`` every step, so that call only appends to a queue; a background
thread writes the queue with ``log_batch`` every ``flush_every`` calls or ``flush_seconds`` seconds. All
calls go through an ``MlflowClient`` bound to one tracking URI, so nothing here changes MLflow's global
tracking URI or active run. MLflow is imported on ``Tracker.start`` only: importing it takes seconds.

Registration uses MLflow 3's logged models through the client: the saved HF/PEFT directory is uploaded as
the artifacts of a logged model owned by the run, and the model version points at that folder. The UI keeps
its run → model → version links, and we avoid ``mlflow.transformers.log_model``, which works only through
the global active run, wants the model object in memory and a pipeline task, and infers pip requirements
(torchvision among them) that would have to be overridden. tuneforge loads the folder with HF/PEFT itself.
"""

from __future__ import annotations

import collections
import getpass
import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from tuneforge.errors import TuneforgeError
from tuneforge.paths import default_tracking_uri

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

STATUSES = ("FINISHED", "FAILED", "KILLED")
# MLflow's own limits (mlflow.utils.validation); read from MLflow at start, these are the 3.x values.
_LIMITS = {"param_value": 6000, "key": 250, "tag_value": 8000, "params_per_batch": 100, "metrics_per_batch": 1000}
# Loggers that chat at INFO on every new database (schema creation and migrations).
_QUIET_LOGGERS = ("mlflow.store.db.utils", "alembic")
_BAD_KEY_CHARS = re.compile(r"[^\w.\- /]")  # MLflow allows these (plus ':' on POSIX only)


# ---------------------------------------------------------------------------------------------- URIs


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The URI to use: ``uri`` or the embedded SQLite store; a bare ``*.db`` path or a relative SQLite path
    becomes an absolute ``sqlite:///`` URI so that runs and ``tuneforge ui`` agree whatever the cwd."""
    uri = uri or default_tracking_uri()
    if "://" not in uri and uri.endswith((".db", ".sqlite", ".sqlite3")):
        return f"sqlite:///{Path(uri).expanduser().resolve()}"
    if uri.startswith("sqlite:///"):
        path, sep, query = uri[len("sqlite:///") :].partition("?")
        if path and not path.startswith("/"):
            return f"sqlite:///{Path(path).resolve()}{sep}{query}"
    return uri


def artifact_root_for(uri: str) -> Path | None:
    """Where a SQLite store's artifacts go: ``mlartifacts`` beside the database file, which for the default
    store is ``paths.default_artifact_root()`` under the state directory. ``None`` for servers and other
    databases, whose server or MLflow default decides."""
    if not uri.startswith("sqlite:"):
        return None
    path = uri[len("sqlite:///") :].partition("?")[0] if uri.startswith("sqlite:///") else ""
    if not path or path == ":memory:":
        from tuneforge.paths import default_artifact_root

        return default_artifact_root()
    root = Path(path).parent / "mlartifacts"
    root.mkdir(parents=True, exist_ok=True)
    return root


# --------------------------------------------------------------------------------------- params, keys


def clean_key(key: str) -> str:
    """A key MLflow accepts for params, metrics and tags: odd characters become ``_``, at most 250 chars."""
    out = _BAD_KEY_CHARS.sub("_", str(key)).strip(" /") or "_"
    out = re.sub(r"/{2,}", "/", out)
    norm = posixpath.normpath(out)
    if norm != out or norm.startswith(".."):  # MLflow refuses names that resolve to another path
        out = "_" + out.replace("/", "_")
    return out[: _LIMITS["key"]]


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    keep = limit - 24  # room for the note below
    return f"{value[:keep]}…[+{len(value) - keep} chars]"


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    return json.dumps(value, default=str)


def flatten_params(tree: Mapping[str, Any], max_value_length: int | None = None) -> dict[str, str]:
    """``{"train": {"lr": 1e-4}}`` → ``{"train.lr": "0.0001"}``. Lists of mappings are indexed
    (``data.sources.0.path``); lists of scalars stay one JSON value. Values longer than MLflow's limit are
    cut with a note saying how much was dropped (the whole recipe is logged as an artifact anyway)."""
    limit = max_value_length or _LIMITS["param_value"]
    out: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in value):
            for i, v in enumerate(value):
                walk(v, f"{key}.{i}")
        else:
            name = clean_key(key)
            if name in out:
                log.warning("param %r collides with another key after cleaning; keeping the first", key)
                return
            out[name] = _truncate(_param_value(value), limit)

    walk(tree, "")
    return out


def _clean_tags(tags: Mapping[str, Any], limit: int) -> dict[str, str]:
    return {clean_key(k): _truncate(_param_value(v), limit) for k, v in tags.items() if v is not None}


# ---------------------------------------------------------------------------------------------- MLflow


def import_mlflow() -> None:
    """Import MLflow (slow: 2.4-3 s on a busy 2-core machine) with its usage telemetry off unless the user asked for it (tuneforge
    is offline-first) and without the INFO lines it prints whenever it creates or migrates a database."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.utils import validation

    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    _LIMITS.update(
        param_value=validation.MAX_PARAM_VAL_LENGTH,
        key=validation.MAX_ENTITY_KEY_LENGTH,
        tag_value=validation.MAX_TAG_VAL_LENGTH,
        params_per_batch=validation.MAX_PARAMS_TAGS_PER_BATCH,
        metrics_per_batch=validation.MAX_METRICS_PER_BATCH,
    )


def _check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, when a tracking server is down: MLflow retries a refused connection
    with exponential backoff for about four minutes before giving up."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise TuneforgeError(
            f"tracking.uri {uri!r}: cannot reach the MLflow server ({e}); start it, fix the "
            "URI, or remove tracking.uri to use the embedded SQLite store"
        ) from e


def _experiment_id(client: MlflowClient, name: str, artifact_root: Path | None) -> str:
    """The experiment's id, creating it with its artifacts under ``artifact_root`` (SQLite stores)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        location = (artifact_root / clean_key(name).replace("/", "_")).as_uri() if artifact_root else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as e:  # another process created it between our get and create
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = client.get_experiment_by_name(name)
    if found.lifecycle_stage == "deleted":
        raise TuneforgeError(
            f"tracking.experiment {name!r} was deleted in MLflow; restore it "
            f"(`mlflow experiments restore --experiment-id {found.experiment_id}`) or choose another name"
        )
    return found.experiment_id


class Tracker:
    """An MLflow run. Use ``Tracker.start(...)``; as a context manager it ends the run FINISHED, or FAILED
    (KILLED on Ctrl-C) when the block raises."""

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        experiment_id: str,
        tracking_uri: str,
        *,
        flush_every: int = 50,
        flush_seconds: float = 5.0,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.tracking_uri = tracking_uri
        self.flush_every = max(1, int(flush_every))
        self.flush_seconds = flush_seconds
        self.dropped = 0  # metric values MLflow refused or could not store (each failure is logged)
        self.finished = False
        self._pending: collections.deque[tuple[str, float, int, int]] = collections.deque()
        self._keys: dict[str, str] = {}
        self._calls = 0
        self._last_step = 0
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._flush_loop, name=f"mlflow-{run_id[:8]}", daemon=True)
        self._thread.start()

    @classmethod
    def start(
        cls,
        *,
        experiment: str,
        run_name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, Any],
        tracking_uri: str | None = None,
        flush_every: int = 50,
        flush_seconds: float = 5.0,
    ) -> Tracker:
        """Open (or create) ``experiment`` and start a run with ``params`` flattened to dotted keys."""
        uri = resolve_tracking_uri(tracking_uri)
        _check_reachable(uri)
        import_mlflow()
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        run_tags = {"mlflow.source.name": "tuneforge", "mlflow.source.type": "LOCAL", "mlflow.user": _user()}
        run_tags.update(_clean_tags(tags, _LIMITS["tag_value"]))
        try:
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            experiment_id = _experiment_id(client, experiment, artifact_root_for(uri))
            run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
        except MlflowException as e:
            raise TuneforgeError(f"tracking.uri {uri!r}: MLflow cannot use this store: {e.message}") from e
        except ImportError as e:  # e.g. postgresql:// without a driver installed
            raise TuneforgeError(f"tracking.uri {uri!r} needs a package that is not installed: {e}") from e
        tracker = cls(client, run.info.run_id, experiment_id, uri, flush_every=flush_every, flush_seconds=flush_seconds)
        try:
            flat = [Param(k, v) for k, v in flatten_params(params).items()]
            step = _LIMITS["params_per_batch"]
            for i in range(0, len(flat), step):
                client.log_batch(tracker.run_id, params=flat[i : i + step], synchronous=True)
        except BaseException:
            tracker.finish("FAILED")
            raise
        return tracker

    # -------------------------------------------------------------------------------------- metrics

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue one step's metrics; cheap (a few µs), the writing happens on the background thread.
        Values must be numbers (call ``.item()`` on tensors first, where it suits the loop)."""
        if self.finished:
            raise RuntimeError(f"MLflow run {self.run_id} is finished; cannot log metrics")
        ts = int(time.time() * 1000)
        keys = self._keys
        push = self._pending.append
        for k, v in metrics.items():
            key = keys.get(k)
            if key is None:
                key = keys[k] = clean_key(k)
            push((key, float(v), ts, step))
        self._last_step = step
        self._calls += 1
        if self._calls % self.flush_every == 0:
            self._wake.set()

    def flush(self) -> None:
        """Write every queued metric now (blocks until done)."""
        from mlflow.entities import Metric

        with self._write_lock:
            size = _LIMITS["metrics_per_batch"]
            while self._pending:
                batch = []
                while self._pending and len(batch) < size:
                    batch.append(self._pending.popleft())
                try:
                    self.client.log_batch(self.run_id, metrics=[Metric(*m) for m in batch], synchronous=True)
                except Exception as e:  # a tracking hiccup must not kill a training run
                    self.dropped += len(batch)
                    log.warning("MLflow refused %d metric values for run %s: %s", len(batch), self.run_id, e)

    def _flush_loop(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            self.flush()

    # ------------------------------------------------------------------------------------ artifacts

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file into folder ``artifact_path`` (default: the root), or a directory's contents into
        folder ``artifact_path`` (default: the directory's own name)."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path or path.name)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"cannot log artifact {path}: no such file or directory")

    def log_text(self, text: str, name: str) -> None:
        """Store ``text`` as artifact file ``name`` (e.g. ``recipe.yaml``)."""
        self.client.log_text(self.run_id, text, name)

    def register_prompt(self, name: str, text: str | list[dict[str, str]], message: str | None = None) -> str:
        """``text`` as the latest version of prompt ``name`` (a new version only when it changed), linked to this
        run; returns its ``prompts:/NAME/VERSION`` URI."""
        from tuneforge.tracking.prompts import LINKED_PROMPTS_TAG, linked_prompts, register_text

        ref = register_text(self.client, name, text, message=message)
        # MLflow's link_prompt_version_to_run reads the *global* tracking store; the same tag, on our client:
        current = self.client.get_run(self.run_id).data.tags.get(LINKED_PROMPTS_TAG)
        self.client.set_tag(self.run_id, LINKED_PROMPTS_TAG, linked_prompts(current, [ref.uri]))
        return ref.uri

    def register_model(
        self, local_dir: str | Path, name: str, tags: Mapping[str, Any], prompts: Sequence[str] = ()
    ) -> str:
        """Upload ``local_dir`` (a saved HF model or PEFT adapter) as a logged model of this run and register
        it as a new version of ``name``; ``tags`` go on both, and the ``prompts:/…`` versions it was trained with
        are linked to it. Returns the version number."""
        from mlflow.entities import LoggedModelOutput
        from mlflow.exceptions import MlflowException
        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

        local_dir = Path(local_dir)
        if not local_dir.is_dir() or not any(local_dir.iterdir()):
            raise TuneforgeError(f"cannot register {local_dir}: expected a directory with saved model files")
        self.flush()
        clean = _clean_tags(tags, _LIMITS["tag_value"])
        try:
            model = self.client.create_logged_model(
                self.experiment_id,
                name=re.sub(r"[/:.%\"']", "-", name),
                source_run_id=self.run_id,
                tags=clean,
                model_type="peft-adapter" if (local_dir / "adapter_config.json").exists() else "hf-model",
            )
        except MlflowException as e:
            raise TuneforgeError(f"tracking.register_as {name!r}: {e.message}") from e
        try:
            self.client.log_model_artifacts(model.model_id, str(local_dir))
        except BaseException:
            self.client.finalize_logged_model(model.model_id, "FAILED")
            raise
        self.client.finalize_logged_model(model.model_id, "READY")
        if prompts:  # as link_prompt_version_to_model would, without its global tracking store
            from tuneforge.tracking.prompts import LINKED_PROMPTS_TAG, linked_prompts

            current = self.client.get_logged_model(model.model_id).tags.get(LINKED_PROMPTS_TAG)
            self.client.set_logged_model_tags(model.model_id, {LINKED_PROMPTS_TAG: linked_prompts(current, prompts)})
        self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step=self._last_step)])
        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise TuneforgeError(f"tracking.register_as {name!r}: {e.message}") from e
        # The source is the logged model's folder, not ``models:/<id>``: the SQLite registry resolves that
        # form through MLflow's *global* tracking URI (see SqlAlchemyStore.create_model_version).
        version = self.client.create_model_version(
            name,
            source=model.artifact_location,
            run_id=self.run_id,
            tags=clean,
            model_id=model.model_id,
            await_creation_for=120,
        )
        linked = json.loads(self.client.get_logged_model(model.model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
        entry = {"name": version.name, "version": version.version}
        if entry not in linked:  # what mlflow.register_model records so the UI links model ↔ version
            self.client.set_logged_model_tags(model.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*linked, entry])})
        return str(version.version)

    # ---------------------------------------------------------------------------------------- end

    def finish(self, status: str = "FINISHED") -> None:
        """Write queued metrics and end the run with ``status`` (FINISHED, FAILED or KILLED). Idempotent."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        if self.finished:
            return
        self.finished = True
        self._closing.set()
        self._wake.set()
        self._thread.join()
        self.flush()
        if self.dropped:
            log.warning("%d metric values could not be written to MLflow run %s", self.dropped, self.run_id)
        self.client.set_terminated(self.run_id, status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.finish("FINISHED")
            return
        try:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        except Exception as e:  # never hide the training error behind a tracking one
            log.warning("could not end MLflow run %s: %s", self.run_id, e)


class NullTracker:
    """``tracking.enabled: false``: the same calls, doing nothing."""

    run_id: str | None = None
    tracking_uri: str | None = None

    @classmethod
    def start(cls, **_: Any) -> NullTracker:
        return cls()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, name: str) -> None:
        pass

    def register_prompt(self, name: str, text: str | list[dict[str, str]], message: str | None = None) -> str | None:
        return None

    def register_model(
        self, local_dir: str | Path, name: str, tags: Mapping[str, Any], prompts: Sequence[str] = ()
    ) -> str | None:
        return None

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"
