"""The lm-evaluation-harness bridge: two independent implementations of multiple-choice log-likelihood agree.

lm-eval 0.4 (HF backend) loads the model itself — base weights, ``peft=`` adapter, tokenizer — and scores the same
prompts and choices; per item, every choice's log-likelihood must match tuneforge's engine to 1e-4. Offline: the
tasks are local JSONL, translated into inline lm-eval task configs, or an lm-eval YAML of the user's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tuneforge.cli import main
from tuneforge.eval.tasks import TaskError

from conftest import WORDS, write_jsonl

lm_eval = pytest.importorskip("lm_eval")

pytestmark = pytest.mark.slow  # lm-eval's first run imports a lot: ~15 s, then ~2 s per task


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(1)
    rows = []
    for i in range(20):
        words = rng.sample(WORDS, 3)
        choices = [" ".join(reversed(words)), " ".join(words), rng.choice(WORDS), " ".join(rng.sample(WORDS, 2))]
        rows.append({"question": "reverse: " + " ".join(words), "choices": choices, "answer": i % 4})
    write_jsonl(root / "mc.jsonl", rows)
    (root / "mc-text.yaml").write_text(
        "name: mc-text\ntype: multiple_choice\ndata: mc.jsonl\nchat: false\nprompt: '{{item.question}}'\n"
    )
    (root / "mc-chat.yaml").write_text(
        "name: mc-chat\ntype: multiple_choice\ndata: mc.jsonl\nprompt: '{{item.question}}'\n"
    )
    native = root / "native"
    native.mkdir()
    (native / "mc_native.yaml").write_text(
        "task: mc_native\ndataset_path: json\n"
        f"dataset_kwargs:\n  cache_dir: {root / 'datasets'}\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return root


@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    config = peft.LoraConfig(
        r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    out = tmp_path_factory.mktemp("adapter") / "lora"
    peft.get_peft_model(model, config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def both_engines(model: Path, task_file: Path) -> tuple[list[list[float]], list[list[float]], dict, dict]:
    from tuneforge.eval.api import evaluate_model
    from tuneforge.eval.harness import prepare_tasks, run_lm_eval
    from tuneforge.eval.tasks import load_tasks
    from tuneforge.models.refs import resolve_model

    ref = resolve_model(str(model))
    theirs = next(iter(run_lm_eval(ref, prepare_tasks([str(task_file)]), batch_size=8, device="cpu").tasks.values()))
    ours = next(iter(evaluate_model(ref, load_tasks([str(task_file)]), batch_size=8, device="cpu").tasks.values()))
    return [i["responses"] for i in theirs.items], [i["loglik"] for i in ours.items], theirs.values(), ours.values()


@pytest.mark.parametrize("which", ["base", "adapter"])
def test_multiple_choice_logliks_agree_with_lm_eval(tiny_model: Path, adapter: Path, tasks: Path, which: str) -> None:
    theirs, ours, their_values, our_values = both_engines(
        tiny_model if which == "base" else adapter, tasks / "mc-text.yaml"
    )
    assert len(theirs) == len(ours) == 20
    for a, b in zip(theirs, ours):
        assert a == pytest.approx(b, abs=1e-4)
    assert their_values["acc"] == our_values["acc"] and their_values["acc_norm"] == our_values["acc_norm"]


def test_with_a_chat_template_lm_eval_also_scores_the_prompts_last_line_break(tiny_model: Path, tasks: Path) -> None:
    """lm-eval moves the generation prompt's trailing newline into every choice: one constant per item."""
    theirs, ours, their_values, our_values = both_engines(tiny_model, tasks / "mc-chat.yaml")
    for a, b in zip(theirs, ours):
        shift = [x - y for x, y in zip(a, b)]
        assert shift[0] < 0 and max(shift) - min(shift) < 1e-4
    assert their_values["acc"] == our_values["acc"]


def test_cli_harness_runs_lm_eval_yamls_and_tuneforge_tasks_into_one_report(
    capsys: pytest.CaptureFixture, tiny_model: Path, adapter: Path, tasks: Path, tmp_path: Path
) -> None:
    args = ["eval", str(adapter), "--against", str(tiny_model), "--harness", "lm-eval", "--batch-size", "8"]
    args += [
        "--tasks",
        str(tasks / "native" / "mc_native.yaml"),
        str(tasks / "mc-text.yaml"),
        "--out",
        str(tmp_path / "r"),
        "--json",
    ]
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = json.loads(out)["comparisons"]["lora"]
    assert {(r["task"], r["metric"]) for r in rows} == {
        (t, m) for t in ("mc_native", "mc-text") for m in ("acc", "acc_norm")
    }
    assert all(r["low"] <= r["delta"] <= r["high"] for r in rows)
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["candidates"][0]["tasks"]["mc_native"]["engine"] == "lm-eval"
    assert report["candidates"][0]["info"]["adapter"] == str(adapter)


def test_generation_tasks_are_left_to_tuneforges_engine(tmp_path: Path) -> None:
    from tuneforge.eval.harness import prepare_tasks

    write_jsonl(tmp_path / "g.jsonl", [{"prompt": "p", "answer": "a"}])
    (tmp_path / "g.yaml").write_text("type: generation\ndata: g.jsonl\n")
    with pytest.raises(TaskError, match="run this generation task with tuneforge's engine"):
        prepare_tasks([str(tmp_path / "g.yaml")])
