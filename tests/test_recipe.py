from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tuneforge.config import load_recipe, recipe_yaml
from tuneforge.errors import RecipeError

MIN = {"model": {"path": "m"}, "data": {"sources": [{"path": "d.jsonl"}]}}


def test_defaults_are_filled_in() -> None:
    r = load_recipe(MIN)
    shown = yaml.safe_load(recipe_yaml(r))
    assert shown["train"]["lr"] == r.train.lr
    assert shown["adapter"]["kind"] == "lora"
    assert shown["data"]["sources"][0]["weight"] == 1.0


def test_misspelled_key_names_path_and_suggests() -> None:
    with pytest.raises(RecipeError) as e:
        load_recipe({**MIN, "train": {"learning_rat": 1e-4}})
    assert "train.learning_rat: unknown field" in str(e.value)
    with pytest.raises(RecipeError) as e:
        load_recipe({**MIN, "trian": {}})
    assert "trian" in str(e.value) and "did you mean 'train'" in str(e.value)
    with pytest.raises(RecipeError) as e:
        load_recipe({"model": {"path": "m"}, "data": {"sources": [{"path": "d", "wieght": 2}]}})
    assert "data.sources[0].wieght" in str(e.value) and "'weight'" in str(e.value)


def test_wrong_type_and_missing_field() -> None:
    with pytest.raises(RecipeError) as e:
        load_recipe({**MIN, "train": {"lr": "fast"}})
    assert "train.lr" in str(e.value)
    with pytest.raises(RecipeError) as e:
        load_recipe({"data": MIN["data"]})
    assert "model: required field is missing" in str(e.value)


def test_set_overrides(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MIN))
    r = load_recipe(path, ["train.lr=1e-4", "data.sources.0.weight=3", "adapter.target_modules=[q_proj, v_proj]"])
    assert r.train.lr == 1e-4 and r.data.sources[0].weight == 3
    assert r.adapter.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(RecipeError, match="did you mean 'lr'"):
        load_recipe(path, ["train.lrr=1"])
    with pytest.raises(RecipeError, match="KEY.PATH=VALUE"):
        load_recipe(path, ["train.lr"])


def test_bad_yaml_names_line(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  path: m\ndata: [unclosed\n")
    with pytest.raises(RecipeError, match=r"r.yaml:\d+: not valid YAML"):
        load_recipe(path)


def test_relative_paths_resolve_against_recipe_dir(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text("")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MIN))
    r = load_recipe(path)
    assert r.data.sources[0].path == str(tmp_path / "d.jsonl")
    assert r.model.path == "m"  # a hub id stays a hub id


def test_shipped_recipes_validate() -> None:
    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        load_recipe(path)


def test_modules_to_save_needs_a_lora_style_adapter() -> None:
    for kind in ("full", "prompt_tuning"):
        with pytest.raises(RecipeError, match=f"adapter: modules_to_save .* not with kind '{kind}'"):
            load_recipe({**MIN, "adapter": {"kind": kind, "modules_to_save": ["embed_tokens"]}})
    assert load_recipe({**MIN, "adapter": {"modules_to_save": ["embed_tokens"]}}).adapter.modules_to_save == [
        "embed_tokens"
    ]


def test_lora_with_a_trained_tied_embedding_merges_into_the_model_it_trained(tiny_model: Path, tmp_path: Path) -> None:
    """A tied LM head follows the trained embedding: the merged model is the trained one, head and embedding one."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import tuneforge

    from conftest import base_recipe, reverse_task, write_jsonl

    data = write_jsonl(tmp_path / "reverse.jsonl", reverse_task(64))
    recipe = base_recipe(tiny_model, data, tmp_path / "run", max_steps=6, lr=1e-2)
    recipe["adapter"] = {"kind": "lora", "r": 4, "alpha": 8, "modules_to_save": ["embed_tokens"]}
    recipe["output"]["merge"] = True
    result = tuneforge.train(recipe, progress=False)

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert base.config.tie_word_embeddings
    saved = load_file(str(result.output_dir / "adapter_model.safetensors"))
    [embedding] = [v for k, v in saved.items() if "embed_tokens" in k]  # one trained copy: the head is tied to it
    assert not torch.equal(embedding, base.get_input_embeddings().weight)
    trained = PeftModel.from_pretrained(base, str(result.output_dir)).eval()
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir).eval()
    assert torch.equal(merged.get_output_embeddings().weight, merged.get_input_embeddings().weight)
    ids = torch.tensor([[5, 17, 42, 9, 77, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained(ids).logits, rtol=1e-5, atol=1e-5)
