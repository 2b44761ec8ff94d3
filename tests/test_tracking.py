"""MLflow tracking against a real SQLite store: what a run writes is read back through ``MlflowClient``."""

from __future__ import annotations

import inspect
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tuneforge.errors import TuneforgeError
from tuneforge.paths import default_tracking_uri, state_dir
from tuneforge.tracking.mlflow_tracker import NullTracker, Tracker, clean_key, flatten_params, resolve_tracking_uri
from tuneforge.tracking.ui import ui_command, ui_env

from conftest import free_port

RECIPE = {
    "name": "support-bot",
    "model": {"path": "/models/tiny-llama"},
    "data": {"sources": [{"path": "a.jsonl", "weight": 2.0}, {"path": "b.jsonl", "weight": 1.0}], "max_length": 512},
    "train": {"lr": 3e-4, "betas": [0.9, 0.95], "max_steps": 100, "num_threads": None},
    "adapter": {"kind": "lora", "target_modules": ["q_proj", "v_proj"], "extra": {}},
    "system_prompt": "x" * 7000,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (creating its schema takes ~2 s); each test uses its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _start(store: str, experiment: str, **kw) -> Tracker:
    return Tracker.start(
        experiment=experiment,
        run_name="run-1",
        params=kw.pop("params", RECIPE),
        tags=kw.pop("tags", {"tuneforge.recipe_hash": "abc123"}),
        tracking_uri=store,
        **kw,
    )


def test_flatten_params_dotted_keys_and_length_limit() -> None:
    flat = flatten_params(RECIPE, max_value_length=500)
    assert flat["data.sources.1.path"] == "b.jsonl"
    assert flat["data.sources.0.weight"] == "2.0"
    assert flat["train.betas"] == "[0.9, 0.95]"
    assert flat["train.num_threads"] == "null"
    assert flat["adapter.extra"] == "{}"
    cut = flat["system_prompt"]
    kept, dropped = re.fullmatch(r"(x*)…\[\+(\d+) chars\]", cut).groups()
    assert len(cut) <= 500 and len(kept) + int(dropped) == 7000
    assert clean_key("mix/web@2024 (dedup)") == "mix/web_2024 _dedup_"
    assert clean_key("../a//b") == "_.._a_b"
    assert clean_key("loss/./x") == "_loss_._x"
    assert clean_key("k" * 300) == "k" * 250


def test_params_tags_and_experiment_location(store: str) -> None:
    recipe = {**RECIPE, "grid": {f"k{i}": i for i in range(150)}}  # more than one log_batch of params
    with _start(store, "params", params=recipe) as tracker:
        pass
    run = _client(store).get_run(tracker.run_id)
    params = run.data.params
    assert params["model.path"] == "/models/tiny-llama"
    assert params["data.sources.0.path"] == "a.jsonl"
    assert params["adapter.target_modules"] == '["q_proj", "v_proj"]'
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    cut = flatten_params(recipe, max_value_length=MAX_PARAM_VAL_LENGTH)["system_prompt"]  # cut, not refused
    assert params["system_prompt"] == cut and len(cut) <= MAX_PARAM_VAL_LENGTH < len(recipe["system_prompt"])
    assert len(params) == len(flatten_params(recipe)) == 165 and params["grid.k149"] == "149"
    assert run.data.tags["tuneforge.recipe_hash"] == "abc123"
    assert run.info.run_name == "run-1" and run.info.status == "FINISHED"
    db_dir = Path(store.removeprefix("sqlite:///")).parent
    assert run.info.artifact_uri.startswith((db_dir / "mlartifacts").as_uri())


def test_metrics_history_per_step(store: str) -> None:
    with _start(store, "metrics", flush_every=7) as tracker:
        for step in range(1, 26):
            tracker.log_metrics(
                {
                    "loss": 10.0 / step,
                    "lr": 1e-3 * step,
                    "grad_norm": 0.5,
                    "tokens_per_s": 100.0 * step,
                    "mix/web@2024": 0.25,
                },
                step=step,
            )
    client = _client(store)
    loss = sorted(client.get_metric_history(tracker.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in loss] == list(range(1, 26))
    assert [m.value for m in loss] == pytest.approx([10.0 / s for s in range(1, 26)])
    lr = {m.step: m.value for m in client.get_metric_history(tracker.run_id, "lr")}
    assert lr[25] == pytest.approx(0.025)
    assert len(client.get_metric_history(tracker.run_id, "mix/web_2024")) == 25
    assert tracker.dropped == 0


def test_metrics_written_in_background_before_finish(store: str) -> None:
    tracker = _start(store, "background", flush_every=10_000, flush_seconds=0.2)
    try:
        tracker.log_metrics({"loss": 1.5}, step=3)
        client, deadline = _client(store), time.monotonic() + 20
        while not client.get_metric_history(tracker.run_id, "loss") and time.monotonic() < deadline:
            time.sleep(0.1)
        history = client.get_metric_history(tracker.run_id, "loss")
        assert [(m.step, m.value) for m in history] == [(3, 1.5)]
        assert client.get_run(tracker.run_id).info.status == "RUNNING"
    finally:
        tracker.finish()


def test_artifacts_listed(store: str, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: support-bot\n")
    adapter = tmp_path / "adapter"
    (adapter / "sub").mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "sub" / "tokenizer.json").write_text("{}")
    with _start(store, "artifacts") as tracker:
        tracker.log_artifact(recipe)
        tracker.log_artifact(recipe, "copies")
        tracker.log_artifact(adapter)
        tracker.log_artifact(adapter, "final")
        tracker.log_text("hello", "notes/readme.txt")
        with pytest.raises(FileNotFoundError, match="missing.yaml"):
            tracker.log_artifact(tmp_path / "missing.yaml")
    client = _client(store)
    top = {f.path for f in client.list_artifacts(tracker.run_id)}
    assert top == {"recipe.yaml", "copies", "adapter", "final", "notes"}
    assert {f.path for f in client.list_artifacts(tracker.run_id, "adapter")} == {
        "adapter/adapter_config.json",
        "adapter/sub",
    }
    assert [f.path for f in client.list_artifacts(tracker.run_id, "final/sub")] == ["final/sub/tokenizer.json"]
    assert [f.path for f in client.list_artifacts(tracker.run_id, "copies")] == ["copies/recipe.yaml"]


def test_register_model_version_with_tags_and_files(store: str, tmp_path: Path) -> None:
    from mlflow.utils.file_utils import local_file_uri_to_path

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    tags = {"base_model": "/models/tiny-llama", "recipe_hash": "abc123", "data_hash.web": "f00d"}
    with _start(store, "registry") as tracker:
        tracker.log_metrics({"loss": 0.5}, step=12)
        with pytest.raises(TuneforgeError, match="expected a directory"):
            tracker.register_model(tmp_path / "empty", "support.bot", tags)
        first = tracker.register_model(adapter, "support.bot", tags)
        second = tracker.register_model(adapter, "support.bot", {**tags, "recipe_hash": "def456"})
    assert (first, second) == ("1", "2")
    client = _client(store)
    version = client.get_model_version("support.bot", first)
    assert version.tags == tags
    assert version.run_id == tracker.run_id and version.status == "READY"
    source = Path(local_file_uri_to_path(version.source))
    assert (source / "adapter_config.json").read_text() == '{"r": 8}'
    assert (source / "adapter_model.safetensors").stat().st_size == 64
    assert (
        client.get_model_version_download_uri("support.bot", second)
        == client.get_model_version("support.bot", second).source
    )
    run = client.get_run(tracker.run_id)
    outputs = run.outputs.model_outputs
    assert len(outputs) == 2 and {o.step for o in outputs} == {12}
    from mlflow.entities import LoggedModelStatus

    logged = client.get_logged_model(outputs[0].model_id)
    assert logged.status == LoggedModelStatus.READY and logged.source_run_id == tracker.run_id
    assert logged.tags["base_model"] == "/models/tiny-llama"
    assert logged.artifact_location in {version.source, client.get_model_version("support.bot", second).source}


def test_failed_status_when_block_raises(store: str) -> None:
    with pytest.raises(ValueError, match="boom"), _start(store, "failing") as tracker:
        tracker.log_metrics({"loss": 2.0}, step=1)
        raise ValueError("boom")
    client = _client(store)
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    assert [m.value for m in client.get_metric_history(tracker.run_id, "loss")] == [2.0]  # flushed anyway
    with pytest.raises(RuntimeError, match="finished"):
        tracker.log_metrics({"loss": 1.0}, step=2)
    tracker.finish("FINISHED")  # idempotent: the recorded status stays FAILED
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    with pytest.raises(ValueError, match="status"):
        tracker.finish("DONE")


def test_default_store_lives_in_state_dir() -> None:
    with Tracker.start(experiment="defaults", run_name="r", params={"a": 1}, tags={}) as tracker:
        tracker.log_text("x", "x.txt")
    assert tracker.tracking_uri == default_tracking_uri()
    run = _client(tracker.tracking_uri).get_run(tracker.run_id)
    assert run.info.artifact_uri.startswith((state_dir() / "mlartifacts").as_uri())
    assert (state_dir() / "mlflow.db").is_file()


def test_bad_tracking_uris_are_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(TuneforgeError, match="tracking.uri.*sqlite"):
        Tracker.start(experiment="e", run_name="r", params={}, tags={}, tracking_uri=str(tmp_path / "mlruns"))
    uri = f"http://127.0.0.1:{free_port()}"  # a port nobody listens on
    with pytest.raises(TuneforgeError, match="cannot reach") as e:
        Tracker.start(experiment="e", run_name="r", params={}, tags={}, tracking_uri=uri)
    # refused by tuneforge's own one-connection check, before MLflow's client (which retries for minutes) ran
    assert isinstance(e.value.__cause__, ConnectionRefusedError) and f"tracking.uri {uri!r}" in str(e.value)


def test_deleted_experiment_is_a_clear_error(store: str) -> None:
    with _start(store, "to-delete") as tracker:
        pass
    _client(store).delete_experiment(tracker.experiment_id)
    with pytest.raises(TuneforgeError, match="'to-delete' was deleted.*restore"):
        _start(store, "to-delete")


def test_relative_sqlite_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///runs/mlflow.db") == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert resolve_tracking_uri("track.db") == f"sqlite:///{tmp_path / 'track.db'}"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert resolve_tracking_uri(None) == default_tracking_uri()


def test_null_tracker_matches_tracker_interface() -> None:
    for name in ("log_metrics", "flush", "log_artifact", "log_text", "register_model", "finish"):
        real = list(inspect.signature(getattr(Tracker, name)).parameters)
        null = list(inspect.signature(getattr(NullTracker, name)).parameters)
        assert real == null, name
    with NullTracker() as tracker:
        tracker.log_metrics({"loss": 1.0}, step=1)
        assert tracker.register_model(Path("."), "m", {}) is None
    assert tracker.run_id is None and tracker.tracking_uri is None


def test_ui_command_points_at_store_and_artifacts(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'x' / 'mlflow.db'}"
    argv = ui_command(uri, port=5123)
    assert argv[1:4] == ["-m", "mlflow", "server"]
    assert argv[argv.index("--backend-store-uri") + 1] == uri
    assert argv[argv.index("--default-artifact-root") + 1] == (tmp_path / "x" / "mlartifacts").as_uri()
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "5123"
    assert ui_command(None)[ui_command(None).index("--backend-store-uri") + 1] == default_tracking_uri()
    with pytest.raises(TuneforgeError, match="already an MLflow server"):
        ui_command("http://127.0.0.1:5000")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ui_serves_the_store_on_localhost(store: str, tmp_path: Path) -> None:
    import httpx

    with _start(store, "ui-check"):
        pass
    port = free_port()
    log = (tmp_path / "ui.log").open("wb")
    proc = subprocess.Popen(
        ui_command(store, port=port), env=ui_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, status = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = httpx.get(f"{base}/health", timeout=2).status_code
                if status == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert status == 200, (tmp_path / "ui.log").read_text()[-3000:]
        assert httpx.get(f"{base}/", timeout=10).status_code == 200
        found = httpx.get(
            f"{base}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": "ui-check"}, timeout=10
        )
        assert found.status_code == 200 and found.json()["experiment"]["name"] == "ui-check"
    finally:
        proc.terminate()  # SIGTERM to the PID; `mlflow server` forwards it to its uvicorn child
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    deadline = time.monotonic() + 15  # the uvicorn child let go of the port too
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break
        time.sleep(0.2)
    else:
        pytest.fail(f"something still listens on 127.0.0.1:{port} after the UI was stopped")
