"""Constitutional AI pairs: principles, prompt shapes, the critique-revise loop against a real server, the CLI."""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from tuneforge.cli import main
from tuneforge.data.validate import validate_file
from tuneforge.errors import DataError, RecipeError, TuneforgeError
from tuneforge.rewards.constitutional import (
    Principle,
    Settings,
    build_model_client,
    choose_principles,
    clean_reply,
    load_principles,
    parse_principles,
    read_prompts,
    run_constitutional,
)
from tuneforge.rewards.judge import LocalJudge, OpenAIJudge

from conftest import ChatError, ChatServer, base_recipe, free_port, read_jsonl, write_jsonl

# Each principle's requests carry a tag the test server recognises; the revision it returns applies the tag's
# transformation to the answer it was shown, so every expected pair can be computed by hand.
TRANSFORMS = {"upper": str.upper, "bang": lambda s: s + "!", "polite": lambda s: "please, " + s}
PRINCIPLES = [
    Principle(
        tag, f"CRITIQUE {tag}: where does your answer fall short on {tag}?", f"REVISE {tag}: rewrite it to be {tag}."
    )
    for tag in TRANSFORMS
]
_REQUEST = re.compile(r"^(CRITIQUE|REVISE) (\w+):")

pytestmark = pytest.mark.usefixtures("no_ambient_openai")  # no OpenAI key or endpoint from the shell


def answer_to(question: str) -> str:
    return f"you said {question}"


class ModelServer(ChatServer):
    """A deterministic chat model behind a real OpenAI-compatible HTTP server (conftest's ``ChatServer``).

    It answers by echoing the question, critiques by naming a flaw of the answer it was shown, and revises by
    transforming that answer (prefixed "Revision:", as models do). Questions with a marker misbehave: FAIL
    (500 on the answer), FAILCRIT (500 on the critique), EMPTY (blank revision), SAME (revision = answer),
    BLANK (empty answer), QUIET (empty critique).
    """

    def reply(self, body: dict) -> str | ChatError:
        messages = body["messages"]
        question = next(m["content"] for m in messages if m["role"] == "user")
        kind = _REQUEST.match(messages[-1]["content"])
        if kind is None:
            if "FAIL" in question and "FAILCRIT" not in question:
                return ChatError("the model crashed")
            return "" if "BLANK" in question else answer_to(question)
        if kind.group(1) == "CRITIQUE":
            if "FAILCRIT" in question:
                return ChatError("critic offline")
            return "" if "QUIET" in question else f"Flaw: '{messages[-2]['content']}' is not {kind.group(2)} enough."
        shown = messages[-4]["content"]
        if "EMPTY" in question:
            return "  "
        if "SAME" in question:
            return shown
        return "Revision: " + TRANSFORMS[kind.group(2)](shown)

    def conversations(self, question: str) -> list[list[dict]]:
        """Every conversation sent for one question, in the order the pipeline must have sent them."""
        with self.lock:
            found = [r["body"]["messages"] for r in self.requests if r["body"]["messages"][0]["content"] == question]
        return sorted(found, key=len)


@pytest.fixture(scope="module")
def server():
    with ModelServer() as s:
        yield s


def user(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}]}


def client(server: ModelServer, **kw: object) -> OpenAIJudge:
    judge = build_model_client("test-model", base_url=server.url, max_retries=0, **kw)
    assert isinstance(judge, OpenAIJudge)
    return judge


def expected_pair(question: str, tags: list[str]) -> dict:
    revised = answer_to(question)
    for tag in tags:
        revised = TRANSFORMS[tag](revised)
    return {
        "input": {"messages": [{"role": "user", "content": question}]},
        "preferred_output": [{"role": "assistant", "content": revised}],
        "non_preferred_output": [{"role": "assistant", "content": answer_to(question)}],
    }


# -------------------------------------------------------------------------------------------- principles


def test_shipped_constitution_loads() -> None:
    principles = load_principles()
    names = [p.name for p in principles]
    assert {"helpful", "harmless", "honest"} <= set(names) and len(names) == len(set(names))
    for p in principles:
        assert "previous response" in p.critique_request and p.revision_request.startswith("Rewrite")


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "principles:\n  - name: a\n    critique_request: c\n",
            "principles[0].revision_request: missing (expected a non-empty string)",
        ),
        (
            "principles:\n  - name: a\n    critique_reqest: c\n    revision_request: r\n",
            "did you mean 'critique_request'?",
        ),
        (
            "principles:\n  - {name: a, critique_request: c, revision_request: r}\n  - {name: a, critique_request: c, revision_request: r}\n",
            "principles[1].name: duplicate name 'a' (also principles[0])",
        ),
        ("principles: []\n", "principles: is empty"),
        (
            "principles:\n  - name: a\n    critique_request: 3\n    revision_request: r\n",
            "principles[0].critique_request: is a number",
        ),
        ("rules: []\n", "rules: unknown key"),
        ("principles: [\n", "(line 2, column 1): not valid YAML"),
    ],
)
def test_principle_files_errors_name_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "constitution.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_principles(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_principles_from_a_json_list(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"name": " x ", "critique_request": "c?", "revision_request": "r!"}]))
    assert load_principles(path) == [Principle("x", "c?", "r!")]
    with pytest.raises(RecipeError, match="principles file not found"):
        load_principles(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match=r"\[0\]: is a string"):
        parse_principles(["just text"])


def test_principle_choice_is_seeded_per_prompt() -> None:
    keys = [f"prompt {i}" for i in range(40)]
    first = [choose_principles(PRINCIPLES, 1, 7, k)[0].name for k in keys]
    assert first == [choose_principles(PRINCIPLES, 1, 7, k)[0].name for k in keys]  # same seed, same draw
    assert set(first) == set(TRANSFORMS)  # the draw varies across prompts
    assert first != [choose_principles(PRINCIPLES, 1, 8, k)[0].name for k in keys]
    two = choose_principles(PRINCIPLES, 2, 0, "x")
    assert len(two) == 2 and two[0] != two[1]
    assert choose_principles(PRINCIPLES, None, 0, "x") == PRINCIPLES  # all, in the file's order


def test_clean_reply() -> None:
    assert clean_reply("<think>plan it</think>\n  Hello ") == "Hello"
    assert clean_reply("<think>cut off by max tokens") == ""
    assert clean_reply("**Revision:** Better text", revision=True) == "Better text"
    assert clean_reply("Revision: kept as text") == "Revision: kept as text"  # only revisions lose the label


# ----------------------------------------------------------------------------------------------- prompts


def test_prompt_shapes(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q1"}],
                "answer": "kept",
            },
            {
                "messages": [
                    {"role": "user", "content": "q2"},
                    {"role": "assistant", "content": "a", "weight": 1},
                    {"role": "user", "content": "q2b"},
                    {"role": "assistant", "content": "dropped", "weight": 1},
                ]
            },
            {"prompt": "q3", "completion": "ignored"},
            {"prompt": "q4"},
        ],
    )
    prompts = read_prompts(path)
    assert [p.line for p in prompts] == [1, 2, 3, 4]
    assert prompts[0].messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q1"}]
    assert prompts[1].messages == [
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q2b"},
    ]  # last answer dropped, weights removed
    assert prompts[2].messages == [{"role": "user", "content": "q3"}]
    assert prompts[3].input == {"messages": [{"role": "user", "content": "q4"}]}


def test_bad_prompts_are_all_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps(user("fine")),
                json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "x"}]}),
                "{not json",
                json.dumps({"question": "where is the prompt?"}),
                json.dumps({"prompt": ""}),
                json.dumps({"messages": [{"role": "assistant", "content": "only an answer"}]}),
            ]
        )
        + "\n"
    )
    with pytest.raises(DataError) as e:
        read_prompts(path)
    text = str(e.value)
    assert f"{path}: 5 of 6 prompt record(s) are bad" in text
    assert f"{path}:2: messages[1].role: unknown role 'robot'" in text
    assert f"{path}:3: invalid JSON" in text
    assert f"{path}:4: no prompt in the record (keys: question)" in text
    assert f"{path}:5: prompt: is empty (expected a non-empty string)" in text
    assert f"{path}:6: messages[0].role: conversation starts with 'assistant'" in text


# ------------------------------------------------------------------------------------ against an endpoint


def test_pairs_are_revision_over_original_and_the_conversation_follows_the_paper(
    server: ModelServer, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("CAI_KEY", "sk-cai-test")
    questions = [f"reverse: word{i} other{i}" for i in range(5)]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [user(q) for q in questions])
    out = tmp_path / "pairs.jsonl"
    settings = Settings(revisions=None, seed=3, temperature=0.0, max_tokens=40, concurrency=4)
    summary = run_constitutional(prompts, out, client(server, api_key_env="CAI_KEY"), PRINCIPLES, settings)

    assert summary.written == 5 and not summary.skipped and summary.prompts == 5
    assert read_jsonl(out) == [expected_pair(q, ["upper", "bang", "polite"]) for q in questions]  # in prompt order
    report = validate_file(out, "preference")
    assert report.ok and report.n_records == 5
    assert not (tmp_path / "pairs.jsonl.partial").exists()

    q = questions[2]
    talks = server.conversations(q)
    assert len(talks) == 1 + 2 * len(PRINCIPLES)
    prompt, answer = [{"role": "user", "content": q}], answer_to(q)
    assert talks[0] == prompt
    current = answer
    for p in PRINCIPLES:  # each round: prompt, current answer, critique request, critique, revision request
        critique_talk = next(t for t in talks if t[-1]["content"] == p.critique_request)
        assert critique_talk == [
            *prompt,
            {"role": "assistant", "content": current},
            {"role": "user", "content": p.critique_request},
        ]
        revision_talk = next(t for t in talks if t[-1]["content"] == p.revision_request)
        critique = f"Flaw: '{current}' is not {p.name} enough."
        assert revision_talk == [
            *critique_talk,
            {"role": "assistant", "content": critique},
            {"role": "user", "content": p.revision_request},
        ]
        current = TRANSFORMS[p.name](current)

    sent = [r for r in server.requests if r["body"]["messages"][0]["content"] == q]
    assert {r["authorization"] for r in sent} == {"Bearer sk-cai-test"}
    body = sent[0]["body"]
    assert body["temperature"] == 0.0 and body["max_completion_tokens"] == 40 and body["model"] == "test-model"
    assert len({r["body"]["seed"] for r in sent}) == 1  # one seed per prompt, the same at every step


def test_one_principle_per_prompt_follows_the_seeded_draw(server: ModelServer, tmp_path: Path) -> None:
    questions = [f"draw {i}" for i in range(12)]
    prompts = read_prompts(write_jsonl(tmp_path / "prompts.jsonl", [user(q) for q in questions]))
    out = tmp_path / "pairs.jsonl"
    run_constitutional(prompts, out, client(server), PRINCIPLES, Settings(revisions=1, seed=11, temperature=0))
    pairs = read_jsonl(out)
    used = []
    for prompt, pair in zip(prompts, pairs):
        [chosen] = choose_principles(PRINCIPLES, 1, 11, prompt.key)
        used.append(chosen.name)
        assert pair == expected_pair(prompt.messages[0]["content"], [chosen.name])
        assert len(server.conversations(prompt.messages[0]["content"])) == 3
    assert len(set(used)) > 1


def test_failures_are_counted_logged_and_never_fatal(server: ModelServer, tmp_path: Path, caplog) -> None:
    questions = [
        "ok one",
        "FAIL now",
        "FAILCRIT later",
        "EMPTY revision",
        "SAME again",
        "BLANK answer",
        "QUIET critic",
        "ok two",
    ]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [user(q) for q in questions])
    out, critiques = tmp_path / "pairs.jsonl", tmp_path / "critiques.jsonl"
    with caplog.at_level(logging.WARNING, logger="tuneforge.rewards.constitutional"):
        summary = run_constitutional(
            prompts,
            out,
            client(server),
            PRINCIPLES[:1],
            Settings(revisions=1, temperature=0, concurrency=3),
            critiques=critiques,
        )
    assert summary.written == 2
    assert summary.skipped == Counter(call_failed=2, empty_revision=1, unchanged=1, empty_answer=1, empty_critique=1)
    assert read_jsonl(out) == [expected_pair("ok one", ["upper"]), expected_pair("ok two", ["upper"])]
    assert validate_file(out, "preference").ok
    assert f"{prompts}:2: skipped (call_failed): the answer call failed: InternalServerError" in caplog.text
    assert f"{prompts}:3: skipped (call_failed): the critique (upper) call failed" in caplog.text
    assert "skipped 6 of 8 prompt(s): 2 call_failed" in summary.render()

    inspected = read_jsonl(critiques)  # every exchange, skipped ones included, in prompt order
    assert [e["line"] for e in inspected] == list(range(1, 9))
    assert inspected[0]["steps"] == [
        {
            "principle": "upper",
            "critique": "Flaw: 'you said ok one' is not upper enough.",
            "revision": "YOU SAID OK ONE",
        }
    ]
    assert inspected[3]["skipped"] == "empty_revision" and inspected[4]["skipped"] == "unchanged"


def test_resume_skips_done_prompts_and_recovers_an_interrupted_run(server: ModelServer, tmp_path: Path) -> None:
    out = tmp_path / "pairs.jsonl"
    settings = Settings(revisions=1, seed=0, temperature=0)
    first = write_jsonl(tmp_path / "prompts.jsonl", [user(f"resume {i}") for i in range(3)])
    assert run_constitutional(first, out, client(server), PRINCIPLES, settings).written == 3
    before = read_jsonl(out)

    # An interrupted second run left one finished pair (and a torn line) in the partial log.
    more = [user(f"resume {i}") for i in range(6)]
    prompts = read_prompts(write_jsonl(tmp_path / "prompts.jsonl", more))
    [chosen] = choose_principles(PRINCIPLES, 1, 0, prompts[4].key)
    recovered = expected_pair("resume 4", [chosen.name])
    (tmp_path / "pairs.jsonl.partial").write_text(json.dumps({"line": 5, "record": recovered}) + '\n{"line": 6, "rec')
    n_requests = len(server.requests)
    summary = run_constitutional(prompts, out, client(server), PRINCIPLES, settings)
    assert (summary.resumed, summary.written) == (3, 3)  # 3 already in out; 1 recovered + 2 new
    assert len(server.requests) - n_requests == 2 * 3  # only prompts 4 and 6 were asked (3 calls each)
    pairs = read_jsonl(out)
    assert pairs[:3] == before and pairs[4] == recovered and len(pairs) == 6
    assert not (tmp_path / "pairs.jsonl.partial").exists()

    n_requests = len(server.requests)
    assert run_constitutional(prompts, out, client(server), PRINCIPLES, settings).resumed == 6
    assert len(server.requests) == n_requests  # nothing left to do
    assert run_constitutional(prompts, out, client(server), PRINCIPLES, settings, overwrite=True).written == 6


def test_foreign_output_is_not_clobbered(server: ModelServer, tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [user("q")])
    out = write_jsonl(tmp_path / "mine.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(TuneforgeError, match=r"mine\.jsonl:1: .*choose another --out, or pass --overwrite"):
        run_constitutional(prompts, out, client(server), PRINCIPLES)
    assert read_jsonl(out) == [{"messages": [{"role": "user", "content": "x"}]}]
    with pytest.raises(TuneforgeError, match="give the file a .jsonl name"):
        run_constitutional(prompts, tmp_path / "pairs.txt", client(server), PRINCIPLES)
    with pytest.raises(TuneforgeError, match="--revisions: 4 is not between 1 and the 3"):
        run_constitutional(prompts, tmp_path / "p.jsonl", client(server), PRINCIPLES, Settings(revisions=4))


def test_a_dead_endpoint_stops_the_run_instead_of_failing_every_prompt(tmp_path: Path) -> None:
    port = free_port()  # a port nobody listens on
    judge = build_model_client("m", base_url=f"http://127.0.0.1:{port}/v1", timeout=2, max_retries=0)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [user(f"q{i}") for i in range(20)])
    with pytest.raises(TuneforgeError, match="failed on 8 prompts before any succeeded.*APIConnectionError"):
        run_constitutional(prompts, tmp_path / "pairs.jsonl", judge, PRINCIPLES, Settings(concurrency=2))
    assert not (tmp_path / "pairs.jsonl").exists() and not (tmp_path / "pairs.jsonl.partial").exists()


def test_backend_choice_and_credentials(tiny_model: Path, monkeypatch) -> None:
    assert isinstance(build_model_client(str(tiny_model)), LocalJudge)
    assert isinstance(build_model_client(str(tiny_model), base_url="http://127.0.0.1:1/v1"), OpenAIJudge)
    with pytest.raises(TuneforgeError, match="not a local model directory and no endpoint is configured"):
        build_model_client("gpt-x")
    with pytest.raises(TuneforgeError, match="--api-key-env: the environment variable NOPE_KEY is not set"):
        build_model_client("gpt-x", api_key_env="NOPE_KEY")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-ambient")
    assert build_model_client("gpt-x")._client.api_key == "sk-ambient"


# --------------------------------------------------------------------------------------------------- CLI


def test_cli_end_to_end(server: ModelServer, tmp_path: Path, capsys) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [user("cli one"), user("cli two"), user("EMPTY cli")])
    principles = tmp_path / "constitution.yaml"
    principles.write_text(
        "principles:\n"
        + "".join(
            f"  - name: {p.name}\n    critique_request: '{p.critique_request}'\n    revision_request: '{p.revision_request}'\n"
            for p in PRINCIPLES
        )
    )
    args = [
        "constitutional",
        str(prompts),
        "--model",
        "test-model",
        "--base-url",
        server.url,
        "--principles",
        str(principles),
        "--revisions",
        "all",
        "--temperature",
        "0",
        "--max-tokens",
        "30",
        "--concurrency",
        "2",
        "--seed",
        "5",
    ]
    assert main(args) == 0
    out = tmp_path / "prompts.pairs.jsonl"
    assert read_jsonl(out) == [expected_pair(q, ["upper", "bang", "polite"]) for q in ("cli one", "cli two")]
    printed = capsys.readouterr().out
    assert f"wrote 2 pair(s) to {out}" in printed and "skipped 1 of 3 prompt(s): 1 empty_revision" in printed
    assert main(["data", "validate", str(out), "--format", "preference"]) == 0

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(user("fine")) + "\n" + json.dumps({"messages": [{"role": "user"}]}) + "\n")
    assert (
        main(
            [
                "constitutional",
                str(bad),
                "--model",
                "test-model",
                "--base-url",
                server.url,
                "--out",
                str(tmp_path / "x.jsonl"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert f"{bad}:2: messages[0].content: missing (expected a non-empty string)" in err
    assert not (tmp_path / "x.jsonl").exists()

    assert main(["constitutional", str(prompts), "--model", "gpt-x", "--out", str(tmp_path / "y.jsonl")]) == 2
    assert "no endpoint is configured" in capsys.readouterr().err
    assert main(["constitutional", str(prompts), "--model", "m", "--base-url", server.url, "--revisions", "7"]) == 2
    assert "--revisions: 7 is not between 1 and the 5 principle(s)" in capsys.readouterr().err  # shipped constitution
    everything_fails = write_jsonl(tmp_path / "all_bad.jsonl", [user("SAME a"), user("SAME b")])
    assert (
        main(
            [
                "constitutional",
                str(everything_fails),
                "--model",
                "m",
                "--base-url",
                server.url,
                "--principles",
                str(principles),
            ]
        )
        == 1
    )
    assert "no pairs made" in capsys.readouterr().out and not (tmp_path / "all_bad.pairs.jsonl").exists()


# ---------------------------------------------------------------------------------- local model, training


def test_local_model_runs_the_whole_loop(tiny_model: Path, tmp_path: Path) -> None:
    import torch

    torch.set_num_threads(1)
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [user("reverse: apple banana cherry"), user("reverse: fox golf hotel"), {"prompt": "reverse: kilo lima mango"}],
    )
    out, critiques = tmp_path / "pairs.jsonl", tmp_path / "critiques.jsonl"
    summary = run_constitutional(
        prompts,
        out,
        build_model_client(str(tiny_model)),
        load_principles(),
        Settings(revisions=2, temperature=1.0, max_tokens=8),
        critiques=critiques,
    )
    assert summary.written + sum(summary.skipped.values()) == 3
    assert not summary.skipped["call_failed"], summary.errors
    inspected = read_jsonl(critiques)
    assert len(inspected) == 3 and all(e["original"] is not None for e in inspected)
    # Sampled (seeded) gibberish is rarely empty, so the critique and revision turns really ran locally.
    assert any(step["critique"] and step["revision"] for e in inspected for step in e["steps"])
    if summary.written:
        report = validate_file(out, "preference")
        assert report.ok and report.n_records == summary.written
    else:
        assert not out.exists()


@pytest.mark.slow
def test_constitutional_pairs_train_with_dpo(server: ModelServer, tiny_model: Path, tmp_path: Path) -> None:
    import tuneforge

    words = ["apple", "banana", "cherry", "delta", "echo", "fox", "golf", "hotel"]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [user(f"{a} {b}") for a, b in zip(words, reversed(words))])
    out = tmp_path / "pairs.jsonl"
    summary = run_constitutional(prompts, out, client(server), PRINCIPLES, Settings(revisions=1, temperature=0))
    assert summary.written == 8 and validate_file(out, "preference").ok

    recipe = base_recipe(tiny_model, out, tmp_path / "run", max_steps=2, global_batch_size=4, log_every=1)
    recipe["method"] = "dpo"
    recipe["data"].update(max_length=128, val_fraction=0, on_overlong="truncate")
    recipe["data"]["sources"][0]["format"] = "preference"
    result = tuneforge.train(recipe, progress=False)
    assert [h["step"] for h in result.history] == [1, 2]
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # DPO starts at policy == reference
    assert math.isfinite(result.history[1]["loss"]) and result.output_dir.is_dir()
