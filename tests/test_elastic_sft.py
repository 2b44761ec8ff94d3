"""SFT on elastic torchft replicas equals the single-process run — with and without a killed replica."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tuneforge

from conftest import base_recipe, reverse_task, write_jsonl

pytestmark = pytest.mark.slow


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in a)
    den = sum(float(a[k].norm() ** 2) for k in a)
    return (num / den) ** 0.5


@pytest.fixture
def recipe(tiny_model: Path, tmp_path: Path) -> dict:
    data = write_jsonl(tmp_path / "reverse.jsonl", reverse_task(160))
    r = base_recipe(tiny_model, data, tmp_path / "single", max_steps=10, eval_every=1000, lr=2e-3)
    r["data"]["val_fraction"] = 0
    return r


def test_two_replicas_with_a_kill_match_one_process(recipe: dict, tmp_path: Path) -> None:
    single = tuneforge.train(recipe, progress=False)
    reference = _weights(single.output_dir)

    recipe["output"]["dir"] = str(tmp_path / "elastic")
    recipe["resilience"] = {"timeout_s": 20, "hang_timeout_s": 40, "checkpoint_every": 0}
    elastic = tuneforge.train(recipe, replicas="2:2", fault_plan="kill:1@4", progress=False)
    assert elastic.output_dir.is_dir()
    assert _rel_diff(reference, _weights(elastic.output_dir)) <= 1e-5
    report = elastic.extra["report"]
    assert report.steps_lost == 0 and len(report.failures) == 1
    assert report.failures[0].healed_from_peer and not report.failures[0].cold_restart
    assert [h["step"] for h in elastic.history][-1] == 10
    assert elastic.history[-1]["loss"] == pytest.approx(single.history[-1]["loss"], rel=1e-4)

    # every run checks the planner: forecast vs measured, the same shape as the local run's
    local = json.loads((single.run_dir / "result.json").read_text())["planner"]
    planner = json.loads((elastic.run_dir / "result.json").read_text())["planner"]
    assert planner.keys() == local.keys() and planner["errors"].keys() == local["errors"].keys()
    assert planner["measured"].keys() == local["measured"].keys()
    assert planner["measured"]["memory_kind"] == local["measured"]["memory_kind"]
    for key, error in (("peak_mb", "peak_memory"), ("step_s", "step_time"), ("wall_s", "wall_time")):
        assert planner["measured"][key] > 0 and planner["errors"][error] is not None
    assert planner["forecast"]["step_s"] > 0 and planner["forecast"]["process_peak_mb"] > 0
    # each step logs the largest replica's peak so far; the run's peak is the largest of those
    assert planner["measured"]["peak_mb"] == max(h["peak_mb"] for h in elastic.history)
