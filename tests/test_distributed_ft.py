"""End-to-end elastic / fault-tolerant training: real replica processes, a real torchft lighthouse,
gloo over 127.0.0.1, the toy task. Each test is bounded by a timeout and stops every process it
started (the supervisor kills its children by PID; we assert none is left)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import rel_diff

torch = pytest.importorskip("torch")
pytest.importorskip("torchft")

from tuneforge.distributed import JobSpec, ResilienceConfig, Supervisor, scale, start_background  # noqa: E402
from tuneforge.distributed.metrics import read_events  # noqa: E402
from tuneforge.errors import TuneforgeError  # noqa: E402

pytestmark = pytest.mark.slow

STEPS = 150
RUN_TIMEOUT_S = 170


def make_spec(replicas: int, min_replicas: int = 1, max_replicas: int = 3, **resilience: Any) -> JobSpec:
    return JobSpec(
        task="tuneforge.distributed.toy:make_task",
        task_config={"num_samples": 384, "sample_time_s": 0.004},
        steps=STEPS,
        global_batch_size=16,
        micro_batch_size=3,
        seed=7,
        resilience=ResilienceConfig(
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            replicas=replicas,
            timeout_s=15,
            hang_timeout_s=30,
            final_state="all",
            **resilience,
        ),
    )


def run_job(spec: JobSpec, run_dir: Path) -> Any:
    sup = Supervisor(spec, run_dir)
    try:
        return sup.run(timeout_s=RUN_TIMEOUT_S)
    finally:
        sup.shutdown()
        assert sup.live_pids() == []


def final_params(run_dir: Path, slot: int) -> dict[str, Any]:
    return torch.load(run_dir / "final" / f"replica_{slot}.pt")


def committed(run_dir: Path) -> list[dict[str, Any]]:
    return [e for e in read_events(run_dir) if e["kind"] == "attempt" and e["committed"]]


def max_step(run_dir: Path) -> int:
    steps = [0]
    for path in (run_dir / "status").glob("replica_*.json"):
        try:
            steps.append(json.loads(path.read_text()).get("step", 0))
        except (OSError, ValueError):
            pass
    return max(steps)


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A fixed 2-replica run: the parameters every elastic/faulty run must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference")
    report = run_job(make_spec(replicas=2, max_replicas=2), run_dir)
    assert report.steps_committed == STEPS and report.steps_lost == 0
    a, b = final_params(run_dir, 0), final_params(run_dir, 1)
    assert rel_diff(a, b) == 0.0
    return a


@pytest.mark.timeout(240)
def test_kill_mid_step_survivors_continue_and_replacement_heals_from_peer(tmp_path: Path, reference: dict) -> None:
    spec = make_spec(replicas=3, fault_plan="kill:1@6", checkpoint_every=20)
    report = run_job(spec, tmp_path)
    events = read_events(tmp_path)

    (fault,) = [e for e in events if e["kind"] == "fault"]
    assert fault["target"] == 1 and fault["step"] == 6
    spawns = [e for e in events if e["kind"] == "spawn" and e["replica"] == 1 and e["inc"] == 1]
    assert spawns and spawns[0]["mode"] == "join"
    replacement = [e for e in events if e.get("replica") == 1 and e.get("inc") == 1]
    kinds = {e["kind"] for e in replacement}
    assert "healed" in kinds, "the replacement must receive live state from a peer"
    assert "ckpt_loaded" not in kinds, "the replacement must not read a disk checkpoint"
    assert list((tmp_path / "ckpt").glob("step_*.pt")), "checkpoints existed and were still not read"

    first_back = min(e["t_end"] for e in replacement if e["kind"] == "attempt" and e["committed"])
    survivor_steps = {
        e["step"] for e in committed(tmp_path) if e["replica"] in (0, 2) and fault["t"] < e["t_end"] < first_back
    }
    assert len(survivor_steps) >= 3, "survivors must keep stepping while the replacement starts"

    (ev,) = report.failures
    assert ev.steps_lost == 0 and ev.healed_from_peer and not ev.cold_restart
    assert ev.detection_s is not None and ev.survivor_resume_s is not None and ev.replacement_s is not None
    assert ev.survivor_resume_s < ev.replacement_s
    assert report.steps_committed == STEPS and report.steps_lost == 0

    finals = [final_params(tmp_path, s) for s in (0, 1, 2)]
    assert rel_diff(finals[1], finals[0]) <= 1e-7  # replacement == survivors
    assert rel_diff(finals[2], finals[0]) <= 1e-7
    assert rel_diff(finals[0], reference) <= 1e-5  # == fixed 2-replica run


@pytest.mark.timeout(240)
def test_scale_2_to_3_to_1_matches_fixed_run(tmp_path: Path, reference: dict) -> None:
    spec = make_spec(replicas=2, hot_spares=1)
    sup, thread = start_background(spec, tmp_path, timeout_s=RUN_TIMEOUT_S)
    try:
        wait_until(lambda: max_step(tmp_path) >= 10, 90, "step 10")
        sup.scale(3)  # in-process API
        wait_until(lambda: any(e["world"] == 3 for e in committed(tmp_path)), 60, "a 3-replica step")
        out = subprocess.run(  # `scale RUN N` from another process, as a user would
            [sys.executable, "-m", "tuneforge.distributed", "scale", str(tmp_path), "1"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        thread.join(RUN_TIMEOUT_S)
        assert not thread.is_alive()
    finally:
        sup.shutdown()
        thread.join(10)
    assert sup.live_pids() == []
    assert "error" not in sup.result, sup.result.get("error")  # type: ignore[attr-defined]
    report = sup.result["report"]  # type: ignore[attr-defined]

    events = read_events(tmp_path)
    assert any(e["kind"] == "activate" for e in events), "scale-up should use the hot spare"
    worlds: list[int] = []
    for e in sorted(committed(tmp_path), key=lambda e: e["step"]):
        if not worlds or worlds[-1] != e["world"]:
            worlds.append(e["world"])
    assert worlds[0] == 2 and 3 in worlds and worlds[-1] == 1
    assert worlds.index(3) < len(worlds) - 1
    assert report.steps_committed == STEPS and report.steps_lost == 0
    assert sorted(int(p.stem.split("_")[1]) for p in (tmp_path / "final").glob("replica_*.pt")) == [0]
    assert rel_diff(final_params(tmp_path, 0), reference) <= 1e-5


@pytest.mark.timeout(240)
def test_all_replicas_dead_resumes_from_last_disk_checkpoint(tmp_path: Path, reference: dict) -> None:
    spec = make_spec(replicas=2, max_replicas=2, fault_plan="kill:0@25,kill:1@25", checkpoint_every=10)
    report = run_job(spec, tmp_path)
    events = read_events(tmp_path)
    loads = [e for e in events if e["kind"] == "ckpt_loaded"]
    assert {e["step"] for e in loads} == {20}
    assert {e["replica"] for e in loads} == {0, 1}
    assert any(e["kind"] == "cold_restart" for e in events)
    assert report.steps_lost == 5  # steps 20..24 were committed, lost with everyone, and recomputed
    assert report.steps_committed == STEPS
    assert all(f.cold_restart for f in report.failures)
    finals = [final_params(tmp_path, s) for s in (0, 1)]
    assert rel_diff(finals[1], finals[0]) <= 1e-7
    assert rel_diff(finals[0], reference) <= 1e-5
    assert os.path.exists(tmp_path / "ckpt")


@pytest.mark.timeout(240)
def test_hung_replica_is_dropped_by_timeout_and_replaced(tmp_path: Path, reference: dict) -> None:
    # the hung replica keeps heartbeating (only its main thread stops), so peers notice through the
    # collective timeout and the supervisor's watchdog replaces it
    spec = make_spec(replicas=3, fault_plan="hang:2@8")
    spec.resilience.timeout_s = 4
    spec.resilience.hang_timeout_s = 3
    report = run_job(spec, tmp_path)
    events = read_events(tmp_path)
    assert any(e["kind"] == "watchdog_kill" and e["replica"] == 2 for e in events)
    (ev,) = report.failures
    assert ev.action == "hang" and ev.steps_lost == 0 and ev.healed_from_peer
    assert ev.detection_s is not None and ev.detection_s >= 3.0  # found by the collective timeout
    assert ev.survivor_resume_s is not None and ev.replacement_s is not None
    assert report.steps_committed == STEPS
    finals = [final_params(tmp_path, s) for s in (0, 1, 2)]
    assert rel_diff(finals[2], finals[0]) <= 1e-7
    assert rel_diff(finals[0], reference) <= 1e-5


def test_scale_rejects_out_of_range(tmp_path: Path) -> None:
    make_spec(replicas=2).save(tmp_path / "job.json")
    with pytest.raises(TuneforgeError, match="outside this run's --replicas 1:3"):
        scale(tmp_path, 5)
    with pytest.raises(TuneforgeError, match="no elastic run"):
        scale(tmp_path / "missing", 2)
