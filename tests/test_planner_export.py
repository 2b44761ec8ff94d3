"""The planner's automatic micro-batch for preference pairs, and merging reward-model adapters into plain models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import tuneforge
from tuneforge.config import load_recipe
from tuneforge.errors import ModelError
from tuneforge.planner import MICRO_TOKENS, resolve_micro_batch, sequences_per_sample

from conftest import base_recipe, preference_pairs, write_jsonl

# --- planner ---------------------------------------------------------------------------------------------


def _load(tmp_path: Path, method: str, max_length: int = 256, global_batch: int = 8, **sections: dict):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    raw = base_recipe(
        tmp_path / "model", data, tmp_path / "out", global_batch_size=global_batch, micro_batch_size="auto"
    )
    raw["method"] = method
    raw["data"]["max_length"] = max_length
    raw.update(sections)
    return load_recipe(raw)


def _recipe(tmp_path: Path, method: str, max_length: int, global_batch: int, data_parallel: int = 1):
    return resolve_micro_batch(_load(tmp_path, method, max_length, global_batch), torch.device("cpu"), data_parallel)


def _spp(tmp_path: Path, method: str, **sections: dict) -> int:
    return sequences_per_sample(_load(tmp_path, method, **sections))


def test_auto_micro_batch_counts_a_pair_as_two_sequences(tmp_path: Path) -> None:
    budget = MICRO_TOKENS["cpu"]
    # 8192 tokens / 256: 32 SFT examples, but 16 pairs of two 256-token sequences.
    assert _recipe(tmp_path, "sft", 256, 64) == budget // 256 == 32
    assert _recipe(tmp_path, "dpo", 256, 64) == budget // 512 == 16
    assert _recipe(tmp_path, "reward", 256, 64) == 16
    assert _spp(tmp_path, "dpo") == _spp(tmp_path, "reward") == 2
    assert _spp(tmp_path, "sft") == _spp(tmp_path, "cpt") == _spp(tmp_path, "kto") == 1
    assert _spp(tmp_path, "ppo", ppo={"reward_model": "rm"}) == 1
    assert _spp(tmp_path, "grpo", grpo={"graders": "g.json", "group_size": 8}) == 8


@pytest.mark.parametrize(
    ("method", "max_length", "global_batch", "replicas", "expected"),
    [
        ("sft", 1024, 30, 1, 6),  # budget 8 -> steps down to 6, which divides 30
        ("dpo", 1024, 30, 1, 3),  # budget 4 -> 3 divides 30
        ("reward", 1024, 20, 1, 4),
        ("dpo", 1024, 28, 2, 2),  # per replica 14: budget 4 -> 2
        ("dpo", 8192, 16, 1, 1),  # one pair overflows the budget: still one pair per micro-batch
        ("dpo", 128, 8, 1, 8),  # never more than the per-replica batch
    ],
)
def test_auto_micro_batch_divides_the_per_replica_batch(
    tmp_path: Path, method: str, max_length: int, global_batch: int, replicas: int, expected: int
) -> None:
    m = _recipe(tmp_path, method, max_length, global_batch, replicas)
    assert m == expected
    assert (global_batch // replicas) % m == 0
    assert m * max_length * _spp(tmp_path, method) <= MICRO_TOKENS["cpu"] or m == 1


# --- merging reward-model adapters -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_reward_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny LoRA reward model, trained with ``output.merge`` (refused for reward adapters before)."""
    tmp = tmp_path_factory.mktemp("reward")
    data = write_jsonl(tmp / "pairs.jsonl", preference_pairs(96, seed=0))
    recipe = base_recipe(tiny_model, data, tmp / "run", max_steps=6, lr=2e-2)
    recipe["method"] = "reward"
    recipe["data"]["max_length"] = 48
    recipe["adapter"] = {"kind": "lora", "r": 4, "alpha": 8}
    recipe["output"]["merge"] = True
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEFORGE_HOME", str(tmp / "home"))
        return tuneforge.train(recipe, progress=False)


def _conversations() -> list[list[dict]]:
    # different lengths, so batched scoring pads and the merged model must find each row's last token itself
    return [
        [{"role": "user", "content": p["prompt"] + " please" * (i % 3)}, {"role": "assistant", "content": p[side]}]
        for i, p in enumerate(preference_pairs(12, seed=0))
        for side in ("chosen", "rejected")
    ]


def test_merged_reward_model_scores_as_the_adapter(lora_reward_run, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tuneforge.cli import main
    from tuneforge.models.reward import load_reward_model, score_conversations

    adapter = lora_reward_run.output_dir
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    peft_model, tokenizer = load_reward_model(adapter)
    expected = score_conversations(peft_model, tokenizer, _conversations(), batch_size=8)
    assert expected.std() > 0

    assert main(["export", str(lora_reward_run.run_dir), "--out", str(tmp_path / "exported"), "--merge"]) == 0
    saved_head = next(v for k, v in load_file(str(adapter / "adapter_model.safetensors")).items() if "score" in k)
    for merged_dir in (tmp_path / "exported", lora_reward_run.merged_dir):
        assert not (merged_dir / "adapter_config.json").exists()
        config = json.loads((merged_dir / "config.json").read_text())
        assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] is not None
        merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
        torch.testing.assert_close(merged.score.weight, saved_head)  # the trained head, not a fresh one
        got = score_conversations(merged, AutoTokenizer.from_pretrained(merged_dir), _conversations(), batch_size=8)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_merge_refuses_a_classifier_adapter_without_its_head(lora_reward_run, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from tuneforge.models.export import merge_adapter

    headless = tmp_path / "headless"
    shutil.copytree(lora_reward_run.output_dir, headless)
    weights = headless / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if "score" not in k}, str(weights))
    with pytest.raises(ModelError, match="without its 'score' head"):
        merge_adapter(headless, tmp_path / "out")
    with pytest.raises(ModelError, match="not a PEFT adapter directory"):
        merge_adapter(lora_reward_run.merged_dir, tmp_path / "out2")


def test_merge_names_an_unsupported_task_type(lora_reward_run, tmp_path: Path) -> None:
    from tuneforge.models.export import merge_adapter

    odd = tmp_path / "odd"
    shutil.copytree(lora_reward_run.output_dir, odd)
    config = json.loads((odd / "adapter_config.json").read_text())
    (odd / "adapter_config.json").write_text(json.dumps({**config, "task_type": "TOKEN_CLS"}))
    with pytest.raises(ModelError, match="task_type 'TOKEN_CLS' cannot be merged"):
        merge_adapter(odd, tmp_path / "out")
