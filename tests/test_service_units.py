"""The jobs service's parts without job processes: migrations, request → recipe mapping, uploads, the Kubernetes
executor's objects and state machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tuneforge.config import load_recipe
from tuneforge.methods import METHODS
from tuneforge.service.errors import APIError
from tuneforge.service.executors.base import Launch
from tuneforge.service.mapping import OPENAI_METHODS, build_recipe, plan_request, resolve_auto
from tuneforge.service.schemas import JobCreate

GRADER = {
    "type": "string_check",
    "name": "g",
    "input": "{{sample.output_text}}",
    "reference": "{{item.a}}",
    "operation": "eq",
}


def test_the_migrations_build_exactly_the_models(tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from tuneforge.service.db import Base, Database

    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.migrate()
    db.migrate()  # idempotent: a restart runs it again
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    db.dispose()


def _recipe(body: dict[str, Any], tmp_path: Path, n_examples: int = 100) -> tuple[dict[str, Any], dict[str, Any]]:
    request = JobCreate.model_validate(body)
    files = {fid: str(tmp_path / f"{fid}.jsonl") for fid in ("file-a", "file-b", "file-g")}
    return build_recipe(
        request,
        plan_request(request),
        job_id="ftjob-x",
        model_path=str(tmp_path),
        files=files,
        n_examples=n_examples,
        run_dir=tmp_path / "run",
        seed=3,
        tracking={"enabled": False},
        gpu=False,
    )


def test_openai_methods_map_onto_registry_methods_and_their_keys(tmp_path: Path) -> None:
    assert {m.registry_name for m in OPENAI_METHODS.values()} <= set(METHODS)
    dpo, hyper = _recipe(
        {
            "model": "m",
            "training_file": "file-a",
            "validation_file": "file-b",
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3, "batch_size": 4, "n_epochs": 2}}},
        },
        tmp_path,
    )
    assert dpo["method"] == "dpo" and dpo["dpo"]["beta"] == 0.3 and hyper["beta"] == 0.3
    assert dpo["train"]["global_batch_size"] == 4 and dpo["train"]["epochs"] == 2.0
    assert dpo["data"]["validation"].endswith("file-b.jsonl") and dpo["data"]["val_fraction"] == 0.0
    rl, _ = _recipe(
        {
            "model": "m",
            "training_file": "file-a",
            "method": {
                "type": "reinforcement",
                "reinforcement": {"grader": GRADER, "hyperparameters": {"compute_multiplier": 0.5, "eval_samples": 7}},
            },
        },
        tmp_path,
    )
    assert rl["method"] == "grpo" and rl["grpo"]["graders"] == GRADER
    assert rl["grpo"]["group_size"] == 4 and rl["grpo"]["eval_prompts"] == 7
    kto, _ = _recipe(
        {
            "model": "m",
            "training_file": "file-a",
            "tuneforge": {
                "method": "kto",
                "section": {"beta": 0.2},
                "mixture": [{"file": "file-g", "weight": 0.25}],
                "adapter": {"kind": "lora", "r": 8},
            },
        },
        tmp_path,
    )
    assert kto["method"] == "kto" and kto["kto"]["beta"] == 0.2 and kto["adapter"] == {"kind": "lora", "r": 8}
    assert [(s["name"], s["weight"]) for s in kto["data"]["sources"]] == [("train", 1.0), ("mix0", 0.25)]
    for recipe in (dpo, rl, kto):
        load_recipe(recipe)  # every mapped recipe passes the schema


def test_auto_hyperparameters_follow_the_data_size() -> None:
    small = resolve_auto({}, n_examples=40, parameters=300_000, gpu=False, adapter="full")
    large = resolve_auto({}, n_examples=100_000, parameters=300_000, gpu=False, adapter="full")
    assert small["n_epochs"] > large["n_epochs"] == 1
    assert small["batch_size"] < large["batch_size"] == 16
    assert resolve_auto({}, n_examples=100_000, parameters=None, gpu=True, adapter="lora")["batch_size"] == 64
    assert resolve_auto({"batch_size": 3}, n_examples=40, parameters=None, gpu=False, adapter="lora")["batch_size"] == 3


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tuneforge": {"method": "kt"}}, "tuneforge.method"),
        ({"tuneforge": {"replicas": "3:2"}}, "tuneforge.replicas"),
        ({"tuneforge": {"overrides": {"data.sources": []}}}, "tuneforge.overrides"),
        ({"tuneforge": {"overrides": {"grpo.graders": {}}}}, "tuneforge.overrides"),
        (
            {"method": {"type": "reinforcement", "reinforcement": {"grader": {"type": "nope"}}}},
            "method.reinforcement.grader",
        ),
    ],
)
def test_requests_that_cannot_run_are_refused_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as err:
        plan_request(JobCreate.model_validate({"model": "m", "training_file": "file-a", **body}))
    assert err.value.param == param and err.value.status == 400


def test_replicas_only_for_methods_the_registry_calls_elastic() -> None:
    single = [m.name for m in METHODS.values() if not m.elastic]
    if not single:
        pytest.skip("every registry method runs on elastic replicas")
    with pytest.raises(APIError) as err:
        plan_request(
            JobCreate.model_validate(
                {"model": "m", "training_file": "f", "tuneforge": {"method": single[0], "replicas": "1:2"}}
            )
        )
    assert err.value.param == "tuneforge.replicas"


def test_uploads_over_the_limit_are_refused_and_leave_nothing(tmp_path: Path) -> None:
    from tuneforge.service.app import create_app
    from tuneforge.service.auth import create_key
    from tuneforge.service.settings import Settings

    settings = Settings(root=tmp_path / "svc", max_upload_bytes=1000, tracking=False)
    app = create_app(settings)
    with TestClient(app) as client:
        headers = {"Authorization": f"Bearer {create_key(app.state.db, 'p')}"}
        r = client.post(
            "/v1/files", headers=headers, files={"file": ("big.jsonl", b"x" * 5000)}, data={"purpose": "fine-tune"}
        )
        assert r.status_code == 413 and r.json()["error"]["param"] == "file"
        r = client.post("/v1/files", headers=headers, files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "batch"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
        assert list(settings.files_dir.iterdir()) == []
        ok = client.post(
            "/v1/files", headers=headers, files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "fine-tune"}
        )
        assert ok.status_code == 200 and ok.json()["bytes"] == 3
        assert client.get("/v1/files", headers=headers).json()["data"][0]["id"] == ok.json()["id"]
        assert client.delete(f"/v1/files/{ok.json()['id']}", headers=headers).json()["deleted"] is True
        assert client.get("/v1/nowhere", headers=headers).json()["error"]["code"] == "not_found"


def test_the_line_tail_numbers_lines_the_same_after_a_restart(tmp_path: Path) -> None:
    from tuneforge.training.watch import LineTail

    path = tmp_path / "events.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a"')
    tail = LineTail()
    assert tail.numbered(path) == [(1, '{"a": 1}'), (2, '{"a": 2}')]
    with path.open("a") as f:
        f.write(': 3}\n{"a": 4}\n')
    assert tail.numbered(path) == [(3, '{"a": 3}'), (4, '{"a": 4}')]
    assert [n for n, _ in LineTail().numbered(path)] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------- kubernetes


def _roundtrip(obj: Any) -> Any:
    """Serialize with the client, then parse back into its model class (what the API server would accept)."""
    from kubernetes.client import ApiClient

    api = ApiClient()
    data = api.sanitize_for_serialization(obj)

    class Response:  # the shape ApiClient.deserialize reads
        def __init__(self, body: str) -> None:
            self.data = body

    back = api.deserialize(Response(json.dumps(data)), type(obj).__name__)
    assert api.sanitize_for_serialization(back) == data
    return data


def test_kubernetes_objects_are_valid_client_models(tmp_path: Path) -> None:
    from tuneforge.service.executors.kubernetes import render

    launch = Launch("ftjob-abc", tmp_path / "recipe.yaml", tmp_path / "run", tmp_path)
    (job,) = render(launch, image="img", namespace="ns", replicas=1, state_path="/state")
    data = _roundtrip(job)
    assert data["kind"] == "Job" and data["spec"]["completions"] == 1
    container = data["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["tuneforge", "train", str(tmp_path / "recipe.yaml"), "--quiet"]
    assert container["volumeMounts"] == [{"mountPath": "/state", "name": "state"}]

    elastic = Launch("ftjob-abc", tmp_path / "recipe.yaml", tmp_path / "run", tmp_path, replicas="2:4")
    deployment, service, job = render(elastic, image="img", namespace="ns", replicas=4, min_replicas=2, state_path="/s")
    assert [_roundtrip(o)["kind"] for o in (deployment, service, job)] == ["Deployment", "Service", "Job"]
    spec = _roundtrip(job)["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"] == 4
    command = spec["template"]["spec"]["containers"][0]["command"]
    assert "resilience.lighthouse=ftjob-abc-lh:29510" in command
    assert _roundtrip(deployment)["spec"]["template"]["spec"]["containers"][0]["command"][-1] == "2"


def test_kubernetes_job_states() -> None:
    from kubernetes import client as k8s

    from tuneforge.service.executors.kubernetes import job_status

    def job(*conditions: tuple[str, str], active: int = 0) -> Any:
        conds = [k8s.V1JobCondition(type=t, status=s) for t, s in conditions]
        return k8s.V1Job(status=k8s.V1JobStatus(active=active, conditions=conds or None))

    assert job_status(None).state == "lost"
    assert job_status(job(active=1)).state == "running"
    assert job_status(job(("Complete", "True"))) == job_status(job(("SuccessCriteriaMet", "True")))
    assert job_status(job(("Complete", "True"))).returncode == 0
    assert job_status(job(("Failed", "True"))).returncode == 1
    assert job_status(job(("Failed", "False"), active=1)).state == "running"
