"""The jobs service end to end: a real ``tuneforge server`` (uvicorn) process on a free port, the official
``openai`` client, real job processes — on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tuneforge.models.refs import source_of

from conftest import free_port, preference_pairs, rel_diff, reverse_task, write_jsonl

pytestmark = pytest.mark.slow

TERMINAL = ("succeeded", "failed", "cancelled")


# ------------------------------------------------------------------------------------------- PostgreSQL


def _postgres_admin_url() -> str | None:
    """The test PostgreSQL at 127.0.0.1:5432 (trust auth, database ``test``) when it answers."""
    import psycopg

    try:
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", connect_timeout=3):
            return "postgresql://postgres@127.0.0.1:5432"
    except psycopg.Error:
        pass
    try:
        with psycopg.connect("postgresql://127.0.0.1:5432/test", connect_timeout=3):
            return "postgresql://127.0.0.1:5432"
    except psycopg.Error:
        return None


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server URL (no database): the one on 5432, or a throwaway one from Debian's binaries."""
    url = _postgres_admin_url()
    if url is not None:
        yield url
        return
    import glob
    import shutil

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    initdb = shutil.which("initdb") or (f"{bins[-1]}/initdb" if bins else None)
    if initdb is None:
        pytest.skip("no PostgreSQL server at 127.0.0.1:5432 and no initdb to start one")
    bindir = Path(initdb).parent
    data = tmp_path_factory.mktemp("pgdata")
    port = free_port()
    subprocess.run(
        [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"], check=True, capture_output=True
    )
    subprocess.run(
        [str(bindir / "pg_ctl"), "-D", str(data), "-o", f"-p {port} -k {data} -h 127.0.0.1", "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """One database per test: a SQLite file, or a fresh PostgreSQL database dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'service.db'}"
        return
    import psycopg

    server = request.getfixturevalue("postgres_server")
    name = f"tuneforge_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{server}/test" if "5432" in server else f"{server}/postgres", autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{server}/{name}"
    finally:
        with psycopg.connect(f"{server}/test" if "5432" in server else f"{server}/postgres", autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --------------------------------------------------------------------------------------------- server


class Server:
    """``tuneforge server`` as its own process (so it can be SIGKILLed); started and stopped by PID."""

    def __init__(self, home: Path, database_url: str, slots: int = 2) -> None:
        self.home, self.database_url, self.slots = home, database_url, slots
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        env = {**os.environ, "TUNEFORGE_HOME": str(self.home)}
        log = (self.home / f"server-{self.port}.log").open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tuneforge",
                "server",
                "--port",
                str(self.port),
                "--database-url",
                self.database_url,
                "--slots",
                str(self.slots),
                "--no-tracking",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
            assert self.proc.poll() is None, (self.home / f"server-{self.port}.log").read_text()
        raise RuntimeError("server did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None

    def key(self, project: str) -> str:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "tuneforge",
                "keys",
                "create",
                "--project",
                project,
                "--database-url",
                self.database_url,
            ],
            env={**os.environ, "TUNEFORGE_HOME": str(self.home)},
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=30)


def stop_job_processes(home: Path) -> None:
    """End the job process groups a test left running, by the PIDs their executor recorded."""
    for pid_file in (home / "service" / "jobs").glob("*/attempt-*.pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, PermissionError, ValueError):
            pass


@pytest.fixture
def service(_isolated_home: Path, database_url: str, tiny_model: Path) -> Iterator[Server]:
    subprocess.run(
        [sys.executable, "-m", "tuneforge", "models", "add", "tiny", str(tiny_model)],
        env={**os.environ, "TUNEFORGE_HOME": str(_isolated_home)},
        check=True,
        capture_output=True,
    )
    server = Server(_isolated_home, database_url)
    try:
        yield server.start()
    finally:
        server.stop()
        stop_job_processes(_isolated_home)


def upload(client: openai.OpenAI, path: Path) -> str:
    with path.open("rb") as f:
        return client.files.create(file=f, purpose="fine-tune").id


def wait_for(client: openai.OpenAI, job_id: str, statuses: tuple[str, ...] = TERMINAL, timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout}s")


def all_events(client: openai.OpenAI, job_id: str) -> list[Any]:
    """Every event, oldest first (the API pages newest first)."""
    return list(reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=50))))


def metric_steps(events: list[Any]) -> list[int]:
    return [e.data["step"] for e in events if e.type == "metrics"]


SFT = {
    "type": "supervised",
    "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 3.0}},
}


# ---------------------------------------------------------------------------------------------- tests


def test_supervised_job_end_to_end_with_the_openai_client(service: Server, tmp_path: Path) -> None:
    client = service.client(service.key("acme"))
    train = write_jsonl(tmp_path / "train.jsonl", reverse_task(48))
    file_id = upload(client, train)
    assert client.files.retrieve(file_id).filename == "train.jsonl"
    assert client.files.content(file_id).read() == train.read_bytes()
    assert [f.id for f in client.files.list().data] == [file_id]

    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=file_id, method=SFT, suffix="rev", seed=7, metadata={"team": "search"}
    )
    assert job.status == "validating_files" and job.seed == 7
    done = wait_for(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:tiny:acme:rev:{job.id.removeprefix('ftjob-')}"
    assert done.hyperparameters.batch_size == 8 and done.hyperparameters.n_epochs == 1

    events = all_events(client, job.id)
    steps = metric_steps(events)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 4
    assert len({e.id for e in events}) == len(events)
    assert events[-1].message == "The job has successfully completed"

    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert ckpts and ckpts[0].step_number == steps[-1]
    last_metrics = next(e for e in reversed(events) if e.type == "metrics")
    assert ckpts[0].metrics.train_loss == pytest.approx(last_metrics.data["train_loss"])
    models = {m.id: m for m in client.models.list().data}
    assert models[done.fine_tuned_model].parent == "tiny"  # type: ignore[attr-defined]
    assert all(models[c.fine_tuned_model_checkpoint].root == "tiny" for c in ckpts)  # type: ignore[attr-defined]
    assert Path(done.tuneforge["output_dir"]).is_dir()  # type: ignore[attr-defined]

    csv = client.files.content(done.result_files[0]).text.splitlines()
    assert client.files.retrieve(done.result_files[0]).purpose == "fine-tune-results"
    assert csv[0].startswith("step,train_loss") and len(csv) == len(steps) + 1

    listed = client.fine_tuning.jobs.list(metadata={"team": "search"}).data
    assert [j.id for j in listed] == [job.id]
    assert client.fine_tuning.jobs.list(metadata={"team": "other"}).data == []

    # A job may continue the project's fine-tuned model, as OpenAI's do: it starts from those weights (merged once,
    # with the reference as its provenance) and its name keeps the root base. Another project cannot name it.
    again = client.fine_tuning.jobs.create(
        model=done.fine_tuned_model, training_file=file_id, method=SFT, suffix="more"
    )
    more = wait_for(client, again.id)
    assert more.status == "succeeded", more.error
    assert more.fine_tuned_model == f"ft:tiny:acme:more:{again.id.removeprefix('ftjob-')}"
    card = {m.id: m for m in client.models.list().data}[more.fine_tuned_model]
    assert (card.parent, card.root) == (done.fine_tuned_model, "tiny")  # type: ignore[attr-defined]
    start = next(Path(more.tuneforge["output_dir"]).parents[0].glob("recipe.yaml"), None)  # type: ignore[attr-defined]
    started_from = yaml.safe_load(start.read_text())["model"]["path"] if start else None
    assert started_from and source_of(started_from)["ref"] == done.fine_tuned_model
    other = service.client(service.key("other"))
    with pytest.raises(openai.BadRequestError) as err:
        other.fine_tuning.jobs.create(model=done.fine_tuned_model, training_file=upload(other, train), method=SFT)
    assert err.value.body["param"] == "model" and "no fine-tuned model" in err.value.message  # type: ignore[index]


def test_a_bad_file_fails_its_job_naming_the_line(service: Server, tmp_path: Path) -> None:
    client = service.client(service.key("acme"))
    records: list[Any] = reverse_task(10)
    records[3] = {"messages": [{"role": "robot", "content": "hi"}]}
    bad = upload(client, write_jsonl(tmp_path / "bad.jsonl", records))
    job = wait_for(client, client.fine_tuning.jobs.create(model="tiny", training_file=bad, method=SFT).id)
    assert job.status == "failed"
    assert job.error.param == "training_file"
    assert f"{bad}:4: messages[0].role" in job.error.message


def test_dpo_and_reinforcement_jobs_succeed(service: Server, tmp_path: Path) -> None:
    client = service.client(service.key("acme"))
    pairs = upload(client, write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(40, seed=0)))
    dpo = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=pairs,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 8}}},
    )
    prompts = [
        {"messages": [{"role": "user", "content": f"say {w}"}], "answer": w}
        for w in ["apple", "banana", "cherry", "delta"] * 4
    ]
    rl_file = upload(client, write_jsonl(tmp_path / "prompts.jsonl", prompts))
    grader = {
        "type": "string_check",
        "name": "exact",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "operation": "eq",
    }
    rl = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=rl_file,
        method={
            "type": "reinforcement",
            "reinforcement": {
                "grader": grader,
                "hyperparameters": {"n_epochs": 1, "batch_size": 4, "compute_multiplier": 0.25},
            },
        },
        extra_body={"tuneforge": {"overrides": {"generation.max_new_tokens": 4, "grpo.eval_prompts": 2}}},
    )
    for job_id, beta_field in ((dpo.id, "beta"), (rl.id, None)):
        done = wait_for(client, job_id)
        assert done.status == "succeeded", done.error
        assert metric_steps(all_events(client, job_id))
        if beta_field:
            assert done.method.dpo.hyperparameters.beta == 0.2
    assert client.fine_tuning.jobs.retrieve(rl.id).tuneforge["method"] == "grpo"  # type: ignore[attr-defined]


def test_cancel_a_running_job_and_pause_resume_another(service: Server, tmp_path: Path) -> None:
    client = service.client(service.key("acme"))
    train = upload(client, write_jsonl(tmp_path / "train.jsonl", reverse_task(48)))
    long = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 40, "batch_size": 8}}}
    victim = client.fine_tuning.jobs.create(model="tiny", training_file=train, method=long)
    paused = client.fine_tuning.jobs.create(model="tiny", training_file=train, method=long)
    for job_id in (victim.id, paused.id):
        _wait_step(client, job_id, 6)
    assert client.fine_tuning.jobs.cancel(victim.id).status == "cancelled"
    assert client.fine_tuning.jobs.pause(paused.id).status == "paused"
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(victim.id)
    time.sleep(2)
    stopped_at = max(metric_steps(all_events(client, paused.id)))
    assert client.fine_tuning.jobs.retrieve(victim.id).status == "cancelled"
    assert client.fine_tuning.jobs.resume(paused.id).status == "queued"
    done = wait_for(client, paused.id)
    assert done.status == "succeeded", done.error
    events = all_events(client, paused.id)
    steps = metric_steps(events)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > stopped_at
    assert any("resumed from its last checkpoint" in e.message for e in events)


def _wait_step(client: openai.OpenAI, job_id: str, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = metric_steps(list(client.fine_tuning.jobs.list_events(job_id, limit=5)))
        if steps and max(steps) >= step:
            return
        assert client.fine_tuning.jobs.retrieve(job_id).status not in TERMINAL
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} never reached step {step}")


def test_sigkill_the_server_mid_job_and_restart(service: Server, tmp_path: Path) -> None:
    key = service.key("acme")
    client = service.client(key)
    train = upload(client, write_jsonl(tmp_path / "train.jsonl", reverse_task(48)))
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 30, "batch_size": 8}}}
    job = client.fine_tuning.jobs.create(model="tiny", training_file=train, method=method)
    queued = client.fine_tuning.jobs.create(
        model="tiny", training_file=train, method=SFT, extra_body={"tuneforge": {"priority": -1}}
    )
    _wait_step(client, job.id, 3)
    service.stop(signal.SIGKILL)
    time.sleep(3)  # the job keeps training while nobody watches
    service.start()
    client = service.client(key)
    for job_id in (job.id, queued.id):
        done = wait_for(client, job_id)
        assert done.status == "succeeded", done.error
        events = all_events(client, job_id)
        steps = metric_steps(events)
        assert steps == list(range(1, len(steps) + 1))
        assert len({e.id for e in events}) == len(events) and len({e.message for e in events if e.type == "message"})


def test_isolation_between_projects_and_missing_keys(service: Server, tmp_path: Path) -> None:
    alice, bob = service.client(service.key("alice")), service.client(service.key("bob"))
    file_id = upload(alice, write_jsonl(tmp_path / "train.jsonl", reverse_task(8)))
    with pytest.raises(openai.NotFoundError):
        bob.files.retrieve(file_id)
    with pytest.raises(openai.NotFoundError):
        bob.files.content(file_id)
    with pytest.raises(openai.NotFoundError) as err:
        bob.fine_tuning.jobs.create(model="tiny", training_file=file_id)
    assert err.value.body["param"] == "training_file"  # type: ignore[index]
    job = alice.fine_tuning.jobs.create(model="tiny", training_file=file_id, method=SFT)
    for call in (bob.fine_tuning.jobs.retrieve, bob.fine_tuning.jobs.cancel, bob.fine_tuning.jobs.list_events):
        with pytest.raises(openai.NotFoundError):
            call(job.id)
    assert bob.fine_tuning.jobs.list().data == [] and bob.files.list().data == []
    assert [j.id for j in alice.fine_tuning.jobs.list().data] == [job.id]
    for headers in ({}, {"Authorization": "Bearer tfk-wrong"}, {"Authorization": "Basic abc"}):
        r = httpx.get(f"{service.url}/files", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        service.client("tfk-not-a-key").models.list()
    wait_for(alice, job.id)


def test_bad_requests_get_the_error_envelope(service: Server, tmp_path: Path) -> None:
    client = service.client(service.key("acme"))
    file_id = upload(client, write_jsonl(tmp_path / "train.jsonl", reverse_task(8)))
    cases = [
        ({"model": "tiny", "training_file": file_id, "suffix": "x" * 65}, "suffix"),
        ({"model": "tiny", "training_file": file_id, "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"model": "nope", "training_file": file_id}, "model"),
        (
            {
                "model": "tiny",
                "training_file": file_id,
                "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": -1}}},
            },
            "method.dpo.hyperparameters.beta",
        ),
        (
            {
                "model": "tiny",
                "training_file": file_id,
                "method": {
                    "type": "reinforcement",
                    "reinforcement": {
                        "grader": {"type": "string_check"},
                        "hyperparameters": {"reasoning_effort": "high"},
                    },
                },
            },
            "method.reinforcement.hyperparameters.reasoning_effort",
        ),
        ({"model": "tiny", "training_file": file_id, "tuneforge": {"method": "dpx"}}, "tuneforge.method"),
        (
            {"model": "tiny", "training_file": file_id, "tuneforge": {"overrides": {"model.path": "/etc"}}},
            "tuneforge.overrides",
        ),
        ({"model": "tiny", "training_file": file_id, "hyperparamters": {}}, "hyperparamters"),
    ]
    headers = {"Authorization": f"Bearer {client.api_key}"}
    for body, param in cases:
        r = httpx.post(f"{service.url}/fine_tuning/jobs", json=body, headers=headers)
        assert r.status_code == 400, (param, r.text)
        assert r.json()["error"]["param"] == param, r.text
    r = httpx.get(f"{service.url}/fine_tuning/jobs/ftjob-missing", headers=headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.post(
        f"{service.url}/files", headers=headers, files={"file": ("../../x.jsonl", b"{}")}, data={"purpose": "fine-tune"}
    )
    stored = list((service.home / "service" / "files").iterdir())
    assert r.status_code == 200 and {p.name for p in stored} == {f"{file_id}.jsonl", f"{r.json()['id']}.jsonl"}
    assert r.json()["filename"] == "../../x.jsonl"

    run = client.fine_tuning.alpha.graders.run(
        grader={
            "type": "string_check",
            "name": "g",
            "input": "{{sample.output_text}}",
            "reference": "{{item.a}}",
            "operation": "eq",
        },
        model_sample="yes",
        item={"a": "yes"},
    )
    assert run.reward == 1.0
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.alpha.graders.validate(grader={"type": "string_chek"})  # type: ignore[typeddict-item]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_high_priority_job_shrinks_an_elastic_one_which_regrows_and_matches_a_fixed_run(
    service: Server, tmp_path: Path
) -> None:
    import yaml
    from safetensors.torch import load_file

    import tuneforge

    client = service.client(service.key("acme"))
    train = upload(client, write_jsonl(tmp_path / "train.jsonl", reverse_task(160)))
    elastic = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=train,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 300, "batch_size": 8, "learning_rate_multiplier": 0.02}},
        },
        # fp32: a bit-level comparison with a fixed run (bf16 autocast, auto on AMX CPUs, rounds per micro-batch)
        extra_body={"tuneforge": {"replicas": "1:2", "priority": 0, "overrides": {"train.precision": "fp32"}}},
    )
    _wait_step(client, elastic.id, 3)
    assert client.fine_tuning.jobs.retrieve(elastic.id).tuneforge["current_replicas"] == 2  # type: ignore[attr-defined]
    urgent = client.fine_tuning.jobs.create(
        model="tiny", training_file=train, method=SFT, extra_body={"tuneforge": {"priority": 10}}
    )
    assert wait_for(client, urgent.id).status == "succeeded"
    done = wait_for(client, elastic.id, timeout=400)
    assert done.status == "succeeded", done.error

    events = all_events(client, elastic.id)
    resizes = [e.data for e in events if e.message.startswith("Resized")]
    assert resizes == [{"previous": 2, "replicas": 1}, {"previous": 1, "replicas": 2}]
    shrink = next(i for i, e in enumerate(events) if e.message.startswith("Resized from 2 to 1"))
    assert urgent.id in events[shrink].message
    urgent_started = next(e for e in all_events(client, urgent.id) if e.message.startswith("Fine-tuning job started"))
    assert int(events[shrink].id.split("-")[1]) < int(urgent_started.id.split("-")[1])
    steps = metric_steps(events)
    assert steps == list(range(1, len(steps) + 1))

    run_dir = Path(done.tuneforge["output_dir"]).parents[1]  # type: ignore[attr-defined]
    report = json.loads((run_dir / "result.json").read_text())["report"]
    assert report["steps_lost"] == 0
    recipe = yaml.safe_load((run_dir.parent / "recipe.yaml").read_text())
    recipe.pop("resilience")
    recipe["output"]["dir"] = str(tmp_path / "fixed")
    fixed = tuneforge.train(recipe, progress=False)
    ours = load_file(str(Path(done.tuneforge["output_dir"]) / "model.safetensors"))  # type: ignore[attr-defined]
    assert rel_diff(ours, load_file(str(fixed.output_dir / "model.safetensors"))) <= 1e-5
