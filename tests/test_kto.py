"""KTO through the one training loop: held-out outcome, split invariance, both record shapes, errors, elastic == local.

The task is the DPO tests' pick-a-good-word preference, but *unpaired*: each pair's chosen answer is a desirable
example and its rejected answer an undesirable one, shuffled, so no example sees its counterpart. Held-out prompts are
word combinations never trained on; the outcome is measured with plain transformers (test_dpo's helpers): desirable
completions must gain log-probability over the base more than undesirable ones do.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tuneforge
from tuneforge.config import load_recipe
from tuneforge.errors import DataError, RecipeError

from conftest import base_recipe, preference_pairs, write_jsonl
from test_dpo import heldout_accuracy


def unpaired(pairs: list[dict], seed: int = 0) -> list[dict]:
    out = [
        {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
        for p in pairs
        for side in ("chosen", "rejected")
    ]
    random.Random(seed).shuffle(out)
    return out


def as_chat(example: dict) -> dict:
    return {
        "messages": [
            {"role": "user", "content": example["prompt"]},
            {"role": "assistant", "content": example["completion"]},
        ],
        "label": example["label"],
    }


def kto_recipe(model: Path, data: Path, out: Path, **kto: object) -> dict:
    recipe = base_recipe(model, data, out, max_steps=20, lr=1e-2, eval_every=10, global_batch_size=16)
    recipe["method"] = "kto"
    recipe["data"]["max_length"] = 48
    recipe["kto"] = {"beta": 0.5, **kto}
    return recipe


@pytest.fixture
def kto_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "kto.jsonl", unpaired(preference_pairs(240, seed=0)))


def test_kto_learns_heldout_desirability(
    tiny_model: Path, kto_file: Path, held_out_pairs: list[dict], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    result = tuneforge.train(kto_recipe(tiny_model, kto_file, tmp_path / "run"), progress=False)
    # Step 1: policy == reference, so every implied reward and the reference point are 0: the loss is w·σ(0) = 0.5.
    assert result.history[0]["loss"] == pytest.approx(0.5, abs=1e-5)
    assert result.history[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    ev = result.evals[-1]
    assert ev["val/rewards_chosen"] > ev["val/rewards_rejected"] and ev["val/margin"] > 0
    accuracy = heldout_accuracy(result, tiny_model, held_out_pairs)
    assert accuracy >= 0.8, f"held-out implicit-reward accuracy {accuracy:.2f} (chance is 0.5)"
    info = result.data["kto"]
    assert info["desirable"] + info["undesirable"] == info["examples"] == info["train"]


def test_kto_gradients_do_not_depend_on_the_micro_batch_split(tiny_model: Path, kto_file: Path, tmp_path: Path) -> None:
    """The reference point is the whole step's, so one micro-batch of 8 and eight of 1 give the same gradient."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.training.build import build_model, prepare

    # The reference (the recipe's base) is a perturbed copy and the policy the original, which is likelier on any
    # answer: mismatched answers gain log-probability over the reference, so z0 > 0 (not the clamp at 0).
    noisy_dir = tmp_path / "noisy"
    noisy = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    noisy.save_pretrained(noisy_dir)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(noisy_dir)
    recipe = load_recipe(kto_recipe(noisy_dir, kto_file, tmp_path / "run"))
    prepared = prepare(recipe)
    cpu = torch.device("cpu")
    model = build_model(recipe, cpu)
    model.load_state_dict(AutoModelForCausalLM.from_pretrained(tiny_model).state_dict())
    results = []
    for micro in (8, 1, 3):
        task = prepared.make_task(model, micro, "fp32", cpu)
        rows = task.rows_for_step(0)[:8]
        task.begin_step(model, 0, rows)
        out = task.forward_backward(model, rows, 1 / 8)
        results.append((float(out.loss_sum), float(task.z0[1]), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
    assert results[0][1] > 0  # a real reference point, not the clamp
    for loss, z0, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5) and z0 == pytest.approx(results[0][1], rel=1e-5)
        for a, b in zip(grads, results[0][2]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_kto_reads_chats_and_preference_pairs(tiny_model: Path, tmp_path: Path) -> None:
    """OpenAI-style chats with a per-record label, and preference pairs (each unpaired into two examples)."""
    from tuneforge.training.build import prepare

    pairs = preference_pairs(40, seed=3)
    chats = write_jsonl(tmp_path / "chats.jsonl", [as_chat(e) for e in unpaired(pairs)])
    paired = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    for path in (chats, paired):
        recipe = kto_recipe(tiny_model, path, tmp_path / "run")
        recipe["data"]["val_fraction"] = 0
        prepared = prepare(load_recipe(recipe))
        src = prepared.sources[0].train
        assert len(src) == 80 and int(src.labels.sum()) == 40  # 40 desirable, 40 undesirable
        decoded = {}
        for i in range(len(src)):  # the supervised tokens are exactly the answer (and its end of turn)
            _, completion, mask = src.split(i)
            text = prepared.tokenizer.decode(completion[mask > 0], skip_special_tokens=True).strip()
            decoded[text] = decoded.get(text, set()) | {bool(src.labels[i])}
        assert decoded == {**{p["rejected"]: {False} for p in pairs}, **{p["chosen"]: {True} for p in pairs}}


def test_kto_data_errors_name_the_line(tiny_model: Path, tmp_path: Path) -> None:
    from tuneforge.training.build import prepare

    records = unpaired(preference_pairs(20, seed=2))
    records[3] = {**records[3], "label": "yes"}
    records[7] = {"messages": [{"role": "user", "content": "hi"}], "label": True}
    data = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(DataError) as err:
        prepare(load_recipe(kto_recipe(tiny_model, data, tmp_path / "run")))
    text = str(err.value)
    assert "bad.jsonl:4: label: is a string (expected true (desirable) or false (undesirable))" in text
    assert "bad.jsonl:8: messages[0].role: conversation ends with 'user'" in text
    chat = write_jsonl(
        tmp_path / "plain.jsonl",
        [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
    )
    with pytest.raises(RecipeError, match="plain.jsonl holds messages records, but method kto trains on unpaired"):
        prepare(load_recipe(kto_recipe(tiny_model, chat, tmp_path / "run")))


def _weights(result: tuneforge.api.TrainResult) -> dict[str, torch.Tensor]:
    return load_file(str(result.output_dir / "model.safetensors"))


def _rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in a)
    return (num / sum(float(a[k].norm() ** 2) for k in a)) ** 0.5


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kto", "dpo"])
def test_pair_and_kto_methods_on_replicas_equal_one_process(
    method: str, tiny_model: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Two elastic replicas (one killed mid-run) end with the local run's weights and report the same metrics,
    with the same progress lines as a local run plus one for the failure."""
    pairs = preference_pairs(96, seed=0)
    data = write_jsonl(tmp_path / "d.jsonl", unpaired(pairs) if method == "kto" else pairs)
    recipe = kto_recipe(tiny_model, data, tmp_path / "single")
    recipe["train"].update(max_steps=6, eval_every=6, lr=2e-3, micro_batch_size=4)
    if method == "dpo":
        recipe["method"], recipe["dpo"] = "dpo", {"beta": 0.5}
        del recipe["kto"]
    single = tuneforge.train(recipe, progress=False)
    recipe["output"]["dir"] = str(tmp_path / "elastic")
    recipe["resilience"] = {"timeout_s": 20, "hang_timeout_s": 40, "checkpoint_every": 0}
    recipe["train"]["log_every"] = 2
    capfd.readouterr()
    elastic = tuneforge.train(recipe, replicas="2:2", fault_plan="kill:1@3", progress=True)
    shown = capfd.readouterr().err
    assert [line.split()[1] for line in shown.splitlines() if line.startswith("step ")] == ["2/6", "4/6", "6/6"]
    assert "fault: kill" in shown
    assert _rel_diff(_weights(single), _weights(elastic)) <= 1e-5
    assert elastic.extra["report"].steps_lost == 0
    local_keys = set(single.history[-1]) - {"step_s"}
    assert local_keys <= set(elastic.history[-1])  # every per-method metric, by the same name
    for key in local_keys - {"step", "tokens", "step_s"}:
        assert elastic.history[-1][key] == pytest.approx(single.history[-1][key], rel=1e-4, abs=1e-6), key
    val = {k for k in single.metrics if k.startswith("val_")}
    assert val and val <= set(elastic.metrics)
    for key in val:
        assert elastic.metrics[key] == pytest.approx(single.metrics[key], rel=1e-4, abs=1e-6), key
