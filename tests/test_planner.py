"""The planner: every ``auto`` resolved with its reason, the memory fit, refusing what cannot fit, the forecast in
``result.json``, calibration, and ``tuneforge plan``."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import pytest
import yaml

import tuneforge
from tuneforge.cli import main
from tuneforge.config import load_recipe
from tuneforge.data.sampler import auto_epochs
from tuneforge.errors import RecipeError
from tuneforge.planning.forecast import DoesNotFit, make_forecast
from tuneforge.planning.hardware import GB, parse_hardware, parse_size
from tuneforge.planning.resolve import ALLOCATOR_OVERHEAD, MICRO_TOKENS, SAFETY, resolve
from tuneforge.planning.workload import memory, policy_shape
from tuneforge.training.build import prepare

from conftest import base_recipe, preference_pairs, reverse_task, write_jsonl


@pytest.fixture
def sft(tiny_model: Path, tmp_path: Path) -> dict:
    data = write_jsonl(tmp_path / "d.jsonl", reverse_task(120))
    raw = base_recipe(tiny_model, data, tmp_path / "out", max_steps=4, micro_batch_size="auto", global_batch_size=16)
    raw["data"]["max_length"] = 256
    return raw


def _resolved(raw: dict, **train: object):
    raw = json.loads(json.dumps(raw))
    raw["train"].update(train)
    recipe = load_recipe(raw)
    prepared = prepare(recipe)
    return recipe, prepared, resolve(recipe, prepared.num_steps, prepared=prepared)


def test_every_auto_value_is_explained_with_its_numbers(sft: dict) -> None:
    recipe, prepared, res = _resolved(
        sft,
        lr="auto",
        gradient_checkpointing="auto",
        epochs="auto",
        max_steps=None,
        warmup_steps=None,
        num_threads=None,
        precision="auto",
    )
    why = res.explain
    assert f"micro-batch {res.micro_batch_size}:" in why["micro_batch_size"]
    assert f"{res.micro_batch_size} × 256 tokens" in why["micro_batch_size"]
    assert why["gradient_checkpointing"] == "grad-ckpt off: fits without" and res.gradient_checkpointing is False
    assert why["lr"].startswith(f"lr {res.lr:.3g}:") and f"(2000/{policy_shape(recipe).hidden})" in why["lr"]
    n_train = prepared.data_info["d"]["train"]
    assert why["epochs"].startswith(f"epochs {auto_epochs(n_train)}: {n_train} training examples")
    assert res.epochs == auto_epochs(n_train)
    assert why["warmup_steps"] == f"warmup {res.warmup_steps}: 3% of {res.total_steps} steps"
    assert why["eval_every"] == f"eval every {res.eval_every}: 10 evaluations over {res.total_steps} steps"
    assert why["num_threads"].startswith(f"threads {res.num_threads}:") and why["precision"].startswith("precision ")
    # the plan is what the run trains with: the applied recipe has no auto left where the model reads it
    applied = res.apply(recipe)
    assert applied.train.lr == res.lr and applied.train.gradient_checkpointing is False


def test_auto_lr_follows_adapter_method_and_batch(tiny_model: Path, tmp_path: Path) -> None:
    pairs = write_jsonl(tmp_path / "p.jsonl", preference_pairs(40, seed=0))

    def lr(method: str, adapter: str, batch: int = 16) -> float:
        raw = base_recipe(tiny_model, pairs, tmp_path / "o", lr="auto", global_batch_size=batch)
        raw["method"], raw["adapter"] = method, {"kind": adapter}
        recipe = load_recipe(raw)
        return resolve(recipe, 10).lr

    assert lr("sft", "lora") == pytest.approx(10 * lr("sft", "full"))  # LoRA: 10× full fine-tuning
    assert lr("dpo", "lora") == pytest.approx(0.1 * lr("sft", "lora"))  # preference methods: 10× lower
    assert lr("sft", "full", 64) == pytest.approx(2 * lr("sft", "full", 16))  # √ batch scaling
    assert lr("sft", "prompt_tuning") == 3e-2


def test_auto_micro_batch_shrinks_to_the_memory_limit_and_checkpoints_only_when_needed(sft: dict) -> None:
    recipe, prepared, free = _resolved(sft, gradient_checkpointing="auto")
    shape = policy_shape(recipe)
    assert free.micro_batch_size == min(16, MICRO_TOKENS["cpu"] // 256)

    def need(m: int, ckpt: bool) -> float:
        mem = memory(
            recipe,
            shape,
            micro=m,
            grad_accumulation=16 // m,
            gradient_checkpointing=ckpt,
            precision=free.precision,  # bf16 on a CPU with AMX: activations take half the bytes
            prepared=prepared,
        )
        return mem.peak * ALLOCATOR_OVERHEAD["cpu"] / (1 - SAFETY)

    # a limit between what micro-batches of 4 and 8 need: 4 is the largest divisor of 16 that fits
    limit = int((need(4, False) + need(8, False)) / 2)
    _, _, res = _resolved(sft, gradient_checkpointing="auto", memory_limit=str(limit))
    assert res.micro_batch_size == 4 and res.grad_accumulation == 4 and not res.gradient_checkpointing
    assert "stays 10% under" in res.explain["micro_batch_size"]
    # below what one sample needs without checkpointing, but above what it needs with it: checkpointing turns on
    limit = int((need(1, False) + need(1, True)) / 2)
    assert need(1, True) < limit < need(1, False)
    _, _, res = _resolved(sft, gradient_checkpointing="auto", memory_limit=str(limit))
    assert res.micro_batch_size == 1 and res.gradient_checkpointing
    assert res.explain["gradient_checkpointing"].startswith("grad-ckpt on: without it one micro-batch needs")


@pytest.mark.slow
def test_a_run_that_does_not_fit_is_refused_with_the_numbers(sft: dict, tmp_path: Path, capsys) -> None:
    with pytest.raises(DoesNotFit, match=r"forecast to need \d+ MB at its peak but 1 MB are available") as e:
        tuneforge.train(sft, progress=False, train__memory_limit="1MB")
    assert "weights" in str(e.value) and "--force" in str(e.value)
    assert not (tmp_path / "out").exists()  # refused before the run directory or the model
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(sft))
    assert main(["train", str(recipe), "--quiet", "--set", "train.memory_limit=1MB"]) == DoesNotFit.exit_code
    assert "forecast to need" in capsys.readouterr().err
    # --force trains anyway, and the record says how far off the forecast was
    assert main(["train", str(recipe), "--quiet", "--force", "--set", "train.memory_limit=1MB"]) == 0
    planner = json.loads((tmp_path / "out" / "result.json").read_text())["planner"]
    assert planner["forecast"]["memory_limit_mb"] == 1.0 and planner["errors"]["peak_memory"] is not None


@pytest.mark.slow
def test_forecast_and_measurement_land_in_result_json(sft: dict) -> None:
    result = tuneforge.train(sft, progress=False)
    planner = json.loads((result.run_dir / "result.json").read_text())["planner"]
    f, m = planner["forecast"], planner["measured"]
    assert f["memory"]["peak_mb"] > f["memory"]["weights_mb"] > 0
    assert f["tokens_per_step"] == 16 * 256 and f["step_s"] > 0 and f["wall_s"] >= 4 * f["step_s"]
    assert m["memory_kind"] == "process" and m["peak_mb"] > 0 and m["step_s"] > 0 and m["wall_s"] > 0
    assert m["step_s"] == pytest.approx(statistics.median(float(r["step_s"]) for r in result.history[1:]))
    assert planner["errors"]["step_time"] == pytest.approx((f["step_s"] - m["step_s"]) / m["step_s"], abs=1e-3)
    assert planner["errors"]["peak_memory"] == pytest.approx(
        (f["process_peak_mb"] - m["peak_mb"]) / m["peak_mb"], abs=1e-3
    )


@pytest.mark.slow
def test_a_finished_run_calibrates_the_next_forecast(sft: dict) -> None:
    recipe, prepared, res = _resolved(sft)
    from tuneforge.planning.hardware import local_hardware

    before = make_forecast(res.apply(recipe), res, local_hardware(), prepared)
    assert before.time_source.startswith("flop model")
    first = tuneforge.train(sft, progress=False)
    measured = json.loads((first.run_dir / "result.json").read_text())["planner"]["measured"]["step_s"]
    after = make_forecast(res.apply(recipe), res, local_hardware(), prepared)
    assert after.time_source == "calibrated (1)"
    assert after.step_s == pytest.approx(measured, rel=1e-6)  # same shape: the rate it measured, replayed


@pytest.mark.slow
def test_calibration_measures_the_fixed_costs_and_the_forecast_charges_them_per_pass(sft: dict) -> None:
    from tuneforge.planning.calibrate import calibrate
    from tuneforge.planning.hardware import local_hardware

    recipe, prepared, res = _resolved(sft, micro_batch_size=4, num_threads=1, precision="fp32")
    measured = calibrate(recipe, res, prepared, steps=3)
    assert measured.optimizer_s > 0 and measured.trainable > 0 and measured.pass_s >= 0
    hw = local_hardware()
    forecasts = {}
    for micro in (4, 2, 1):  # the same samples in 4, 8 and 16 micro-batches: the same FLOPs, more passes
        r = dataclasses.replace(res, micro_batch_size=micro, grad_accumulation=16 // micro)
        forecasts[micro] = make_forecast(res.apply(recipe), r, hw, prepared)
    assert {f.time_source for f in forecasts.values()} == {"calibrated (1)"}
    assert len({f.step_flops for f in forecasts.values()}) == 1
    # each extra pass costs the measured fixed cost; the rest of the step does not change
    assert forecasts[2].step_s - forecasts[4].step_s == pytest.approx(4 * measured.pass_s, abs=1e-9)
    assert forecasts[1].step_s - forecasts[4].step_s == pytest.approx(12 * measured.pass_s, abs=1e-9)
    # the calibration replays its own steps: FLOP rate plus fixed costs give back the measured median
    assert forecasts[4].step_s == pytest.approx(measured.median_step_s, rel=1e-6)


@pytest.mark.slow
def test_memory_forecast_tracks_the_profiler(sft: dict) -> None:
    from tuneforge.planning.calibrate import run_steps

    for ckpt in (False, True):
        # fp32, as the planner_accuracy grid: under bf16 autocast (auto on a CPU with AMX) the model does not yet
        # count autocast's bf16 copies of the frozen weights and inputs
        recipe, prepared, res = _resolved(sft, micro_batch_size=8, gradient_checkpointing=ckpt, precision="fp32")
        forecast = make_forecast(res.apply(recipe), res, parse_hardware(None), prepared)
        measured = run_steps(recipe, res, prepared, steps=2, profile_memory=True)
        assert measured.memory_kind == "tensors"
        assert forecast.memory["peak_mb"] == pytest.approx(measured.peak_bytes / 2**20, rel=0.25), ckpt


def test_hardware_specs_and_sizes() -> None:
    h = parse_hardware("cuda:80GBx8")
    assert (h.kind, h.memory_bytes, h.replicas, h.local) == ("cuda", 80 * GB, 8, False)
    assert parse_hardware("cpu:16GB").memory_bytes == 16 * GB and not parse_hardware("cpu:16GB").local
    assert parse_size("512MB") == 512 * 2**20 and parse_size("1.5G") == int(1.5 * GB)
    with pytest.raises(RecipeError, match="expected cpu, cuda or mps"):
        parse_hardware("tpu:16GB")
    with pytest.raises(RecipeError, match="is not a size"):
        parse_size("lots")


def test_auto_epochs_follow_openais_rule() -> None:
    for n in (1, 10, 33, 34, 100, 8000, 8334, 20000, 10**6):
        e = auto_epochs(n)
        assert 1 <= e <= 25
        if n * 3 < 100:
            assert e == min(25, 100 // n) and (n * e >= 100 or e == 25 or n * (e + 1) > 100)
        elif n * 3 > 25_000:
            assert e == max(1, 25_000 // n)
        else:
            assert e == 3


def test_plan_cli_prints_reasons_and_a_forecast(sft: dict, tmp_path: Path, capsys) -> None:
    sft["train"] |= {"lr": "auto", "precision": "auto"}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(sft))
    assert main(["plan", str(recipe)]) == 0
    text = capsys.readouterr().out
    assert "auto values:" in text and "micro-batch" in text and "lr " in text and "fits" in text
    assert main(["plan", str(recipe), "--json", "--hardware", "cuda:80GBx2"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["forecast"]["replicas"] == 2 and plan["resolved"]["data_parallel"] == 2
    assert plan["resolved"]["precision"] == "bf16" and plan["forecast"]["time_source"].startswith("flop model")
    assert plan["forecast"]["memory_limit_mb"] == 80 * 1024
    assert main(["plan", str(recipe), "--set", "train.memory_limit=1MB"]) == 1  # does not fit: non-zero
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["plan", str(recipe), "--hardware", "tpu"]) != 0
    assert "expected cpu, cuda or mps" in capsys.readouterr().err


def test_auto_checkpoint_cadence_is_youngs_interval_in_steps(sft: dict) -> None:
    from tuneforge.planning.cadence import Disk, auto_checkpoint_every, checkpoint_bytes

    disk = Disk(bandwidth=100 * 2**20, latency=0.01, source="measured")
    every, line = auto_checkpoint_every(trainable=10**6, step_s=0.5, mtbf_hours=24, total_steps=10**6, disk=disk)
    write_s = 0.01 + checkpoint_bytes(10**6) / disk.bandwidth  # 12 MB: the weights and AdamW's two moments
    assert checkpoint_bytes(10**6) == 12 * 10**6
    assert every == round((2 * write_s * 24 * 3600) ** 0.5 / 0.5)
    assert line.startswith(f"checkpoint every {every}: Young's √(2 × {write_s:.2g} s write × 24 h MTBF)")
    # √ law: four times the MTBF, twice the interval; a slower disk, a longer one
    four, _ = auto_checkpoint_every(trainable=10**6, step_s=0.5, mtbf_hours=96, total_steps=10**6, disk=disk)
    assert four == pytest.approx(2 * every, abs=1)
    slow, _ = auto_checkpoint_every(
        trainable=10**6, step_s=0.5, mtbf_hours=24, total_steps=10**6, disk=dataclasses.replace(disk, bandwidth=2**20)
    )
    assert slow > 3 * every
    short, why = auto_checkpoint_every(trainable=10**6, step_s=0.5, mtbf_hours=24, total_steps=10, disk=disk)
    assert short > 10 and why.endswith("the 10-step run is shorter, so it saves none")

    # in the plan: measured disk, forecast step time, one line; the run trains with the number
    recipe, prepared, res = _resolved(sft, checkpoint_every="auto", mtbf_hours=1e-5)
    assert isinstance(res.checkpoint_every, int) and res.checkpoint_every >= 1
    assert res.explain["checkpoint_every"].startswith(f"checkpoint every {res.checkpoint_every}: Young's")
    assert "h MTBF" in res.explain["checkpoint_every"] and "measured" in res.explain["checkpoint_every"]
    assert res.apply(recipe).train.checkpoint_every == res.checkpoint_every
    shorter, longer = (_resolved(sft, checkpoint_every="auto", mtbf_hours=h)[2].checkpoint_every for h in (1e-2, 1))
    assert longer == pytest.approx(10 * shorter, rel=0.1)  # √100
    named = resolve(recipe, prepared.num_steps, hardware=parse_hardware("cuda:80GB"), prepared=prepared)
    assert "assumed" in named.explain["checkpoint_every"]  # no disk to measure on hardware we don't have


def test_auto_checkpoints_are_written_by_the_run(sft: dict, tmp_path: Path) -> None:
    sft["train"].update(max_steps=4, checkpoint_every="auto", mtbf_hours=1e-9, keep_checkpoints=5)
    result = tuneforge.train(sft, progress=False)
    saved = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir())
    assert saved == ["step-0000001", "step-0000002", "step-0000003"]  # every step (a failure a few µs), not the last
    assert yaml.safe_load((result.run_dir / "recipe.yaml").read_text())["train"]["checkpoint_every"] == 1


def test_auto_checkpoints_of_online_methods_round_to_the_updates_per_batch(tiny_model: Path, tmp_path: Path) -> None:
    from tuneforge.planning.cadence import Disk, auto_checkpoint_every

    disk = Disk(bandwidth=100 * 2**20, latency=0.01, source="measured")
    for mtbf in (1e-9, 0.01, 1.0):
        every, line = auto_checkpoint_every(
            trainable=10**5, step_s=0.1, mtbf_hours=mtbf, total_steps=10**6, disk=disk, multiple=3
        )
        assert every % 3 == 0 and every >= 3 and "a multiple of the 3 updates per batch of rollouts" in line
    data = write_jsonl(
        tmp_path / "prompts.jsonl", [{"messages": r["messages"][:1], "keyword": "apple"} for r in reverse_task(40)]
    )
    raw = base_recipe(tiny_model, data, tmp_path / "run", max_steps=12, checkpoint_every="auto", mtbf_hours=1e-6)
    raw["method"] = "grpo"
    raw["generation"] = {"max_new_tokens": 8}
    grader = {"type": "string_check", "name": "k", "operation": "like", "input": "{{sample.output_text}}"}
    raw["grpo"] = {"graders": {**grader, "reference": "{{item.keyword}}"}, "group_size": 4, "num_iterations": 3}
    recipe = load_recipe(raw)
    prepared = prepare(recipe)  # the online check lets auto through: the planner rounds it
    res = resolve(recipe, prepared.num_steps, prepared=prepared)
    assert res.checkpoint_every % 3 == 0 and "updates per batch of rollouts" in res.explain["checkpoint_every"]
    prepare(res.apply(recipe))  # and the concrete value passes the multiple-of-num_iterations check
