"""Model references: directories, adapters, runs, hub ids and the jobs service's ``ft:`` names, resolved and loaded.

The registry's ``models:/`` references are covered in test_registry.py; here everything is files on disk (and one
scheduler pass over a real SQLite service database).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import tuneforge
from tuneforge.errors import ModelError, UnknownModelError
from tuneforge.models import fine_tuned
from tuneforge.models.refs import ModelRef, load_model, resolve_model, source_of, training_start

from conftest import base_recipe, reverse_task, write_jsonl


@pytest.fixture(scope="module")
def lora_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A 4-step LoRA run that keeps checkpoints at steps 2 and 4 (tracking off)."""
    root = tmp_path_factory.mktemp("refs")
    data = write_jsonl(root / "reverse.jsonl", reverse_task(64))
    recipe = base_recipe(tiny_model, data, root / "run", max_steps=4, checkpoint_every=2, keep_checkpoints=3)
    recipe["adapter"] = {"kind": "lora", "r": 4}
    return tuneforge.train(recipe, progress=False)


def _logits(model: Any, tokenizer: Any) -> torch.Tensor:
    ids = tokenizer("reverse: apple banana cherry", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def test_a_model_directory_resolves_to_itself(tiny_model: Path) -> None:
    ref = resolve_model(str(tiny_model))
    assert (ref.base, ref.adapter, ref.tokenizer, ref.version) == (str(tiny_model), None, str(tiny_model), None)
    assert ref.chat_template == (tiny_model / "chat_template.jinja").read_text()
    assert ref.label == tiny_model.name


def test_a_hub_id_resolves_without_touching_the_network() -> None:
    ref = resolve_model("Qwen/Qwen2.5-0.5B-Instruct")
    assert ref == ModelRef(
        "Qwen/Qwen2.5-0.5B-Instruct",
        "Qwen/Qwen2.5-0.5B-Instruct",
        None,
        "Qwen/Qwen2.5-0.5B-Instruct",
        None,
        "Qwen/Qwen2.5-0.5B-Instruct",
        None,
    )


def test_run_and_adapter_directories_resolve_to_base_plus_adapter(lora_run: Any, tiny_model: Path) -> None:
    by_run = resolve_model(str(lora_run.run_dir))
    by_adapter = resolve_model(str(lora_run.output_dir))
    assert by_run.adapter == by_adapter.adapter == str(lora_run.output_dir)
    assert by_run.base == by_adapter.base == str(tiny_model.resolve())  # from adapter_config.json
    assert by_run.tokenizer == str(lora_run.output_dir)  # the tokenizer (and template) training saved
    assert by_run.label == by_adapter.label == lora_run.run_dir.name
    assert by_run.chat_template is not None and "im_start" in by_run.chat_template


def test_load_model_applies_the_adapter_in_eval_mode(lora_run: Any, tiny_model: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model(str(lora_run.run_dir))
    assert not model.training and tokenizer.chat_template is not None
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), lora_run.output_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    got = _logits(model, tokenizer)
    assert torch.allclose(got, _logits(expected, tokenizer), atol=1e-6)
    assert not torch.allclose(got, _logits(base, tokenizer), atol=1e-4)  # the adapter is really applied


def test_a_training_checkpoint_loads_as_the_model_it_was(lora_run: Any) -> None:
    """A mid-run checkpoint (trainable weights + optimizer state) is exported once as a standard PEFT adapter
    holding exactly the checkpoint's weights."""
    from safetensors.torch import load_file

    ckpt = lora_run.run_dir / "checkpoints" / "step-0000002"
    ref = resolve_model(str(ckpt))
    assert ref.adapter == str(ckpt / "export") and (ckpt / "export" / "adapter_config.json").is_file()
    saved = load_file(str(ckpt / "export" / "adapter_model.safetensors"))
    trained = {k.replace(".default.", "."): v for k, v in load_file(str(ckpt / "trainable.safetensors")).items()}
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    model, tokenizer = load_model(ref)
    final, _ = load_model(str(lora_run.run_dir))
    assert not torch.allclose(_logits(model, tokenizer), _logits(final, tokenizer), atol=1e-5)  # step 2, not 4
    assert resolve_model(str(ckpt)).adapter == ref.adapter  # exported once, then reused


def test_fine_tuned_names_resolve_through_the_index(lora_run: Any, tiny_model: Path) -> None:
    name = "ft:tiny:acme:rev:abc123"
    fine_tuned.record(name, lora_run.output_dir, job="ftjob-abc123", base="tiny")
    fine_tuned.record(
        f"{name}:ckpt-step-2",
        lora_run.run_dir / "checkpoints" / "step-0000002",
        job="ftjob-abc123",
        base="tiny",
        step=2,
    )
    assert json.loads(fine_tuned.index_path().read_text())["models"][name]["job"] == "ftjob-abc123"
    ref = resolve_model(name)
    assert (ref.adapter, ref.base, ref.label) == (str(lora_run.output_dir), str(tiny_model.resolve()), name)
    ckpt = resolve_model(f"{name}:ckpt-step-2")
    assert ckpt.adapter is not None and ckpt.adapter.endswith("step-0000002/export")
    with pytest.raises(UnknownModelError, match=r"did you mean 'ft:tiny:acme:rev:abc123'\?") as e:
        resolve_model("ft:tiny:acme:rev:abc124")
    assert e.value.exit_code == 1


def test_training_starts_from_a_fine_tuned_adapter_merged_once(lora_run: Any, tmp_path: Path) -> None:
    name = "ft:tiny:acme::start1"
    fine_tuned.record(name, lora_run.output_dir, job="ftjob-start1", base="tiny")
    path, source = training_start(name)
    assert source is not None and source["ref"] == name and source["adapter"] == str(lora_run.output_dir)
    assert source_of(path) == source and (Path(path) / "model.safetensors").is_file()
    assert training_start(name)[0] == path  # cached by the adapter's files

    data = write_jsonl(tmp_path / "more.jsonl", reverse_task(32, seed=3))
    recipe = base_recipe(Path("unused"), data, tmp_path / "run2", max_steps=2)
    recipe["model"]["path"] = name
    recipe["adapter"] = {"kind": "lora", "r": 4}
    result = tuneforge.train(recipe, progress=False)
    assert resolve_model(str(result.run_dir)).base == path  # the new adapter's base: the merged start
    started, tokenizer = load_model(path)
    merged_from, _ = load_model(str(lora_run.run_dir))
    assert torch.allclose(_logits(started, tokenizer), _logits(merged_from, tokenizer), atol=1e-4)


def test_the_scheduler_records_fine_tuned_names(lora_run: Any, tmp_path: Path) -> None:
    """A finished job's name and its checkpoints land in the index (the scheduler's follow pass, real database)."""
    from tuneforge.service.db import Database, Job, Project
    from tuneforge.service.executors.local import LocalExecutor
    from tuneforge.service.scheduler import Scheduler
    from tuneforge.service.settings import Settings

    exit_file = tmp_path / "exit.json"
    exit_file.write_text(json.dumps({"returncode": 0}))
    settings = Settings(root=tmp_path / "service")
    db = Database(settings.url)
    db.migrate()
    with db.session() as s:
        project = Project(name="acme")
        s.add(project)
        s.flush()
        s.add(
            Job(
                id="ftjob-sched1",
                project_pk=project.pk,
                status="running",
                request={},
                model="tiny",
                training_file="file-x",
                method="sft",
                seed=0,
                suffix="rev",
                run_dir=str(lora_run.run_dir),
                handle={"pid": 0, "started": 0.0, "exit_file": str(exit_file), "log": str(tmp_path / "log")},
                total_steps=4,
            )
        )
    Scheduler(db, settings, LocalExecutor()).tick()
    db.dispose()
    name = "ft:tiny:acme:rev:sched1"
    assert set(fine_tuned.names()) == {name, f"{name}:ckpt-step-2", f"{name}:ckpt-step-4"}
    assert resolve_model(name).adapter == str(lora_run.output_dir.resolve())
    assert fine_tuned.lookup(f"{name}:ckpt-step-2").step == 2


def test_bad_references_are_clear_errors(tmp_path: Path, tiny_model: Path) -> None:
    with pytest.raises(ModelError, match="no such file or directory"):
        resolve_model("./no-such-model")
    with pytest.raises(ModelError, match="not a model directory"):
        resolve_model(str(tmp_path))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text("name: x\n")
    with pytest.raises(ModelError, match="without a result yet"):
        resolve_model(str(tmp_path / "run"))
    adapter = tmp_path / "orphan"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(ModelError, match="base model .*gone.* does not exist here"):
        resolve_model(str(adapter))
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(ModelError, match="adapter_config.json: cannot read it as JSON"):
        resolve_model(str(adapter))
    with pytest.raises(UnknownModelError, match="none recorded yet"):
        resolve_model("ft:tiny:p::nothing")


def test_a_distillation_teacher_and_a_reward_model_can_be_references(lora_run: Any, tmp_path: Path) -> None:
    """``distill.teacher`` and ``ppo.reward_model`` take the same ``ft:``/``models:/`` names as ``model.path``."""
    from tuneforge.config import load_recipe
    from tuneforge.models.refs import resolve_recipe_model

    name = "ft:tiny:acme::teach1"
    fine_tuned.record(name, lora_run.output_dir, job="ftjob-teach1", base="tiny")
    data = write_jsonl(tmp_path / "more.jsonl", reverse_task(16, seed=4))
    recipe = base_recipe(Path(resolve_model(name).base), data, tmp_path / "run", max_steps=2)
    recipe |= {"method": "distill", "distill": {"teacher": name}}
    resolved = resolve_recipe_model(load_recipe(recipe))
    teacher = Path(resolved.distill.teacher)
    assert source_of(teacher)["ref"] == name and (teacher / "model.safetensors").is_file()  # merged once
    assert resolved.model.path == recipe["model"]["path"]  # a plain directory is left as it is

    recipe["distill"]["teacher"] = "ft:tiny:acme::teach2"
    with pytest.raises(UnknownModelError, match=r"^distill\.teacher: .*did you mean 'ft:tiny:acme::teach1'\?"):
        resolve_recipe_model(load_recipe(recipe))

    ppo = base_recipe(Path(recipe["model"]["path"]), data, tmp_path / "run3", max_steps=2)
    ppo |= {"method": "ppo", "ppo": {"reward_model": name}}
    assert resolve_recipe_model(load_recipe(ppo)).ppo.reward_model == str(lora_run.output_dir)
