"""Pure parts of the elastic engine: sample assignment, batch/LR policy, fault plans, config, metrics."""

from __future__ import annotations

import json
import math

import pytest

from tuneforge.distributed.assignment import (
    BatchPolicy,
    epoch_order,
    indices_at,
    micro_batches,
    plan_step,
    shard,
    start_position,
)
from tuneforge.distributed.config import JobSpec, ResilienceConfig, parse_replicas
from tuneforge.distributed.faults import FaultPlan, claim
from tuneforge.distributed.metrics import EventLog, analyze, read_events
from tuneforge.errors import RecipeError


# -- assignment --------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 7, 16, 33])
@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
def test_shards_partition_the_batch_in_order(n: int, world: int) -> None:
    items = list(range(100, 100 + n))
    parts = [shard(items, r, world) for r in range(world)]
    assert [x for p in parts for x in p] == items  # no sample lost, duplicated or reordered
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_shard_rejects_bad_rank() -> None:
    with pytest.raises(ValueError):
        shard([1, 2], 2, 2)


def test_micro_batches_cover_share() -> None:
    mbs = micro_batches(list(range(10)), 4)
    assert mbs == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert micro_batches([], 4) == []


def test_epoch_order_is_a_seeded_permutation() -> None:
    a = epoch_order(50, 0, seed=3)
    assert sorted(a) == list(range(50))
    assert a == epoch_order(50, 0, seed=3)
    assert a != epoch_order(50, 1, seed=3)  # new epoch, new order
    assert a != epoch_order(50, 0, seed=4)
    assert epoch_order(5, 0, seed=0, shuffle=False) == (0, 1, 2, 3, 4)


def test_stream_crosses_epochs_without_gaps() -> None:
    n = 10
    stream = indices_at(0, 30, n, seed=1)
    for epoch in range(3):
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert indices_at(7, 6, n, seed=1) == stream[7:13]


@pytest.mark.parametrize("worlds", [[2, 2, 2, 2], [2, 3, 1, 3], [1, 4, 2, 5]])
def test_fixed_policy_global_batch_is_independent_of_membership(worlds: list[int]) -> None:
    policy = BatchPolicy(global_batch_size=12, micro_batch_size=2)
    for step, world in enumerate(worlds):
        pos = start_position(policy, step, carried_position=-1)
        plans = [plan_step(policy, step, pos, r, world, num_samples=40, seed=0) for r in range(world)]
        union = [i for p in plans for i in p.local_indices]
        assert tuple(union) == plans[0].global_indices
        reference = plan_step(policy, step, pos, 0, 1, num_samples=40, seed=0)
        assert plans[0].global_indices == reference.global_indices
        for p in plans:
            assert all(len(mb) <= 2 for mb in p.micro_batches)
            assert [i for mb in p.micro_batches for i in mb] == list(p.local_indices)
            assert p.lr_multiplier == 1.0


def test_every_sample_once_per_epoch_under_changing_membership() -> None:
    policy = BatchPolicy(global_batch_size=8, micro_batch_size=3)
    seen: list[int] = []
    for step, world in enumerate([2, 3, 3, 1, 2]):  # 5 steps x 8 = 40 = one epoch
        pos = start_position(policy, step, 0)
        for r in range(world):
            seen.extend(plan_step(policy, step, pos, r, world, num_samples=40, seed=9).local_indices)
    assert sorted(seen) == list(range(40))


def test_per_replica_policy_scales_batch_and_lr() -> None:
    lin = BatchPolicy(0, 2, mode="per_replica", per_replica_batch_size=4, lr_scaling="linear", base_replicas=2)
    sq = BatchPolicy(0, 2, mode="per_replica", per_replica_batch_size=4, lr_scaling="sqrt", base_replicas=2)
    assert lin.batch_size(3) == 12
    assert lin.lr_multiplier(4) == 2.0
    assert math.isclose(sq.lr_multiplier(4), math.sqrt(2))
    plan = plan_step(lin, step=5, position=100, rank=1, world=3, num_samples=64, seed=0)
    assert plan.position == 100 and plan.next_position == 112
    assert start_position(lin, 5, 100) == 100  # carried cursor, not step * B


def test_batch_policy_errors_name_the_field() -> None:
    with pytest.raises(RecipeError, match="lr_scaling"):
        BatchPolicy(8, 2, lr_scaling="linear")  # fixed batch keeps the LR
    with pytest.raises(RecipeError, match="per_replica_batch_size"):
        BatchPolicy(0, 2, mode="per_replica")
    with pytest.raises(RecipeError, match="micro_batch_size"):
        BatchPolicy(8, 0)


# -- config --------------------------------------------------------------------------------------
def test_parse_replicas() -> None:
    assert parse_replicas("2:8") == (2, 8)
    assert parse_replicas("3") == (3, 3)
    for bad in ("0:2", "3:2", "a:b", "1:2:3"):
        with pytest.raises(RecipeError, match="--replicas"):
            parse_replicas(bad)


def test_resilience_config_validates_and_suggests() -> None:
    with pytest.raises(RecipeError, match=r"resilience\.hot_spare: unknown option — did you mean 'hot_spares'\?"):
        ResilienceConfig.from_dict({"hot_spare": 1})
    with pytest.raises(RecipeError, match=r"resilience\.max_replicas"):
        ResilienceConfig.from_dict({"min_replicas": 3, "max_replicas": 2})
    with pytest.raises(RecipeError, match=r"resilience\.batch_policy"):
        ResilienceConfig.from_dict({"batch_policy": "elastic"})
    cfg = ResilienceConfig.from_dict({"min_replicas": 2, "max_replicas": 4})
    assert cfg.initial_replicas == 4


def test_job_spec_round_trips(tmp_path) -> None:
    spec = JobSpec(
        task="tuneforge.distributed.toy:make_task",
        task_config={"num_samples": 10},
        steps=3,
        global_batch_size=4,
        micro_batch_size=2,
        resilience=ResilienceConfig(min_replicas=1, max_replicas=2, fault_plan="kill:1@2"),
    )
    spec.save(tmp_path / "job.json")
    again = JobSpec.load(tmp_path / "job.json")
    assert again == spec
    with pytest.raises(RecipeError, match="max_replicas: 5 replicas cannot share a global batch of 4"):
        JobSpec(task="m:f", task_config={}, steps=1, global_batch_size=4, micro_batch_size=1,
                resilience=ResilienceConfig(max_replicas=5))  # fmt: skip
    with pytest.raises(RecipeError, match="task_config"):
        JobSpec(task="m:f", task_config={"x": object()}, steps=1, global_batch_size=1, micro_batch_size=1)


# -- fault plans ---------------------------------------------------------------------------------
def test_compact_fault_plan() -> None:
    plan = FaultPlan.parse("kill:1@10, hang:0@25s, kill:*@40.5s")
    assert [f.describe() for f in plan.faults] == ["kill:1@step 10", "hang:0@25s", "kill:*@40.5s"]
    assert plan.step_faults(1) == {10: plan.faults[0]}
    assert [f.time_s for f in plan.timed_faults()] == [25.0, 40.5]


def test_json_yaml_and_file_plans(tmp_path) -> None:
    data = {"faults": [{"action": "hang", "replica": 2, "step": 3}]}
    assert FaultPlan.parse(json.dumps(data)).faults[0].action == "hang"
    path = tmp_path / "plan.yaml"
    path.write_text("faults:\n  - {action: kill, replica: 0, step: 4}\n")
    assert FaultPlan.parse(str(path)).step_faults(0)[4].action == "kill"


def test_random_plans_are_seeded() -> None:
    spec = {"random": {"mean_interval_s": 60, "count": 4, "seed": 7}}
    a, b = FaultPlan.parse(spec), FaultPlan.parse(spec)
    assert [f.time_s for f in a.faults] == [f.time_s for f in b.faults]
    times = [f.time_s for f in a.faults]
    assert times == sorted(times) and len(set(times)) == 4
    other = FaultPlan.parse({"random": {"mean_interval_s": 60, "count": 4, "seed": 8}})
    assert [f.time_s for f in other.faults] != times
    steps = FaultPlan.parse({"random": {"interval_steps": [5, 10], "count": 3, "replicas": [0, 1], "seed": 1}})
    gaps = [b.step - a.step for a, b in zip(steps.faults, steps.faults[1:])]
    assert all(5 <= g <= 10 for g in gaps) and all(f.replica in (0, 1) for f in steps.faults)


@pytest.mark.parametrize(
    "bad, match",
    [
        ("explode:1@3", "action"),
        ("kill:1", "ACTION:REPLICA@STEP"),
        ({"faults": [{"action": "kill", "step": 3}]}, "replica"),
        ({"faults": [{"action": "kill", "replica": 0}]}, "exactly one"),
        ({"random": {"count": 2}}, "mean_interval_s"),
        ({"oops": []}, "unknown key"),
    ],
)
def test_bad_fault_plans(bad: object, match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        FaultPlan.parse(bad)


def test_faults_fire_once(tmp_path) -> None:
    fault = FaultPlan.parse("kill:0@1").faults[0]
    assert claim(tmp_path, fault) is True
    assert claim(tmp_path, fault) is False


# -- metrics ---------------------------------------------------------------------------------------
def _attempt(log: EventLog, step: int, t0: float, dur: float, committed: bool = True, q: float = 0.01) -> None:
    log.log("attempt", t=t0 + dur, step=step, committed=committed, world=2, rank=0,
            t_start=t0, t_quorum=t0 + q, t_end=t0 + dur)  # fmt: skip


def test_analyze_recovery_event(tmp_path) -> None:
    a = EventLog(tmp_path / "events" / "replica_0_0.jsonl", replica=0, inc=0)
    b = EventLog(tmp_path / "events" / "replica_1_0.jsonl", replica=1, inc=0)
    b2 = EventLog(tmp_path / "events" / "replica_1_1.jsonl", replica=1, inc=1)
    t = 1000.0
    for s in range(5):  # steps 0..4, 1 s each, both replicas
        _attempt(a, s, t + s, 1.0)
        _attempt(b, s, t + s, 1.0)
    b.log("fault", t=t + 5.5, desc="kill:1@step 5", action="kill", target=1, target_inc=0)
    _attempt(a, 5, t + 5, 0.6, committed=False)  # survivor's step fails at 5.6
    _attempt(a, 5, t + 5.6, 1.4, q=0.5)  # waits 0.5 s for the new quorum, commits at 7.0
    b2.log("healed", t=t + 9.0, step=7)
    _attempt(a, 6, t + 7.0, 2.5)
    _attempt(b2, 7, t + 8.5, 1.0, q=0.5)  # replacement commits at 9.5
    _attempt(a, 7, t + 9.5, 0.5)
    report = analyze(tmp_path, read_events(tmp_path))
    (ev,) = report.failures
    assert ev.replica == 1 and ev.steps_lost == 0 and ev.healed_from_peer and not ev.cold_restart
    assert ev.detection_s == pytest.approx(0.1)
    assert ev.survivor_resume_s == pytest.approx(1.5)
    assert ev.replacement_s == pytest.approx(4.0)
    assert ev.downtime_s == pytest.approx(1.5)  # step 5 committed again at 7.0
    assert report.steps_committed == 8 and report.final_step == 8 and report.recomputed_attempts == 1
    # useful: each step's last commit, compute plus quorum capped at the median (0.01 s): steps 0-4 1.0 s each,
    # step 5 (1.4 - 0.5) + 0.01, step 6 2.5, step 7 0.5 (replica 0's later commit); train time 1000 -> 1010
    assert report.goodput == pytest.approx((5 * 1.0 + (1.4 - 0.5 + 0.01) + 2.5 + 0.5) / 10.0)
    assert report.summary()["steps_lost"] == 0.0


def test_analyze_counts_steps_lost_after_cold_restart(tmp_path) -> None:
    a = EventLog(tmp_path / "events" / "replica_0_0.jsonl", replica=0, inc=0)
    a2 = EventLog(tmp_path / "events" / "replica_0_1.jsonl", replica=0, inc=1)
    for s in range(6):
        _attempt(a, s, 100.0 + s, 1.0)
    a.log("fault", t=106.5, desc="kill:0@step 6", action="kill", target=0, target_inc=0)
    a2.log("ckpt_loaded", t=110.0, step=4)
    _attempt(a2, 4, 110.0, 1.0)
    report = analyze(tmp_path, read_events(tmp_path))
    (ev,) = report.failures
    assert ev.steps_lost == 2 and ev.cold_restart  # steps 4 and 5 are recomputed
    assert ev.replacement_s == pytest.approx(4.5)
    assert ev.downtime_s is None  # never got past step 5 again in this log
