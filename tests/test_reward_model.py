"""Bradley–Terry reward models through the one training loop: held-out ranking, saving and loading, resume.

Same learnable preference as ``test_dpo``: the chosen answer picks a word from the "good" half of the vocabulary,
the rejected one from the "bad" half; held-out prompts are word combinations never trained on. The held-out
ranking is measured on the *saved* model, loaded back with plain transformers / PEFT.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tuneforge
from tuneforge.errors import RecipeError

from conftest import base_recipe


def reward_recipe(model: Path, data: Path, out: Path, **train: object) -> dict:
    recipe = base_recipe(model, data, out, **{"max_steps": 16, "lr": 1e-2, "eval_every": 8, **train})
    recipe["method"] = "reward"
    recipe["data"]["max_length"] = 48
    return recipe


def conversations(pairs: list[dict], side: str) -> list[list[dict]]:
    return [[{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p[side]}] for p in pairs]


def ranking_accuracy(model: torch.nn.Module, tokenizer: object, pairs: list[dict]) -> float:
    from tuneforge.models.reward import score_conversations

    chosen = score_conversations(model, tokenizer, conversations(pairs, "chosen"))
    rejected = score_conversations(model, tokenizer, conversations(pairs, "rejected"))
    return float((chosen > rejected).float().mean())


def test_reward_model_ranks_heldout_pairs(
    tiny_model: Path, pairs_file: Path, held_out_pairs: list[dict], tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result = tuneforge.train(reward_recipe(tiny_model, pairs_file, tmp_path / "run"), progress=False)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.evals[-1]["val/accuracy"] >= 0.9 and result.evals[-1]["val/margin"] > 0
    # a standard transformers sequence-classification model with one output
    config = json.loads((result.output_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    model = AutoModelForSequenceClassification.from_pretrained(result.output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.output_dir)
    accuracy = ranking_accuracy(model, tokenizer, held_out_pairs)
    assert accuracy >= 0.85, f"held-out pairwise accuracy {accuracy:.2f} (chance is 0.5)"
    # an untrained head on the same base does not rank them
    torch.manual_seed(0)
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).eval()
    assert ranking_accuracy(fresh, tokenizer, held_out_pairs) < accuracy


def test_training_rewards_match_transformers_pooling(tiny_model: Path, pairs_file: Path, tmp_path: Path) -> None:
    """The rewards trained on (prompt shared, head read at each answer's end) are what plain transformers scores."""
    from tuneforge.config import load_recipe
    from tuneforge.data.preference import collate_pairs
    from tuneforge.models.reward import score_conversations
    from tuneforge.training.build import build_model, prepare
    from tuneforge.training.reward import sequence_rewards

    recipe = load_recipe(reward_recipe(tiny_model, pairs_file, tmp_path / "run"))
    prepared = prepare(recipe)
    model = build_model(recipe, torch.device("cpu")).eval()
    task = prepared.make_task(model, 4, "fp32", torch.device("cpu"))
    assert task.spec.share_prompt
    with torch.no_grad():
        ours = sequence_rewards(
            model, collate_pairs([(0, 0), (0, 1)], task.sources, prepared.tokenizer.pad_token_id, share_prompt=True)
        )
    # the same four conversations (chosen 0, chosen 1, rejected 0, rejected 1), found by their rendered text
    texts = [prepared.tokenizer.decode(task.sources[0].seqs.example(k)[0]) for k in (0, 2, 1, 3)]
    by_text = {}
    for p in (json.loads(line) for line in pairs_file.read_text().splitlines()):
        for side in ("chosen", "rejected"):
            conv = conversations([p], side)[0]
            by_text[prepared.tokenizer.apply_chat_template(conv, tokenize=False)] = conv
    theirs = score_conversations(model, prepared.tokenizer, [by_text[t] for t in texts])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_lora_reward_model_saves_its_head_and_loads(
    tiny_model: Path, pairs_file: Path, held_out_pairs: list[dict], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from tuneforge.models.reward import load_reward_model

    recipe = reward_recipe(tiny_model, pairs_file, tmp_path / "run", lr=2e-2)
    recipe["adapter"] = {"kind": "lora", "r": 8, "alpha": 16}
    result = tuneforge.train(recipe, progress=False)
    adapter = result.output_dir
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert any("score" in k for k in saved) and any("lora_" in k for k in saved)
    model, tokenizer = load_reward_model(adapter)
    accuracy = ranking_accuracy(model, tokenizer, held_out_pairs)
    assert accuracy >= 0.8, f"held-out pairwise accuracy {accuracy:.2f} (chance is 0.5)"


def test_resume_reproduces_uninterrupted_losses(tiny_model: Path, pairs_file: Path, tmp_path: Path) -> None:
    recipe = reward_recipe(
        tiny_model, pairs_file, tmp_path / "a", max_steps=8, checkpoint_every=4, keep_checkpoints=3, eval_every=100
    )
    recipe["reward"] = {"center_coeff": 0.01}
    full = tuneforge.train(recipe, progress=False)
    recipe["output"]["dir"] = str(tmp_path / "b")
    resumed = tuneforge.train(recipe, resume=tmp_path / "a" / "checkpoints" / "step-0000004", progress=False)
    assert [h["step"] for h in resumed.history] == [5, 6, 7, 8]
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history[4:]], rel=1e-6, abs=0)


def test_reward_recipe_errors(tiny_model: Path, pairs_file: Path, tmp_path: Path) -> None:
    from tuneforge.config import load_recipe

    recipe = reward_recipe(tiny_model, pairs_file, tmp_path / "r")
    recipe["adapter"] = {"kind": "prompt_tuning"}
    with pytest.raises(RecipeError, match="adapter.kind: method reward trains a scalar head"):
        load_recipe(recipe)
