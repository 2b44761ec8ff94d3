"""One elastic job across two "nodes", on this one machine: the same engine, not a different code path.

An external lighthouse (the ``lighthouse`` command), node a's supervisor in this process and node b's as
the per-node command in a subprocess, each with its own run directory, node name and bind address
(127.0.0.1 and 127.0.0.2, so every endpoint really is reached through the address its node advertises).
The result must equal a single-supervisor run with the same seed and batch. Every process is stopped
by PID and checked gone. Also: the new ``resilience:`` options, ``--set`` spellings from the docs, and the
Kubernetes manifest.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tuneforge.distributed.config import JobSpec, ResilienceConfig
from tuneforge.distributed.network import lighthouse_url, replica_id
from tuneforge.errors import RecipeError, TuneforgeError

from conftest import free_port, rel_diff

ROOT = Path(__file__).resolve().parents[1]
TASK = "tuneforge.distributed.toy:make_task"
TASK_CONFIG = {"num_samples": 256, "sample_time_s": 0.004}
STEPS, GLOBAL_BATCH, MICRO_BATCH, SEED = 60, 16, 4, 11
RUN_TIMEOUT_S = 150
COMMON = {"timeout_s": 15, "quorum_timeout_s": 120, "hang_timeout_s": 60}


# -- helpers ----------------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def stop_pids(pids: list[int]) -> None:
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def spawned_pids(run_dir: Path) -> list[int]:
    """Every replica / spare PID a supervisor started, from its event log."""
    path = run_dir / "events" / "supervisor.jsonl"
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e["pid"] for e in events if e["kind"] in ("spawn", "spare_spawn")]


def events_of(run_dir: Path) -> list[dict[str, Any]]:
    from tuneforge.distributed.metrics import read_events

    return read_events(run_dir)


def commits(run_dir: Path) -> list[dict[str, Any]]:
    return [e for e in events_of(run_dir) if e["kind"] == "attempt" and e["committed"]]


def final_params(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path)


@contextmanager
def external_lighthouse(tmp: Path, min_replicas: int) -> Iterator[str]:
    """``python -m tuneforge.distributed lighthouse`` on a free port; yields its address; stops it by PID."""
    out, addr_file = tmp / "lighthouse.out", tmp / "lighthouse.addr"
    with open(out, "wb") as stdout:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tuneforge.distributed", "lighthouse", "--bind", "127.0.0.1:0",
             "--min-replicas", str(min_replicas), "--log", str(tmp / "lighthouse.log"), "--address-file", str(addr_file)],
            stdout=stdout, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
    child = None
    try:
        end = time.monotonic() + 60
        while not (addr_file.exists() and "pid " in out.read_text()):
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < end, "lighthouse did not start"
            time.sleep(0.05)
        child = int(out.read_text().split("pid ")[1].split(")")[0])
        yield addr_file.read_text().strip()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                assert proc.wait(timeout=15) == 0, out.read_text()
            finally:
                stop_pids([proc.pid])
        if child is not None:
            deadline = time.monotonic() + 10
            while pid_alive(child) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not pid_alive(child), "the lighthouse command left torchft's lighthouse running"


def node_spec(lighthouse: str, node: str | None, bind_host: str, **extra: Any) -> JobSpec:
    return JobSpec(
        task=TASK, task_config=TASK_CONFIG, steps=STEPS, global_batch_size=GLOBAL_BATCH,
        micro_batch_size=MICRO_BATCH, seed=SEED,
        resilience=ResilienceConfig(min_replicas=1, max_replicas=1, replicas=1, lighthouse=lighthouse, node=node,
                                    bind_host=bind_host, **COMMON, **extra),
    )  # fmt: skip


@contextmanager
def node_command(
    run_dir: Path, lighthouse: str, node: str, bind_host: str, fault_plan: str | None = None, **extra: Any
) -> Iterator[subprocess.Popen[bytes]]:
    """Node b: the per-node command, as an operator would run it on its own machine."""
    resilience = {"lighthouse": lighthouse, "node": node, "bind_host": bind_host, **COMMON, **extra}
    cmd = [sys.executable, "-m", "tuneforge.distributed", "train", "--task", TASK,
           "--task-config", json.dumps(TASK_CONFIG), "--steps", str(STEPS), "--global-batch-size", str(GLOBAL_BATCH),
           "--micro-batch-size", str(MICRO_BATCH), "--seed", str(SEED), "--replicas", "1:1",
           "--resilience", json.dumps(resilience), "--run-dir", str(run_dir), "--timeout-s", str(RUN_TIMEOUT_S)]  # fmt: skip
    if fault_plan:
        cmd += ["--fault-plan", fault_plan]
    run_dir.mkdir(parents=True)
    with open(run_dir.parent / f"{run_dir.name}.out", "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the supervisor stops its replicas on SIGTERM
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        stop_pids([proc.pid, *spawned_pids(run_dir)])
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(pid_alive(p) for p in spawned_pids(run_dir)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(pid_alive(p) for p in spawned_pids(run_dir)), "node b left replicas running"


def run_two_nodes(
    tmp: Path, fault_plan_a: str | None = None, fault_plan_b: str | None = None, **extra: Any
) -> tuple[Path, Path, Any, dict[str, Any]]:
    """Lighthouse + node a (in-process) + node b (command); returns both run dirs and both reports."""
    from tuneforge.distributed import start_background

    dir_a, dir_b = tmp / "node-a", tmp / "node-b"
    with (
        external_lighthouse(tmp, min_replicas=2) as lighthouse,
        node_command(dir_b, lighthouse, "b", "127.0.0.2", fault_plan=fault_plan_b, **extra) as proc_b,
    ):
        spec_a = node_spec(lighthouse, "a", "127.0.0.1", fault_plan=fault_plan_a, **extra)
        sup, thread = start_background(spec_a, dir_a, timeout_s=RUN_TIMEOUT_S)
        try:
            thread.join(RUN_TIMEOUT_S + 30)
            assert not thread.is_alive(), "node a did not finish"
        finally:
            sup.shutdown()
        assert sup.live_pids() == [] and not any(pid_alive(p) for p in spawned_pids(dir_a))
        assert "error" not in sup.result, sup.result.get("error")  # type: ignore[attr-defined]
        assert proc_b.wait(timeout=60) == 0, (tmp / "node-b.out").read_text()[-3000:]
    report_b = json.loads((tmp / "node-b.out").read_text().strip().splitlines()[-1])
    return dir_a, dir_b, sup.result["report"], report_b  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same job on one supervisor with two replicas (its own lighthouse, defaults everywhere)."""
    pytest.importorskip("torchft")
    from tuneforge.distributed import Supervisor

    run_dir = tmp_path_factory.mktemp("single-host")
    spec = JobSpec(
        task=TASK, task_config=TASK_CONFIG, steps=STEPS, global_batch_size=GLOBAL_BATCH,
        micro_batch_size=MICRO_BATCH, seed=SEED,
        resilience=ResilienceConfig(min_replicas=2, max_replicas=2, final_state="all", **COMMON),
    )  # fmt: skip
    sup = Supervisor(spec, run_dir)
    try:
        report = sup.run(timeout_s=RUN_TIMEOUT_S)
    finally:
        sup.shutdown()
    assert sup.live_pids() == []
    assert report.steps_committed == STEPS
    return final_params(run_dir / "final" / "replica_0.pt")


def assert_quorum_of_two(run_dir: Path) -> None:
    done = commits(run_dir)
    assert done and all(e["world"] == 2 for e in done), "every committed step must span both nodes"


# -- the end-to-end runs ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_nodes_train_together_and_match_single_host(tmp_path: Path, reference: dict[str, Any]) -> None:
    dir_a, dir_b, report_a, report_b = run_two_nodes(tmp_path)

    assert report_a.steps_committed == STEPS and report_b["steps_committed"] == STEPS
    for run_dir in (dir_a, dir_b):
        assert_quorum_of_two(run_dir)
        assert {e["step"] for e in commits(run_dir)} == set(range(STEPS))
    ready = {d.name: [e for e in events_of(d) if e["kind"] == "manager_ready"] for d in (dir_a, dir_b)}
    assert [(e["node"], e["host"]) for e in ready["node-a"]] == [("a", "127.0.0.1")]
    assert [(e["node"], e["host"]) for e in ready["node-b"]] == [("b", "127.0.0.2")]
    assert json.loads((dir_b / "job.json").read_text())["resilience"]["lighthouse"].startswith("http://127.0.0.1:")

    # final_state "rank0": rank 0 is on node a, and node b's slot 0 writes its node's copy too
    final_a, final_b = final_params(dir_a / "final" / "replica_0.pt"), final_params(dir_b / "final" / "replica_0.pt")
    assert rel_diff(final_a, final_b) == 0.0
    assert rel_diff(final_a, reference) <= 1e-5


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killed_replica_on_node_b_is_replaced_there_and_heals_from_node_a(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    dir_a, dir_b, _report_a, report_b = run_two_nodes(tmp_path, fault_plan_b="kill:0@20")

    events_b = events_of(dir_b)
    (fault,) = [e for e in events_b if e["kind"] == "fault"]
    assert fault["target"] == 0 and fault["step"] == 20
    assert not [e for e in events_of(dir_a) if e["kind"] in ("fault", "spawn") and e.get("inc", 0) > 0]
    (respawn,) = [e for e in events_b if e["kind"] == "spawn" and e["inc"] == 1]
    assert respawn["replica"] == 0 and respawn["mode"] == "join", "the replacement must heal from a live peer"
    replacement = [e for e in events_b if e.get("replica") == 0 and e.get("inc") == 1]
    healed = [e for e in replacement if e["kind"] == "healed"]
    assert healed and healed[0]["source"].startswith("http://127.0.0.1:"), "it must heal from node a's replica"
    assert not [e for e in replacement if e["kind"] == "ckpt_loaded"]

    assert_quorum_of_two(dir_a)  # the lighthouse wants 2: node a waited for node b's replacement
    assert {e["step"] for e in commits(dir_a)} == set(range(STEPS))
    assert {e["step"] for e in replacement if e["kind"] == "attempt" and e["committed"]} >= set(range(21, STEPS))
    assert report_b["failures"][0]["healed_from_peer"] and not report_b["failures"][0]["cold_restart"]

    final_a, final_b = final_params(dir_a / "final" / "replica_0.pt"), final_params(dir_b / "final" / "replica_0.pt")
    assert rel_diff(final_b, final_a) == 0.0
    assert rel_diff(final_a, reference) <= 1e-5


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_every_replica_on_every_node_dies_and_each_node_resumes_from_its_own_checkpoint(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    """Nobody holds live state any more. The replacements try to join and find no peer with state anywhere
    (they exit as orphaned); a node restarts from the checkpoint its own slot 0 wrote, and a node whose
    joiner is still waiting heals from that one instead (which node does which is a race: both are right)."""
    from tuneforge.distributed.metrics import analyze

    dir_a, dir_b, _, _ = run_two_nodes(tmp_path, "kill:0@25", "kill:0@25", checkpoint_every=10)

    resumed = []
    for run_dir in (dir_a, dir_b):
        events = events_of(run_dir)
        spawns = [(e["inc"], e["mode"]) for e in events if e["kind"] == "spawn"]
        assert spawns[:2] == [(0, "resume"), (1, "join")], spawns  # after the kill: join first, never disk
        assert sorted(p.name for p in (run_dir / "ckpt").glob("step_*.pt")) == ["step_00000040.pt", "step_00000050.pt"]
        loads = [e for e in events if e["kind"] == "ckpt_loaded"]
        if loads:  # this node's joiner was orphaned: restarted from this node's own checkpoint
            assert spawns == [(0, "resume"), (1, "join"), (2, "resume")]
            assert [e["inc"] for e in events if e["kind"] == "orphaned"] == [1]
            (load,) = loads
            assert load["inc"] == 2 and load["step"] == 20 and Path(load["path"]).parent == run_dir / "ckpt"
            assert analyze(run_dir).steps_lost == 5  # steps 20..24 were recomputed
            resumed.append(run_dir.name)
        else:  # this node's joiner healed from the other node's restarted replica
            assert spawns == [(0, "resume"), (1, "join")]
            assert [e["step"] for e in events if e["kind"] == "healed" and e["inc"] == 1][-1] >= 20
        assert_quorum_of_two(run_dir)
        assert {e["step"] for e in commits(run_dir)} == set(range(STEPS))
    assert resumed, "someone must have restarted from disk: no live state was left anywhere"

    final_a, final_b = final_params(dir_a / "final" / "replica_0.pt"), final_params(dir_b / "final" / "replica_0.pt")
    assert rel_diff(final_b, final_a) == 0.0
    assert rel_diff(final_a, reference) <= 1e-5


# -- fast checks ------------------------------------------------------------------------------------------
def test_lighthouse_command_prints_address_and_stops_on_sigterm(tmp_path: Path) -> None:
    with external_lighthouse(tmp_path, min_replicas=2) as address:
        host, port = address.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5):
            pass
        printed = (tmp_path / "lighthouse.out").read_text()
        assert f"lighthouse listening on {address}" in printed
        assert f"--set resilience.lighthouse={host}:{port}" in printed
    with pytest.raises(OSError):  # stopped: nothing listens any more
        socket.create_connection((host, int(port)), timeout=2).close()


def test_lighthouse_command_rejects_bad_bind() -> None:
    out = subprocess.run([sys.executable, "-m", "tuneforge.distributed", "lighthouse", "--bind", "0.0.0.0",
                          "--min-replicas", "2"], capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert out.returncode == 2 and "--bind" in out.stderr and "PORT" in out.stderr


def test_resilience_multi_node_options_default_to_single_host() -> None:
    res = ResilienceConfig.from_dict({})
    assert (res.lighthouse, res.node, res.bind_host, res.advertise_host) == (None, None, "127.0.0.1", None)
    assert not res.multi_node
    assert replica_id(None, 3) == "tuneforge_replica_3"  # the id single-host runs always used
    res = ResilienceConfig.from_dict({"lighthouse": "10.0.0.5:29510", "node": 7, "bind_host": "0.0.0.0"})
    assert res.multi_node and res.node == "7" and replica_id(res.node, 0) == "7_replica_0"
    assert lighthouse_url("10.0.0.5:29510") == lighthouse_url("http://10.0.0.5:29510/") == "http://10.0.0.5:29510"
    assert lighthouse_url("[fd00::1]:29510") == "http://[fd00::1]:29510"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"lighthose": "lh:29510"}, "resilience.lighthose: unknown option — did you mean 'lighthouse'?"),
        ({"bind_hots": "0.0.0.0"}, "did you mean 'bind_host'?"),
        ({"lighthouse": "lh"}, "resilience.lighthouse: got 'lh', expected HOST:PORT"),
        ({"lighthouse": "grpc://lh:29510"}, "resilience.lighthouse: got 'grpc://lh:29510', expected http://"),
        ({"lighthouse": "0.0.0.0:29510"}, "resilience.lighthouse: got '0.0.0.0:29510', expected the address peers"),
        ({"lighthouse": "lh:99999"}, "a port number"),
        ({"node": "a:b"}, "resilience.node: got 'a:b', expected a name of letters"),
        ({"bind_host": "$POD_IP"}, "resilience.bind_host: got '$POD_IP', expected a host name or IP address"),
        ({"bind_host": "10.0.0.1:80"}, "expected a host name or IP address without a port"),
        ({"advertise_host": "0.0.0.0"}, "resilience.advertise_host: got '0.0.0.0', expected a name or address peers"),
    ],
)
def test_resilience_multi_node_options_are_validated(data: dict[str, Any], message: str) -> None:
    with pytest.raises(RecipeError) as err:
        ResilienceConfig.from_dict(data)
    assert message in str(err.value)


def test_docs_set_spellings_reach_the_engine() -> None:
    """The exact `--set` lines of docs/multi-node.md, through the recipe loader (YAML-typed values)."""
    from tuneforge.config import load_recipe

    recipe = load_recipe(
        {"model": {"path": "m"}, "data": {"sources": [{"path": "d.jsonl"}]}},
        ["resilience.lighthouse=10.0.0.5:29510", "resilience.node=trainer-1", "resilience.bind_host=10.1.2.3",
         "resilience.advertise_host=trainer-1.trainers", "resilience.checkpoint_every=25"],
    )  # fmt: skip
    res = ResilienceConfig.from_dict(recipe.resilience)
    assert (res.lighthouse, res.node, res.bind_host, res.advertise_host) == (
        "10.0.0.5:29510",
        "trainer-1",
        "10.1.2.3",
        "trainer-1.trainers",
    )
    with pytest.raises(RecipeError, match="resilience.bind_host"):
        load_recipe({"model": {"path": "m"}, "data": {"sources": [{"path": "d.jsonl"}]}}, ["resilience.bind_host="])


def test_unreachable_lighthouse_fails_fast_naming_the_option(tmp_path: Path) -> None:
    from tuneforge.distributed import Supervisor
    from tuneforge.distributed.network import default_node_name

    spec = node_spec(f"127.0.0.1:{free_port()}", None, "127.0.0.1")
    spec.resilience.quorum_timeout_s = 0.5
    sup = Supervisor(spec, tmp_path / "run")
    assert sup.res.node == default_node_name() and spec.resilience.node is None  # the caller's spec is untouched
    with pytest.raises(TuneforgeError, match="resilience.lighthouse: nothing answers at http://127.0.0.1:"):
        sup.start()
    assert sup.live_pids() == []


def test_two_nodes_cannot_share_a_run_directory(tmp_path: Path) -> None:
    from tuneforge.distributed import Supervisor

    run_dir = tmp_path / "shared"
    run_dir.mkdir()
    (run_dir / "supervisor.json").write_text(json.dumps({"pid": 1, "node": "a"}))
    sup = Supervisor(node_spec("127.0.0.1:1", "b", "127.0.0.1"), run_dir)
    with pytest.raises(TuneforgeError, match="belongs to node 'a', not 'b'"):
        sup.start()
    assert sup.live_pids() == []


def test_kubernetes_manifest_parses_and_runs_the_documented_command() -> None:
    """The example manifest: valid YAML, and its trainer command is a valid `tuneforge train` invocation."""
    from tuneforge.config import load_recipe

    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "tuneforge-elastic.yaml").read_text()) if d]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    assert {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "Job"} <= by_kind.keys()

    lighthouse = by_kind["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert lighthouse[:2] == ["tuneforge", "lighthouse"]
    opts = dict(zip(lighthouse[2::2], lighthouse[3::2]))
    (service,) = by_kind["Service"]
    assert service["spec"]["selector"] == by_kind["Deployment"][0]["spec"]["template"]["metadata"]["labels"]
    assert opts["--bind"] == f"0.0.0.0:{service['spec']['ports'][0]['targetPort']}"

    job = by_kind["Job"][0]["spec"]
    assert job["completionMode"] == "Indexed" and int(opts["--min-replicas"]) <= job["parallelism"]
    pod = job["template"]["spec"]
    trainer = pod["containers"][0]
    env = {e["name"]: e for e in trainer["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert "job-completion-index" in env["NODE_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] >= 1
    mounts = {m["name"]: m["mountPath"] for m in trainer["volumeMounts"]}
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
    }
    assert claims["state"] == "tuneforge-state" and env["TUNEFORGE_HOME"]["value"].startswith(mounts["state"] + "/")

    # the command as Kubernetes would expand it on pod 1, through the real recipe loader
    expand = {"$(POD_IP)": "10.1.2.3", "$(NODE_INDEX)": "1", "$(TUNEFORGE_HOME)": "/state/trainer-1"}
    command = []
    for arg in trainer["command"]:
        for var, value in expand.items():
            arg = arg.replace(var, value)
        command.append(arg)
    assert command[:2] == ["tuneforge", "train"] and command[3:5] == ["--replicas", "1:1"]
    sets = [command[i + 1] for i, a in enumerate(command) if a == "--set"]
    recipe_text = by_kind["ConfigMap"][0]["data"]["recipe.yaml"]
    recipe = load_recipe(yaml.safe_load(recipe_text), sets)
    res = ResilienceConfig.from_dict(recipe.resilience)
    assert (
        lighthouse_url(res.lighthouse or "")
        == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    )
    assert (res.node, res.bind_host) == ("trainer-1", "10.1.2.3")
    assert recipe.output.dir == "/state/trainer-1/runs/tickets-lora"
