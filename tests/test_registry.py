"""The model registry and the prompt registry on a real embedded MLflow store (SQLite), end to end.

Runs register versions with lineage tags; the chat template and system prompts go to MLflow's prompt registry,
versioned only when their text changes; ``models:/NAME@ALIAS`` loads in training and through ``resolve_model``;
the ``tuneforge registry`` commands list, show and alias, and refuse unknown names with exit code 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import tuneforge
from tuneforge.cli import main
from tuneforge.errors import UnknownModelError
from tuneforge.models.chat_templates import CHATML
from tuneforge.models.loading import model_fingerprint
from tuneforge.models.refs import load_model, resolve_model
from tuneforge.tracking import registry

from conftest import base_recipe, reverse_task, write_jsonl

SYSTEM = "You reverse the order of three words."

# MLflow on SQLite: creating the store and two registered runs take tens of seconds on a busy 2-core machine.
slow = pytest.mark.slow
TEMPLATE_2 = "{# v2: the same turns, a marked template #}" + CHATML


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _recipe(base: Path | str, data: Path, out: Path, store: str, name: str, **extra: Any) -> dict[str, Any]:
    recipe = base_recipe(Path(str(base)), data, out, max_steps=3)
    recipe["model"]["path"] = str(base)
    recipe["data"]["max_length"] = 128  # room for the system prompt (the tiny tokenizer spells it out)
    recipe.update(name=name, adapter={"kind": "lora", "r": 4}, tracking={"uri": store, "experiment": "registry"})
    for key, value in extra.items():
        recipe.setdefault(key, {}).update(value)
    return recipe


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[SimpleNamespace]:
    """Two runs of recipe ``rev-bot`` (the second with a changed chat template), registered by default."""
    root = tmp_path_factory.mktemp("registry")
    (root / "store").mkdir()
    uri = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    records = [{"messages": [{"role": "system", "content": SYSTEM}, *r["messages"]]} for r in reverse_task(48)]
    data = write_jsonl(root / "reverse.jsonl", records)
    run1 = root / "run1"
    (run1 / "eval").mkdir(parents=True)  # what an eval of the run leaves beside it
    summary = {"model": "run1", "baseline": "base", "metrics": {"general/acc": {"value": 0.8, "verdict": "better"}}}
    (run1 / "eval" / "summary.json").write_text(json.dumps(summary))
    (run1 / "eval" / "report.json").write_text(json.dumps({"candidates": [{"items": [1, 0, 1]}], "title": "t"}))
    cwd = Path.cwd()
    os.chdir(root)  # MLflow's global default store would appear here as ./mlflow.db if anything leaked to it
    try:
        first = tuneforge.train(_recipe(tiny_model, data, run1, uri, "rev-bot"), progress=False)
        second = tuneforge.train(
            _recipe(tiny_model, data, root / "run2", uri, "rev-bot", model={"chat_template": TEMPLATE_2}),
            progress=False,
        )
    finally:
        os.chdir(cwd)
    yield SimpleNamespace(uri=uri, root=root, data=data, first=first, second=second, model=tiny_model)
    leaked = [p.name for p in root.iterdir() if p.name in ("mlflow.db", "mlruns", "mlartifacts")]
    assert leaked == [], "nothing may write to MLflow's global default store (./mlflow.db)"


@slow
def test_every_run_registers_a_version_under_the_recipe_name(store: SimpleNamespace) -> None:
    assert (store.first.model_version, store.second.model_version) == ("1", "2")
    assert [m["name"] for m in registry.list_models(store.uri)] == ["rev-bot"]  # prompts are not listed as models
    assert (store.root / "store" / "mlartifacts").is_dir()  # the weights went beside the named store


@slow
def test_lineage_tags(store: SimpleNamespace) -> None:
    version = registry.get_version("rev-bot", "1", uri=store.uri)
    tags = version.tags
    run = _client(store.uri).get_run(store.first.tracking_run_id)
    assert version.run_id == store.first.tracking_run_id
    assert tags["base_model"] == str(store.model) and tags["base_model.hash"] == model_fingerprint(str(store.model))
    assert (tags["method"], tags["adapter"], tags["tuneforge_version"]) == ("sft", "lora", tuneforge.__version__)
    assert tags["recipe_hash"] == run.data.tags["tuneforge.recipe_hash"]
    assert tags["data_hash.reverse"] == run.data.tags["tuneforge.data_hash.reverse"]
    assert json.loads(tags["data.mix"]) == json.loads(json.dumps(store.first.mix))
    assert float(tags["mix.reverse"]) == 1.0
    assert tags["eval.metrics.general/acc.value"] == "0.8" and tags["eval.metrics.general/acc.verdict"] == "better"
    assert tags["eval.baseline"] == "base"
    assert not any(k.startswith("eval.report") for k in tags)  # the full report is not made into tags
    assert not any(k.startswith("eval.") for k in registry.get_version("rev-bot", "2", uri=store.uri).tags)


@slow
def test_prompts_are_versioned_when_their_text_changes(store: SimpleNamespace) -> None:
    v1, v2 = (registry.get_version("rev-bot", v, uri=store.uri).tags for v in ("1", "2"))
    assert v1["tuneforge.prompt.chat_template"] == "prompts:/rev-bot.chat_template/1"
    assert v2["tuneforge.prompt.chat_template"] == "prompts:/rev-bot.chat_template/2"  # the template changed
    assert v1["tuneforge.prompt.system"] == v2["tuneforge.prompt.system"] == "prompts:/rev-bot.system/1"  # it did not
    client = _client(store.uri)
    assert client.get_prompt_version("rev-bot.chat_template", 1).template == CHATML
    assert client.get_prompt_version("rev-bot.chat_template", 2).template == TEMPLATE_2
    assert client.get_prompt_version("rev-bot.system", 1).template == [{"role": "system", "content": SYSTEM}]
    linked = json.loads(client.get_run(store.second.tracking_run_id).data.tags["mlflow.linkedPrompts"])
    assert {"name": "rev-bot.chat_template", "version": "2"} in linked


@slow
def test_register_prompt_round_trip(store: SimpleNamespace) -> None:
    from tuneforge.tracking.mlflow_tracker import Tracker

    with Tracker.start(experiment="prompts", run_name="p", params={}, tags={}, tracking_uri=store.uri) as tracker:
        first = tracker.register_prompt("support.system", "Be brief.")
        again = tracker.register_prompt("support.system", "Be brief.")
        changed = tracker.register_prompt("support.system", "Be brief and kind.")
    assert first == again == "prompts:/support.system/1" and changed == "prompts:/support.system/2"
    assert _client(store.uri).get_prompt_version("support.system", 2).template == "Be brief and kind."


@slow
def test_resolve_registered_versions_with_their_trained_template(store: SimpleNamespace) -> None:
    one = resolve_model("models:/rev-bot/1", tracking_uri=store.uri)
    latest = resolve_model("models:/rev-bot", tracking_uri=store.uri)
    assert one.adapter is not None and (Path(one.adapter) / "adapter_config.json").is_file()
    assert one.base == str(store.model.resolve()) and one.label == "rev-bot/1"
    assert one.chat_template == CHATML and latest.chat_template == TEMPLATE_2
    assert latest.version is not None and latest.version["version"] == "2"
    assert latest.version["tags"]["method"] == "sft"
    model, tokenizer = load_model(latest)
    assert tokenizer.chat_template == TEMPLATE_2 and not model.training


@slow
def test_aliases_resolve_and_move(store: SimpleNamespace) -> None:
    registry.set_alias("rev-bot", "1", "staging", store.uri)
    staged = resolve_model("models:/rev-bot@staging", tracking_uri=store.uri)
    assert staged.version is not None and staged.version["version"] == "1" and "staging" in staged.version["aliases"]
    registry.set_alias("rev-bot", "2", "staging", store.uri)
    assert registry.resolve("models:/rev-bot@staging", store.uri).version == "2"
    assert registry.get_version("rev-bot", "1", uri=store.uri).aliases == ()
    registry.set_alias("rev-bot", "1", "staging", store.uri)  # back, for the training test


@slow
def test_results_can_be_tagged_onto_a_version_later(store: SimpleNamespace) -> None:
    tagged = registry.set_tags("rev-bot", "1", {"eval.metrics.later/acc.value": 0.5}, store.uri)
    assert tagged.tags["eval.metrics.later/acc.value"] == "0.5" and tagged.tags["method"] == "sft"


@slow
def test_unknown_names_versions_and_aliases_are_clear_errors(store: SimpleNamespace) -> None:
    with pytest.raises(UnknownModelError, match="no registered model named 'rev-bto' — did you mean 'rev-bot'"):
        resolve_model("models:/rev-bto/1", tracking_uri=store.uri)
    with pytest.raises(UnknownModelError, match=r"has no version 9 \(versions: 1, 2\)"):
        resolve_model("models:/rev-bot/9", tracking_uri=store.uri)
    registry.set_alias("rev-bot", "2", "production", store.uri)
    with pytest.raises(UnknownModelError, match="no alias 'prodution' — did you mean 'production'"):
        resolve_model("models:/rev-bot@prodution", tracking_uri=store.uri)
    with pytest.raises(UnknownModelError, match="no registered model"):  # a prompt is not a model
        resolve_model("models:/rev-bot.chat_template/1", tracking_uri=store.uri)


@slow
def test_training_starts_from_a_registered_alias(store: SimpleNamespace, tmp_path: Path) -> None:
    registry.set_alias("rev-bot", "1", "staging", store.uri)
    recipe = _recipe("models:/rev-bot@staging", store.data, tmp_path / "run", store.uri, "rev-bot-child")
    result = tuneforge.train(recipe, progress=False)
    child = registry.get_version("rev-bot-child", "1", uri=store.uri)
    assert child.tags["base_model.ref"] == "models:/rev-bot@staging"
    assert child.tags["base_model.registered"] == "models:/rev-bot/1"
    start = resolve_model(str(result.run_dir)).base  # the v1 adapter merged into full weights, once
    assert start == child.tags["base_model"] and (Path(start) / "model.safetensors").is_file()
    assert resolve_model("models:/rev-bot-child", tracking_uri=store.uri).chat_template == CHATML  # v1's template


@slow
def test_opting_out_logs_the_weights_with_the_run_instead(store: SimpleNamespace, tmp_path: Path) -> None:
    recipe = _recipe(store.model, store.data, tmp_path / "run", store.uri, "no-register")
    recipe["tracking"]["auto_register"] = False
    result = tuneforge.train(recipe, progress=False)
    assert result.model_version is None
    assert "no-register" not in [m["name"] for m in registry.list_models(store.uri)]
    artifacts = {f.path for f in _client(store.uri).list_artifacts(result.tracking_run_id)}
    assert "adapter" in artifacts


@slow
def test_registry_cli_list_show_alias(store: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    uri = ["--tracking-uri", store.uri]
    assert main(["registry", "alias", "rev-bot", "2", "production", *uri]) == 0
    assert "models:/rev-bot@production → version 2" in capsys.readouterr().out
    assert main(["registry", "list", "--json", *uri]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed["rev-bot"]["latest"] == "2" and listed["rev-bot"]["aliases"]["production"] == "2"
    assert main(["registry", "show", "rev-bot", *uri]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["version", "aliases", "created"] and len(table) == 3
    assert main(["registry", "show", "rev-bot", "production", *uri]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "2" and shown["tags"]["tuneforge.prompt.chat_template"].endswith("/2")
    assert main(["registry", "show", "rev-bot", "7", *uri]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: model models:/rev-bot/7") and "Traceback" not in err


@slow
def test_registry_cli_unknown_model_exits_1_without_a_traceback(store: SimpleNamespace) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tuneforge",
            "registry",
            "alias",
            "rev-bott",
            "1",
            "staging",
            "--tracking-uri",
            store.uri,
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "did you mean 'rev-bot'" in r.stderr and "Traceback" not in r.stderr


def test_model_uris_parse_into_name_version_alias() -> None:
    from tuneforge.errors import ModelError

    assert registry.parse_uri("models:/support-bot/3") == ("support-bot", "3", None)
    assert registry.parse_uri("models:/support-bot@production") == ("support-bot", None, "production")
    assert registry.parse_uri("models:/support-bot") == registry.parse_uri("models:/support-bot/latest")
    assert registry.parse_uri("models:/support-bot")[1:] == (None, None)
    with pytest.raises(ModelError, match="VERSION \\(a number\\)"):
        registry.parse_uri("models:/support-bot/three")
    with pytest.raises(ModelError, match="alias 'pro d'"):
        registry.parse_uri("models:/support-bot@pro d")
    with pytest.raises(ModelError, match="no model name"):
        registry.parse_uri("models:/")


def test_linked_prompts_tag_adds_each_version_once() -> None:
    from tuneforge.tracking.prompts import linked_prompts

    once = linked_prompts(None, ["prompts:/a.chat_template/1", "prompts:/a.system/2"])
    twice = linked_prompts(once, ["prompts:/a.chat_template/1", "prompts:/a.chat_template/3"])
    assert json.loads(twice) == [
        {"name": "a.chat_template", "version": "1"},
        {"name": "a.system", "version": "2"},
        {"name": "a.chat_template", "version": "3"},
    ]


def test_register_as_names_mlflow_would_refuse_fail_at_load_time() -> None:
    from tuneforge.config import load_recipe
    from tuneforge.errors import RecipeError
    from tuneforge.lineage import registered_name

    recipe = {"model": {"path": "m"}, "data": {"sources": [{"path": "d.jsonl"}]}}
    with pytest.raises(RecipeError, match="tracking.register_as: must be a non-empty model name without '/' or ':'"):
        load_recipe({**recipe, "tracking": {"register_as": "ft:tiny:acme"}})
    assert registered_name(load_recipe({**recipe, "name": "team:bot"})) == "team-bot"  # the default, made valid
    assert registered_name(load_recipe({**recipe, "tracking": {"auto_register": False}})) is None
    assert registered_name(load_recipe({**recipe, "tracking": {"enabled": False}})) is None
