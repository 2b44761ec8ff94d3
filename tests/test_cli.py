"""The CLI exits non-zero with a clear one-line cause on every bad input — never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import base_recipe, reverse_task, write_jsonl


def tf(*args: str, env_home: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "TUNEFORGE_HOME": str(env_home)}
    return subprocess.run(
        [sys.executable, "-m", "tuneforge", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_missing_recipe(tmp_path: Path) -> None:
    r = tf("train", str(tmp_path / "nope.yaml"), env_home=tmp_path)
    assert r.returncode == 2 and "recipe not found" in r.stderr and "Traceback" not in r.stderr


def test_bad_recipe_field(tmp_path: Path, tiny_model: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", reverse_task(20))
    recipe = base_recipe(tiny_model, data, tmp_path / "out")
    recipe["train"]["lrate"] = 1
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    r = tf("train", str(path), env_home=tmp_path)
    assert r.returncode == 2 and "train.lrate: unknown field" in r.stderr and "Traceback" not in r.stderr


def test_bad_data_is_refused_before_model_load(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        "{not json\n"
        '{"messages": [{"role": "robot", "content": "x"}]}\n'
    )
    recipe = {
        "model": {"path": str(tmp_path / "no-model")},
        "data": {"sources": [{"path": str(data)}]},
        "tracking": {"enabled": False},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    r = tf("train", str(path), env_home=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{data}:2:" in r.stderr and f"{data}:3:" in r.stderr
    assert "no-model" not in r.stderr  # data is checked first


def test_unknown_model_path(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", reverse_task(20))
    recipe = {
        "model": {"path": str(tmp_path / "no-model")},
        "data": {"sources": [{"path": str(data)}]},
        "tracking": {"enabled": False},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    r = tf("train", str(path), env_home=tmp_path)
    assert r.returncode == 2 and "no-model" in r.stderr and "no such directory" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_data_file(tmp_path: Path, tiny_model: Path) -> None:
    recipe = base_recipe(tiny_model, tmp_path / "missing.jsonl", tmp_path / "out")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    r = tf("train", str(path), env_home=tmp_path)
    assert r.returncode != 0 and "missing.jsonl" in r.stderr and "Traceback" not in r.stderr


def test_data_validate_reports_every_bad_line(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        '{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "yo"}]}\n'
        '{"prompt": "a"}\n'
    )
    r = tf("data", "validate", str(data), env_home=tmp_path)
    assert r.returncode == 1
    assert f"{data}:2: messages[0].content" in r.stdout
    assert f"{data}:3:" in r.stdout
    good = write_jsonl(tmp_path / "good.jsonl", reverse_task(5))
    assert tf("data", "validate", str(good), env_home=tmp_path).returncode == 0
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = tf("data", "validate", str(empty), env_home=tmp_path)  # a reported problem is a failure, whatever it is
    assert r.returncode == 1 and f"{empty}:0: holds no records" in r.stdout


@pytest.mark.slow  # two CLI subprocesses, one of them training: ~7 s
def test_train_and_show_recipe_via_cli(tmp_path: Path, tiny_model: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", reverse_task(40))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base_recipe(tiny_model, data, tmp_path / "out", max_steps=3)))
    shown = tf("recipe", "show", str(path), "--set", "train.lr=0.5", env_home=tmp_path)
    assert shown.returncode == 0 and yaml.safe_load(shown.stdout)["train"]["lr"] == 0.5
    r = tf("train", str(path), "--quiet", env_home=tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert Path(summary["output_dir"]).is_dir() and summary["metrics"]["steps"] == 3
