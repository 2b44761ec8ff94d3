"""``tuneforge data preview``: each record as training renders it, supervised tokens marked, bad ones named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from chat_families import family_tokenizer, save_family_tokenizer

from tuneforge.cli import main
from tuneforge.data.templates import encode_chat_views, render_chat

from conftest import write_jsonl

QWEN3_TWO_TURNS = {
    "messages": [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5.", "reasoning_content": "2 + 3 = 5"},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ]
}


@pytest.fixture
def qwen3(tmp_path: Path) -> Path:
    return save_family_tokenizer("qwen3", tmp_path / "qwen3")


def preview_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict]]:
    code = main(["data", "preview", *args, "--json"])
    out = capsys.readouterr().out
    return code, [json.loads(line) for line in out.splitlines()]


def supervised_text(row: dict) -> list[str]:
    return [row["text"][a:b] for a, b in row["supervised"]]


def test_each_record_is_shown_as_training_renders_it(qwen3: Path, tmp_path: Path, capsys) -> None:
    data = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"prompt": "What is the capital of France?", "completion": "Paris."},
            {"prompt": "And Italy?", "completion": "Rome."},
        ],
    )
    code, rows = preview_json(capsys, str(data), "--model", str(qwen3))
    assert code == 0
    tokenizer = family_tokenizer("qwen3")
    first = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]
    assert [r["line"] for r in rows] == [1, 2] and all(r["error"] is None for r in rows)
    assert rows[0]["text"] == render_chat(tokenizer, first, None)
    assert supervised_text(rows[0]) == ["<think>\n\n</think>\n\nParis.<|im_end|>\n"]
    assert rows[0]["tokens"] == len(tokenizer(rows[0]["text"], add_special_tokens=False)["input_ids"])


def test_a_record_the_template_splits_shows_every_sequence_with_its_reasoning(
    qwen3: Path, tmp_path: Path, capsys
) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", [QWEN3_TWO_TURNS])
    code, rows = preview_json(capsys, str(data), "--model", str(qwen3))
    assert code == 0
    assert [(r["line"], r["sequence"]) for r in rows] == [(1, 0), (1, 1)]
    assert [supervised_text(r) for r in rows] == [
        ["<think>\n2 + 3 = 5\n</think>\n\n5.<|im_end|>\n"],
        ["<think>\n\n</think>\n\nYou are welcome.<|im_end|>\n"],
    ]
    (seqs,) = encode_chat_views(family_tokenizer("qwen3"), [QWEN3_TWO_TURNS["messages"]], None)
    assert [r["tokens"] for r in rows] == [len(s.ids) for s in seqs]  # the very sequences training gets


def test_bad_records_and_untrainable_turns_are_named_by_line_and_fail_the_command(tmp_path: Path, capsys) -> None:
    model = save_family_tokenizer("llama3_1", tmp_path / "llama")
    data = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a", "reasoning_content": "r"},
                ]
            },
            "{not json",
        ],
    )
    code, rows = preview_json(capsys, str(data), "--model", str(model))
    assert code == 1
    assert [r["line"] for r in rows] == [1, 2, 3]
    assert rows[0]["error"] is None
    assert rows[1]["error"].startswith("messages[1].reasoning_content: this model's chat template does not render")
    assert rows[2]["error"] and not rows[2]["text"]


def test_the_recipe_decides_length_and_overlong_policy(qwen3: Path, tmp_path: Path, capsys) -> None:
    long_answer = " ".join(["word"] * 80)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "Say many words", "completion": long_answer}])
    recipe = {"model": {"path": str(qwen3)}, "data": {"sources": [{"path": str(data)}], "max_length": 32}}
    path = tmp_path / "recipe.yaml"
    for policy in ("error", "truncate"):
        recipe["data"]["on_overlong"] = policy
        path.write_text(yaml.safe_dump(recipe))
        code, (row,) = preview_json(capsys, str(data), "--model", str(qwen3), "--recipe", str(path))
        if policy == "error":
            assert code == 1 and "too long after tokenization" in row["error"] and "max_length=32" in row["error"]
        else:
            tokenizer = family_tokenizer("qwen3")
            assert code == 0 and row["error"] is None and row["tokens"] == 32
            assert len(tokenizer(row["text"], add_special_tokens=False)["input_ids"]) == 32  # the cut text, whole
            assert long_answer.startswith(supervised_text(row)[0].split("\n\n")[-1])


def test_without_json_supervised_text_is_marked(qwen3: Path, tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "Capital of France?", "completion": "Paris."}])
    assert main(["data", "preview", str(data), "--model", str(qwen3)]) == 0
    out = capsys.readouterr().out
    assert f"{data}:1" in out
    assert "assistant\n⟦<think>\n\n</think>\n\nParis.<|im_end|>\n⟧" in out


def test_on_a_terminal_supervised_text_is_coloured(qwen3: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich treats the output as a colour terminal
    monkeypatch.delenv("NO_COLOR", raising=False)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "Capital of France?", "completion": "Paris."}])
    assert main(["data", "preview", str(data), "--model", str(qwen3)]) == 0
    out = capsys.readouterr().out
    assert "⟦" not in out
    assert "\x1b[1;32mParis.<|im_end|>" in out  # bold green: supervised
    assert "\x1b[2m<|im_start|>user" in out  # dim: context
