"""End-to-end training on a tiny model: learning, adapters, exact resume, standard outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tuneforge

from conftest import base_recipe, reverse_task, write_jsonl


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "reverse.jsonl", reverse_task(200))


def test_full_finetune_loss_decreases(tiny_model: Path, data: Path, tmp_path: Path) -> None:
    result = tuneforge.train(base_recipe(tiny_model, data, tmp_path / "run", max_steps=30), progress=False)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3
    assert result.evals and result.evals[-1]["val/loss"] < result.evals[0]["val/loss"]
    assert (result.output_dir / "model.safetensors").exists()
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 31))


def test_lora_changes_only_adapter_weights(tiny_model: Path, data: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    recipe = base_recipe(tiny_model, data, tmp_path / "run", lr=1e-2)
    recipe["adapter"] = {"kind": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"}
    result = tuneforge.train(recipe, progress=False, output__merge=True)
    adapter = result.output_dir
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # B starts at zero: it trained
    base_sd = load_file(str(tiny_model / "model.safetensors"))
    # plain peft loads the adapter; with adapters disabled the base is untouched
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    for name, p in peft_model.get_base_model().named_parameters():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        if key in base_sd:
            torch.testing.assert_close(p.detach(), base_sd[key], rtol=0, atol=0)
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        adapted = peft_model(ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(ids).logits
    assert not torch.allclose(adapted, plain)
    # merged weights load with plain transformers and reproduce the adapted model
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-4, rtol=1e-4)
    out = merged.generate(ids, max_new_tokens=3, do_sample=False)
    with torch.no_grad():  # greedy decoding of the merged model is the adapted model's
        assert torch.equal(out, peft_model.generate(input_ids=ids, max_new_tokens=3, do_sample=False))
    assert torch.equal(out[:, :4], ids) and out.shape[1] > 4


def test_resume_reproduces_uninterrupted_losses(tiny_model: Path, data: Path, tmp_path: Path) -> None:
    recipe = base_recipe(tiny_model, data, tmp_path / "a", max_steps=10, checkpoint_every=4, keep_checkpoints=3)
    recipe["adapter"] = {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.1}  # dropout: RNG state matters
    full = tuneforge.train(recipe, progress=False)
    ckpt = tmp_path / "a" / "checkpoints" / "step-0000004"
    assert ckpt.exists()
    recipe["output"]["dir"] = str(tmp_path / "b")
    resumed = tuneforge.train(recipe, resume=ckpt, progress=False)
    assert [h["step"] for h in resumed.history] == list(range(5, 11))
    expected = [h["loss"] for h in full.history[4:]]
    assert [h["loss"] for h in resumed.history] == pytest.approx(expected, rel=1e-6, abs=0)


def test_resume_refuses_a_changed_recipe(tiny_model: Path, data: Path, tmp_path: Path) -> None:
    recipe = base_recipe(tiny_model, data, tmp_path / "a", max_steps=6, checkpoint_every=3)
    tuneforge.train(recipe, progress=False)
    recipe["train"]["lr"] = 1e-4
    with pytest.raises(tuneforge.api.TuneforgeError, match="different recipe"):
        tuneforge.train(recipe, resume=tmp_path / "a", progress=False)


@pytest.mark.parametrize("kind", ["dora", "prompt_tuning", "p_tuning", "prefix_tuning"])
def test_other_adapters_train_and_save(kind: str, tiny_model: Path, data: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = base_recipe(tiny_model, data, tmp_path / "run", max_steps=4, lr=1e-2)
    recipe["adapter"] = {"kind": kind, "r": 4, "num_virtual_tokens": 4}
    result = tuneforge.train(recipe, progress=False)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(result.output_dir))
    out = loaded.generate(
        input_ids=torch.tensor([[1, 5, 9]]),
        attention_mask=torch.ones(1, 3, dtype=torch.long),
        max_new_tokens=2,
        min_new_tokens=2,
        do_sample=False,
    )
    assert out[0, :3].tolist() == [1, 5, 9] and out.shape[-1] == 5  # the prompt, then two generated tokens


def test_cpt_on_raw_text(tiny_model: Path, tmp_path: Path) -> None:
    texts = [{"text": " ".join(r["messages"][0]["content"].split()[1:] * 6)} for r in reverse_task(80)]
    data = write_jsonl(tmp_path / "corpus.jsonl", texts)
    recipe = base_recipe(tiny_model, data, tmp_path / "run", max_steps=15)
    recipe["method"] = "cpt"
    result = tuneforge.train(recipe, progress=False)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    info = result.data["corpus"]
    # raw text: every token is a target but each document's first (nothing before it; each fits one 64-token row)
    assert info["supervised_tokens"] == info["train_tokens"] - info["train"]
