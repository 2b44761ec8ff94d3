"""``tuneforge eval`` / ``tuneforge compare`` end to end on the tiny model, bad input, and evaluation in training runs."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tuneforge.cli import main

from conftest import WORDS, base_recipe, reverse_task, write_jsonl


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    rows = []
    for i in range(24):
        words = rng.sample(WORDS, 3)
        choices = [" ".join(reversed(words)), " ".join(words), " ".join(rng.sample(WORDS, 3)), words[0]]
        rows.append({"question": "reverse: " + " ".join(words), "choices": choices, "answer": 0, "kind": "ab"[i % 2]})
    write_jsonl(root / "reverse_mc.jsonl", rows)
    (root / "reverse-mc.yaml").write_text(
        "name: reverse-mc\ntype: multiple_choice\ndata: reverse_mc.jsonl\nprompt: '{{item.question}}'\ngroup_by: kind\n"
    )
    write_jsonl(root / "reverse_gen.jsonl", [{"messages": r["messages"]} for r in reverse_task(16, seed=5)])
    (root / "reverse-gen.yaml").write_text(
        "name: reverse-gen\ntype: generation\ndata: reverse_gen.jsonl\nmax_new_tokens: 6\nmetrics: [exact_match, rouge_l]\n"
    )
    return root


@pytest.fixture(scope="module")
def twin(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights under another name: a baseline identical to the candidate."""
    out = tmp_path_factory.mktemp("twin") / "twin"
    shutil.copytree(tiny_model, out)
    return out


@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on the tiny model with non-zero weights, saved as PEFT saves it (with the tokenizer)."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("adapter") / "lora"
    peft.get_peft_model(model, config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_against_an_identical_model_is_no_detectable_change(
    capsys: pytest.CaptureFixture, tiny_model: Path, twin: Path, tasks_dir: Path, tmp_path: Path
) -> None:
    tasks = [str(tasks_dir / "reverse-mc.yaml"), str(tasks_dir / "reverse-gen.yaml")]
    code, out, err = run(
        capsys,
        "eval",
        str(tiny_model),
        "--against",
        str(twin),
        "--tasks",
        *tasks,
        "--out",
        str(tmp_path / "r"),
        "--json",
    )
    assert code == 0, err
    summary = json.loads(out)
    rows = summary["comparisons"]["base"]
    assert {(r["task"], r["metric"]) for r in rows} >= {
        ("reverse-mc", "acc"),
        ("reverse-mc", "acc/a"),
        ("reverse-gen", "rouge_l"),
    }
    for r in rows:
        assert r["delta"] == 0 and r["low"] == 0 and r["high"] == 0 and r["verdict"] == "no detectable change"
    for name in ("report.md", "report.png", "report.json", "summary.json"):
        assert (tmp_path / "r" / name).stat().st_size > 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| reverse-mc | acc |" in md and "95% CI of Δ" in md and "![results](report.png)" in md
    saved = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert saved["metrics"]["reverse-mc/acc"]["verdict"] == "no detectable change"

    # The saved report compares again, later, without the models: against its own baseline…
    code, out, _ = run(capsys, "compare", str(tmp_path / "r"), "--json")
    assert code == 0 and json.loads(out)["comparisons"]["base"] == rows
    # …or two saved evaluations against each other (the first is the reference).
    code, out, _ = run(capsys, "compare", str(tmp_path / "r"), str(tmp_path / "r" / "report.json"))
    assert code == 0 and "reverse-mc" in out and "no detectable change" in out


def test_eval_an_adapter_against_its_base(
    capsys: pytest.CaptureFixture, tiny_model: Path, adapter: Path, tasks_dir: Path, tmp_path: Path
) -> None:
    code, out, err = run(
        capsys,
        "eval",
        str(adapter),
        "--against",
        str(tiny_model),
        "--tasks",
        str(tasks_dir / "reverse-mc.yaml"),
        "--out",
        str(tmp_path / "a"),
    )
    assert code == 0, err
    assert "lora vs base" in out and "95% CI of Δ" in out
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    candidate = report["candidates"][0]
    assert candidate["info"]["adapter"] == str(adapter) and candidate["info"]["base"] == str(tiny_model)
    lls = [i["loglik"] for i in candidate["tasks"]["reverse-mc"]["items"]]
    base_lls = [i["loglik"] for i in report["baseline"]["tasks"]["reverse-mc"]["items"]]
    assert lls != base_lls  # the adapter changes the model


def test_eval_without_a_baseline_gives_each_value_an_interval(
    capsys: pytest.CaptureFixture, tiny_model: Path, tmp_path: Path
) -> None:
    code, out, err = run(
        capsys, "eval", str(tiny_model), "--tasks", "general-facts", "--limit", "12", "--out", str(tmp_path / "g")
    )
    assert code == 0, err
    assert "general-facts" in out and "95% CI" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "generall"], "unknown task 'generall' — did you mean 'general'?"),
        (
            ["--tasks", "BAD_YAML"],
            "bad.yaml:3: metrics[0].type: unknown metric 'exact_mach' — did you mean 'exact_match'?",
        ),
        (["--against", "/no/such/model"], "model /no/such/model: no such file or directory"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_1(
    capsys: pytest.CaptureFixture, tiny_model: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "answer": "a"}])
    (tmp_path / "bad.yaml").write_text("type: generation\ndata: d.jsonl\nmetrics: [exact_mach]\n")
    args = [str(tmp_path / "bad.yaml") if a == "BAD_YAML" else a for a in args]
    code, _, err = run(capsys, "eval", str(tiny_model), *args)
    assert code == 1 and err.startswith("error: ") and message in err and "Traceback" not in err


def test_a_model_that_cannot_load_exits_1_without_a_traceback(tmp_path: Path) -> None:
    """Through the real entry point: a directory that is not a model."""
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.txt").write_text("hello")
    env = {**os.environ, "TUNEFORGE_HOME": str(tmp_path / "home")}
    r = subprocess.run(
        [sys.executable, "-m", "tuneforge", "eval", str(tmp_path / "not-a-model"), "--tasks", "general"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 1 and r.stderr.startswith("error: model ") and "not a model directory" in r.stderr
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------ training runs


@pytest.mark.slow  # trains 12 steps and evaluates two models, with MLflow: ~30 s
def test_a_recipe_eval_section_reports_beside_the_model_and_in_mlflow(
    capsys: pytest.CaptureFixture, tiny_model: Path, tasks_dir: Path, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from tuneforge.api import train

    data = write_jsonl(tmp_path / "d.jsonl", reverse_task(80))
    recipe = base_recipe(tiny_model, data, tmp_path / "run", max_steps=12, eval_every=None)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe["tracking"] = {"enabled": True, "uri": uri, "experiment": "eval-test", "register_as": "eval-test-model"}
    recipe["eval"] = {"tasks": [str(tasks_dir / "reverse-mc.yaml")], "every": 6, "batch_size": 16}
    result = train(recipe)

    folder = tmp_path / "run" / "eval"
    for name in ("report.md", "report.png", "report.json", "summary.json"):
        assert (folder / name).is_file()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["model"] == "test" and summary["baseline"] == "base"
    assert {"value", "baseline", "delta", "ci_low", "ci_high", "verdict"} <= set(summary["metrics"]["reverse-mc/acc"])
    assert result.extra["eval"]["comparisons"] and json.loads((tmp_path / "run" / "result.json").read_text())["eval"]

    client = MlflowClient(tracking_uri=uri)
    run_data = client.get_run(result.tracking_run_id).data
    for key in (
        "eval/reverse-mc/acc",
        "eval_baseline/reverse-mc/acc",
        "eval_delta/reverse-mc/acc",
        "eval_delta_low/reverse-mc/acc",
    ):
        assert key in run_data.metrics
    history = client.get_metric_history(result.tracking_run_id, "eval/reverse-mc/acc")
    assert sorted(m.step for m in history) == [6, 12]  # every 6 steps on the live model, then the saved result
    artifacts = {a.path for a in client.list_artifacts(result.tracking_run_id, "eval")}
    assert {"eval/report.md", "eval/report.png", "eval/comparison.json"} <= artifacts

    code, out, _ = run(capsys, "compare", str(tmp_path / "run"))
    assert code == 0 and "run vs base" in out and "reverse-mc" in out  # a run is named by its directory

    # The registered version carries the results (tuneforge.lineage reads eval/summary.json)…
    from tuneforge.tracking import registry

    tags = registry.get_version("eval-test-model", result.model_version, uri=uri).tags
    assert tags["eval.metrics.reverse-mc/acc.verdict"] == summary["metrics"]["reverse-mc/acc"]["verdict"]
    # …and loads by URI: the same model on the same task gives the run's own numbers.
    task = str(tasks_dir / "reverse-mc.yaml")
    code, out, err = run(
        capsys,
        "eval",
        f"models:/eval-test-model/{result.model_version}",
        "--tasks",
        task,
        "--tracking-uri",
        uri,
        "--json",
    )
    assert code == 0, err
    (values,) = json.loads(out)["models"].values()
    assert values == pytest.approx(result.extra["eval"]["values"])


def test_a_bad_eval_section_is_refused_before_training(tiny_model: Path, tmp_path: Path) -> None:
    from tuneforge.api import train
    from tuneforge.errors import RecipeError

    data = write_jsonl(tmp_path / "d.jsonl", reverse_task(20))
    recipe = base_recipe(tiny_model, data, tmp_path / "run")
    recipe["eval"] = {"tasks": ["generall"]}
    with pytest.raises(RecipeError, match="eval.tasks: unknown task 'generall' — did you mean 'general'"):
        train(recipe)
    assert not (tmp_path / "run").exists()
