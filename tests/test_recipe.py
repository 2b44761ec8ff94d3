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
