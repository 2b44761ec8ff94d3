"""DPO and its variants through the one training loop: outcomes on held-out pairs, references, resume, mixing, errors.

The preference is learnable by a tiny model in a few steps: a prompt lists four words, two from a "good" half of the
vocabulary and two from a "bad" half; the chosen answer picks a good word, the rejected one a bad word. Held-out
prompts are word combinations never trained on, and the held-out accuracy is measured independently of tuneforge's
code: plain transformers, the tokenizer's chat template, summed completion log-probs of the trained policy against
the untouched base.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import tuneforge
from tuneforge.errors import DataError, RecipeError, TuneforgeError

from conftest import BAD, base_recipe, preference_pairs, reverse_task, write_jsonl


def openai_format(pair: dict) -> dict:
    return {
        "input": {"messages": [{"role": "user", "content": pair["prompt"]}]},
        "preferred_output": [{"role": "assistant", "content": pair["chosen"]}],
        "non_preferred_output": [{"role": "assistant", "content": pair["rejected"]}],
    }


def dpo_recipe(model: Path, data: Path, out: Path, **dpo: object) -> dict:
    recipe = base_recipe(model, data, out, max_steps=16, lr=1e-2, eval_every=8)
    recipe["method"] = "dpo"
    recipe["data"]["max_length"] = 48
    recipe["dpo"] = {"beta": 0.5, **dpo}
    return recipe


def completion_logp(model: torch.nn.Module, tokenizer: object, prompt: list[dict], answer: list[dict]) -> float:
    """log p(answer turn | prompt messages), rendered with the tokenizer's own chat template (no tuneforge code)."""
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
    n_head = len(tokenizer(head, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logps = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(logps[n_head - 1 :].sum())


def implicit_reward_accuracy(
    policy: torch.nn.Module, base: torch.nn.Module, tokenizer: object, pairs: list[dict]
) -> float:
    """Share of pairs whose chosen answer gains more log-prob over the base than the rejected one."""
    wins = 0
    for p in pairs:
        prompt = [{"role": "user", "content": p["prompt"]}]
        answer = {side: [{"role": "assistant", "content": p[side]}] for side in ("chosen", "rejected")}
        ratio = {
            side: completion_logp(policy, tokenizer, prompt, answer[side])
            - completion_logp(base, tokenizer, prompt, answer[side])
            for side in ("chosen", "rejected")
        }
        wins += ratio["chosen"] > ratio["rejected"]
    return wins / len(pairs)


def load_policy(result: tuneforge.api.TrainResult, base_dir: Path) -> torch.nn.Module:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if (result.output_dir / "adapter_config.json").exists():
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(result.output_dir)).eval()
    return AutoModelForCausalLM.from_pretrained(result.output_dir).eval()


def heldout_accuracy(result: tuneforge.api.TrainResult, base_dir: Path, held_out: list[dict]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    return implicit_reward_accuracy(load_policy(result, base_dir), base, tokenizer, held_out)


# ------------------------------------------------------------------------------------------------ outcomes


def test_dpo_learns_heldout_preferences(
    tiny_model: Path, pairs_file: Path, held_out_pairs: list[dict], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    result = tuneforge.train(dpo_recipe(tiny_model, pairs_file, tmp_path / "run"), progress=False)
    # Step 1: the policy is the reference, so every margin is 0 and the loss is exactly log 2.
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert result.history[-1]["loss"] < 0.3
    assert result.evals[-1]["val/accuracy"] >= 0.9 and result.evals[-1]["val/margin"] > 0
    accuracy = heldout_accuracy(result, tiny_model, held_out_pairs)
    assert accuracy >= 0.85, f"held-out implicit-reward accuracy {accuracy:.2f} (chance is 0.5)"
    # full fine-tuning precomputed the reference log-probs once, next to the token cache
    assert list((Path(tuneforge.paths.cache_dir("tokens")) / "reference").glob("*.npy"))
    info = result.data["pairs"]  # every record of the training split became a pair; with the validation split, all 240
    assert info["pairs"] == info["train"] and info["dropped_pairs"] == 0 and info["train"] + info["val"] == 240
    assert result.mix["mix_by"] == "examples"


@pytest.mark.parametrize(
    ("loss_type", "adapter", "extra"),
    [
        ("ipo", "lora", {}),
        ("hinge", "lora", {}),
        ("sigmoid", "full", {"label_smoothing": 0.1}),
        ("simpo", "full", {"beta": 2.0}),
        ("orpo", "full", {}),
    ],
)
def test_dpo_variants_learn(
    tiny_model: Path,
    pairs_file: Path,
    held_out_pairs: list[dict],
    tmp_path: Path,
    loss_type: str,
    adapter: str,
    extra: dict,
) -> None:
    recipe = dpo_recipe(tiny_model, pairs_file, tmp_path / "run", loss_type=loss_type, **extra)
    recipe["train"]["max_steps"] = 12
    if adapter == "lora":
        recipe["adapter"] = {"kind": "lora", "r": 8, "alpha": 16}
        recipe["train"]["lr"] = 2e-2
    result = tuneforge.train(recipe, progress=False)
    losses = [h["loss"] for h in result.history]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    accuracy = heldout_accuracy(result, tiny_model, held_out_pairs)
    assert accuracy >= 0.75, f"{loss_type}: held-out implicit-reward accuracy {accuracy:.2f} (chance is 0.5)"


# ------------------------------------------------------------------------------------------------ reference


def test_reference_modes_give_the_same_training(tiny_model: Path, pairs_file: Path, tmp_path: Path) -> None:
    """Precomputed (cached) reference log-probs, a frozen copy and the adapter-off base all mean the same thing."""

    def losses(adapter: str, precompute: bool, name: str) -> list[float]:
        recipe = dpo_recipe(tiny_model, pairs_file, tmp_path / name, precompute_ref=precompute)
        recipe["train"].update(max_steps=4, eval_every=100)
        if adapter == "lora":
            recipe["adapter"] = {"kind": "lora", "r": 4, "alpha": 8}
        return [h["loss"] for h in tuneforge.train(recipe, progress=False).history]

    precomputed = losses("full", True, "a")
    ref_dir = Path(tuneforge.paths.cache_dir("tokens")) / "reference"
    stamps = {p: p.stat().st_mtime_ns for p in ref_dir.glob("*.npy")}
    assert stamps
    assert losses("full", False, "b") == pytest.approx(precomputed, rel=1e-5, abs=1e-6)
    assert losses("full", True, "c") == pytest.approx(precomputed, rel=1e-6, abs=0)
    assert {p: p.stat().st_mtime_ns for p in ref_dir.glob("*.npy")} == stamps  # the cache answered; nothing rewritten
    assert losses("lora", True, "d") == pytest.approx(losses("lora", False, "e"), rel=1e-5, abs=1e-6)


def test_resume_reproduces_uninterrupted_losses(tiny_model: Path, pairs_file: Path, tmp_path: Path) -> None:
    recipe = dpo_recipe(tiny_model, pairs_file, tmp_path / "a")
    recipe["train"].update(max_steps=8, checkpoint_every=4, keep_checkpoints=3, eval_every=100)
    full = tuneforge.train(recipe, progress=False)
    recipe["output"]["dir"] = str(tmp_path / "b")
    resumed = tuneforge.train(recipe, resume=tmp_path / "a" / "checkpoints" / "step-0000004", progress=False)
    assert [h["step"] for h in resumed.history] == [5, 6, 7, 8]
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history[4:]], rel=1e-6, abs=0)


def test_micro_batches_and_prompt_sharing_do_not_change_gradients(
    tiny_model: Path, pairs_file: Path, tmp_path: Path
) -> None:
    """One step's gradient is the same in one micro-batch or four, with the prompt shared or fed twice."""
    from tuneforge.config import load_recipe
    from tuneforge.training.build import build_model, prepare

    recipe = load_recipe(dpo_recipe(tiny_model, pairs_file, tmp_path / "run"))
    prepared = prepare(recipe)
    cpu = torch.device("cpu")
    model = build_model(recipe, cpu)
    torch.manual_seed(0)
    with torch.no_grad():  # away from policy == reference, so margins (and per-pair weights) differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    grads = []
    for micro, share in ((8, True), (2, True), (8, False)):
        task = prepared.make_task(model, micro, "fp32", cpu)  # the reference is the base, loaded afresh
        assert task.spec.share_prompt  # the tiny Llama passes the layout self-check
        task.spec.share_prompt = share
        out = task.forward_backward(model, range(8), 1 / 8)
        grads.append((float(out.loss_sum), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
    for loss, g in grads[1:]:
        assert loss == pytest.approx(grads[0][0], rel=1e-5)
        for a, b in zip(g, grads[0][1]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_completion_logps_match_plain_transformers(tiny_model: Path, tmp_path: Path) -> None:
    """Only the answer turn is scored — earlier assistant turns of a multi-turn prompt are context, not preference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.config import load_recipe
    from tuneforge.training.build import build_model, prepare
    from tuneforge.training.pairs import completion_logps, split_pairs

    pairs = preference_pairs(4, seed=5)
    records = [
        {
            "prompt": [
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "apple banana"},
                {"role": "user", "content": p["prompt"]},
            ],
            "chosen": [{"role": "assistant", "content": p["chosen"]}],
            "rejected": [{"role": "assistant", "content": p["rejected"]}],
        }
        for p in pairs
    ]
    data = write_jsonl(tmp_path / "multi.jsonl", records)
    recipe = dpo_recipe(tiny_model, data, tmp_path / "run")
    recipe["data"].update(val_fraction=0, max_length=96)
    prepared = prepare(load_recipe(recipe))
    model = build_model(load_recipe(recipe), torch.device("cpu")).eval()
    task = prepared.make_task(model, 4, "fp32", torch.device("cpu"))
    refs = [(0, i) for i in range(4)]
    with torch.no_grad():
        ours = split_pairs(*completion_logps(model, task.spec.batch(refs, task.sources), True))

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model).eval()

    def logp(prompt: list[dict], answer: list[dict]) -> float:
        return completion_logp(plain, tokenizer, prompt, answer)

    texts = [tokenizer.decode(task.sources[0].seqs.example(2 * i)[0]) for i in range(4)]
    by_text = {tokenizer.apply_chat_template(r["prompt"] + r["chosen"], tokenize=False): r for r in records}
    expected_chosen = [logp(by_text[t]["prompt"], by_text[t]["chosen"]) for t in texts]
    expected_rejected = [logp(by_text[t]["prompt"], by_text[t]["rejected"]) for t in texts]
    assert ours.chosen.tolist() == pytest.approx(expected_chosen, abs=1e-4)
    assert ours.rejected.tolist() == pytest.approx(expected_rejected, abs=1e-4)


# ------------------------------------------------------------------------------------------------ data


def test_openai_format_and_weighted_mixing(tiny_model: Path, tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "openai.jsonl", [openai_format(p) for p in preference_pairs(60, seed=2)])
    b = write_jsonl(tmp_path / "plain.jsonl", preference_pairs(60, seed=3))
    recipe = dpo_recipe(tiny_model, a, tmp_path / "run")
    recipe["data"]["sources"] = [
        {"path": str(a), "name": "openai", "weight": 3.0},
        {"path": str(b), "name": "plain", "weight": 1.0, "format": "preference"},
    ]
    recipe["train"].update(max_steps=5, eval_every=5)
    result = tuneforge.train(recipe, progress=False)
    assert result.mix["names"] == ["openai", "plain"]
    assert result.mix["examples"] == [30, 10]  # 40 pairs, 3 : 1 by pairs
    assert {"val/openai_accuracy", "val/plain_accuracy", "val/accuracy"} <= set(result.evals[-1])


def test_preference_data_errors_are_clear(tiny_model: Path, pairs_file: Path, tmp_path: Path) -> None:
    from tuneforge.config import load_recipe
    from tuneforge.training.build import prepare

    chat = write_jsonl(tmp_path / "chat.jsonl", reverse_task(20))
    with pytest.raises(RecipeError, match="chat.jsonl holds messages records, but method dpo"):
        prepare(load_recipe(dpo_recipe(tiny_model, chat, tmp_path / "r")))
    sft = base_recipe(tiny_model, pairs_file, tmp_path / "r")
    with pytest.raises(TuneforgeError, match="holds preference pairs: train them with method: dpo"):
        prepare(load_recipe(sft))
    with pytest.raises(RecipeError, match="label_smoothing applies to the sigmoid and simpo"):
        load_recipe(dpo_recipe(tiny_model, pairs_file, tmp_path / "r", loss_type="ipo", label_smoothing=0.1))

    long = preference_pairs(30, seed=4)
    long[6]["rejected"] = " ".join(BAD * 6)  # line 7: the rejected side is far over 48 tokens
    data = write_jsonl(tmp_path / "long.jsonl", long)
    with pytest.raises(DataError) as err:
        prepare(load_recipe(dpo_recipe(tiny_model, data, tmp_path / "r")))
    assert "long.jsonl:7: rejected: too long after tokenization" in str(err.value)
    recipe = dpo_recipe(tiny_model, data, tmp_path / "r")
    recipe["data"].update(on_overlong="drop", val_fraction=0)
    prepared = prepare(load_recipe(recipe))
    assert prepared.data_info["long"]["dropped_pairs"] == 1 and prepared.data_info["long"]["pairs"] == 29


def test_shipped_preference_recipes_validate() -> None:
    from tuneforge.config import load_recipe

    root = Path(__file__).parent.parent / "recipes"
    dpo = load_recipe(root / "dpo.yaml")
    reward = load_recipe(root / "reward.yaml")
    assert dpo.method == "dpo" and reward.method == "reward"
    assert dpo.data.sources[0].path.endswith("tickets_preferences.jsonl")
