from __future__ import annotations

import json

import pytest

from tuneforge.data.formats import check_record, detect_format, to_canonical
from tuneforge.data.validate import load_examples, validate_file
from tuneforge.errors import DataError, DataIssue, TuneforgeError

from conftest import write_jsonl


def user(text="hi"):
    return {"role": "user", "content": text}


def bot(text="hello", **kw):
    return {"role": "assistant", "content": text, **kw}


def chat(*msgs, **top):
    return {"messages": list(msgs), **top}


def by_line(report) -> dict[int, list[DataIssue]]:
    out: dict[int, list[DataIssue]] = {}
    for issue in report.issues:
        out.setdefault(issue.line, []).append(issue)
    return out


def fields(issues) -> set[str]:
    return {i.field for i in issues}


def test_every_error_class_reported_at_its_line(tmp_path):
    rows = [
        chat(user(), bot()),  # 1 good
        "",  # 2 blank: skipped but counted
        '{"messages": [',  # 3 invalid JSON
        {"messages": [user(), {"role": "asistant", "content": "x"}]},  # 4 misspelled role, no assistant
        chat(user(), bot(), extra=1),  # 5 extra top-level key
        chat(user(123), bot()),  # 6 wrong type
        chat(user("   "), bot("")),  # 7 whitespace / empty content
        chat(user(), {"role": "system", "content": "late"}, bot()),  # 8 system not first
        chat(bot("first"), user(), bot()),  # 9 conversation starts with assistant
        chat(user(), bot(weight=2), {"role": "user", "content": "x", "weight": 1}, bot()),  # 10 weights
        chat(user(), bot(weight=0)),  # 11 nothing to learn from
        {"mesages": [user(), bot()]},  # 12 misspelled top-level key
        chat(user(), {"role": "assistant", "content": "x", "contnet": "y"}),  # 13 misspelled message key
        chat(user(), {"role": "tool", "content": "42"}, bot()),  # 14 tool without a tool call
        chat(user()),  # 15 no assistant message
        "[1, 2]",  # 16 not an object
    ]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    report = validate_file(p)
    lines = by_line(report)

    assert report.format == "messages"
    assert report.n_records == 15 and report.n_bad == 14
    assert sorted(lines) == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    assert lines[3][0].problem.startswith("invalid JSON")
    assert fields(lines[4]) == {"messages[1].role", "messages"}
    role = next(i for i in lines[4] if i.field == "messages[1].role")
    assert "asistant" in role.problem and "did you mean 'assistant'" in role.expected
    assert fields(lines[5]) == {"extra"} and lines[5][0].problem == "unknown key"
    assert fields(lines[6]) == {"messages[0].content"} and "number" in lines[6][0].problem
    assert {(i.field, i.problem) for i in lines[7]} == {
        ("messages[0].content", "is only whitespace"),
        ("messages[1].content", "is empty"),
    }
    assert fields(lines[8]) == {"messages[1].role"} and "system" in lines[8][0].problem
    assert fields(lines[9]) == {"messages[0].role"} and "'user'" in lines[9][0].expected
    assert fields(lines[10]) == {"messages[1].weight", "messages[2].weight"}
    assert fields(lines[11]) == {"messages"} and "weight 0" in lines[11][0].problem
    assert fields(lines[12]) == {"messages", "mesages"}
    assert "did you mean 'messages'" in next(i for i in lines[12] if i.field == "mesages").expected
    assert fields(lines[13]) == {"messages[1].contnet"}
    assert "did you mean 'content'" in lines[13][0].expected
    assert fields(lines[14]) == {"messages[1].role"} and "tool" in lines[14][0].problem
    assert fields(lines[15]) == {"messages"} and "no assistant" in lines[15][0].problem
    assert lines[16][0].problem == "record is an array"
    assert [line for line, _ in report.examples] == [1]


def test_issue_text_names_file_line_field_and_expectation(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [chat(user(), bot()), chat(user(), {"role": "assistant", "content": 5})])
    report = validate_file(p)
    (issue,) = report.issues
    assert str(issue) == f"{p}:2: messages[1].content: is a number (expected a non-empty string)"
    summary = report.summary()
    assert "2 record(s)" in summary and "1 good, 1 bad" in summary and "messages[*].content" in summary
    assert report.render().splitlines()[0] == str(issue)


def test_tool_calls_and_tools_are_valid_chat(tmp_path):
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    record = chat(
        {"role": "system", "content": "use tools"},
        user("1+1?"),
        {"role": "assistant", "content": None, "tool_calls": [call], "weight": 0},
        {"role": "tool", "content": "2", "tool_call_id": "c1"},
        bot("2", weight=1),
        tools=[{"type": "function", "function": {"name": "add"}}],
    )
    assert check_record(record, "messages") == []
    canonical = to_canonical(record, "messages")
    assert canonical["tools"] == record["tools"] and canonical["messages"][2]["weight"] == 0

    bad = chat(user(), {"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]})
    assert {f for f, _, _ in check_record(bad, "messages")} == {"messages[1].tool_calls[0]", "messages[1].content"}


def test_formats_detected_and_canonicalised():
    pc = {"prompt": "2+2?", "completion": "4"}
    assert detect_format(pc) == "prompt_completion"
    assert to_canonical(pc, "prompt_completion") == {"messages": [user("2+2?"), bot("4")]}
    assert detect_format({"text": "doc"}) == "text"
    assert to_canonical({"text": "doc"}, "text") == {"text": "doc"}
    assert detect_format({"foo": 1}) is None and detect_format([1]) is None

    pairs = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    assert detect_format(pairs) == "preference" and check_record(pairs, "preference") == []
    expected = {"prompt": [user("q")], "chosen": [bot("good")], "rejected": [bot("bad")]}
    assert to_canonical(pairs, "preference") == expected

    dpo = {
        "input": {"messages": [{"role": "system", "content": "s"}, user("q")]},
        "preferred_output": [bot("good")],
        "non_preferred_output": [bot("bad")],
    }
    assert detect_format(dpo) == "preference" and check_record(dpo, "preference") == []
    assert to_canonical(dpo, "preference") == {
        "prompt": [{"role": "system", "content": "s"}, user("q")],
        "chosen": [bot("good")],
        "rejected": [bot("bad")],
    }
    listed = {"prompt": [user("q")], "chosen": [bot("good")], "rejected": [bot("bad")]}
    assert check_record(listed, "preference") == [] and to_canonical(listed, "preference") == listed


def test_preference_errors():
    dpo = {
        "input": {"messages": [user("q"), bot("a")], "extra": 1},
        "preferred_output": [user("not a response")],
        "non_preferred_output": [user("not a response")],
    }
    found = {f: (p, e) for f, p, e in check_record(dpo, "preference")}
    assert set(found) == {
        "input.extra",
        "input.messages[1].role",
        "preferred_output[0].role",
        "non_preferred_output[0].role",
        "non_preferred_output",
    }
    assert "ends with 'assistant'" in found["input.messages[1].role"][0]
    assert "identical" in found["non_preferred_output"][0]

    pairs = {"prompt": "", "chosen": [bot("x", weight=1)], "rejected": 3}
    found = {f: (p, e) for f, p, e in check_record(pairs, "preference")}
    assert set(found) == {"prompt", "chosen[0].weight", "rejected"}
    missing = {f for f, _, _ in check_record({"prompt": "q", "chosen": "a"}, "preference")}
    assert missing == {"rejected"}


def test_auto_format_reports_other_formats_explicit_format_does_not_guess(tmp_path):
    rows = [{"prompt": "p", "completion": "c"}, {"text": "doc"}, {"prompt": "p2", "completion": "c2"}]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    report = validate_file(p)
    assert report.format == "prompt_completion" and report.n_bad == 1
    (issue,) = report.issues
    assert issue.line == 2 and issue.problem == "wrong format: a text record" and "line 1" in issue.expected

    explicit = validate_file(p, fmt="text")
    assert explicit.format == "text"
    assert {(i.line, i.field) for i in explicit.issues} == {
        (1, "text"),
        (1, "prompt"),
        (1, "completion"),
        (3, "text"),
        (3, "prompt"),
        (3, "completion"),
    }
    with pytest.raises(TuneforgeError, match="did you mean 'messages'"):
        validate_file(p, fmt="mesages")


def test_undetectable_first_record_and_empty_file(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"mesages": []}, chat(user(), bot())])
    report = validate_file(p)
    assert [(i.line, i.field) for i in report.issues] == [(1, "")]
    assert report.issues[0].problem.startswith("unknown format") and "mesages" in report.issues[0].problem
    assert "did you mean 'messages'" in report.issues[0].expected
    assert report.format == "messages" and len(report.examples) == 1

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    report = validate_file(empty)
    assert report.n_records == 0 and not report.ok and "no records" in report.issues[0].problem


def test_allow_extra_keys_for_grader_data(tmp_path):
    rows = [chat(user(), bot(), reference="4"), chat(user(), bot(), refrence="4")]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    strict = validate_file(p)
    assert strict.n_bad == 2
    allowed = validate_file(p, allow_extra=["reference"])
    assert [i.line for i in allowed.issues] == [2]
    assert allowed.issues[0].field == "refrence" and "did you mean 'reference'" in allowed.issues[0].expected
    assert allowed.examples[0][1]["reference"] == "4"  # extra keys travel with the example
    anything = validate_file(p, allow_extra=["*"])
    assert anything.ok and anything.examples[1][1]["refrence"] == "4"


def test_token_length_limit(tmp_path):
    rows = [chat(user("a b"), bot("c")), chat(user("a " * 20), bot("b " * 20)), {"text": "x"}]
    p = write_jsonl(tmp_path / "d.jsonl", rows)

    def words(example: dict) -> int:  # a whitespace "tokenizer" over all message contents
        return sum(len(m["content"].split()) for m in example["messages"])

    report = validate_file(p, fmt="messages", token_length=words, max_tokens=10)
    lines = by_line(report)
    assert sorted(lines) == [2, 3]
    assert lines[2][0].problem == "too long after tokenization: 40 tokens" and "10" in lines[2][0].expected
    assert "1 × too long after tokenization" in report.summary()  # grouped by kind, not by count
    assert validate_file(p, fmt="messages", token_length=words, max_tokens=40).n_bad == 1


def test_csv_lines_survive_multiline_fields(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text(
        'prompt,completion\n"multi\nline\nprompt",ok\nfine,\n"a",b\n',
        newline="",
    )
    report = validate_file(p)
    assert [(i.line, i.field, i.problem) for i in report.issues] == [(5, "completion", "is empty")]
    assert [line for line, _ in report.examples] == [2, 6]


def test_json_and_parquet_use_record_numbers(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [chat(user(), bot()), chat(user(), bot("")), chat(user(), bot())]
    j = tmp_path / "d.json"
    j.write_text(json.dumps({"data": rows}, indent=2))
    assert [(i.line, i.field) for i in validate_file(j).issues] == [(2, "messages[1].content")]
    q = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), q)
    assert [(i.line, i.field) for i in validate_file(q).issues] == [(2, "messages[1].content")]


def test_load_examples_refuses_bad_data_with_full_report(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "p", "completion": "c"}])
    assert load_examples(good) == [{"messages": [user("p"), bot("c")]}]

    bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"prompt": "p", "completion": "c"}, {"prompt": "p"}])
    with pytest.raises(DataError) as e:
        load_examples(bad)
    assert e.value.exit_code == 1
    assert [(i.line, i.field) for i in e.value.issues] == [(1, ""), (3, "completion")]
    assert f"{bad}:3: completion: missing" in str(e.value) and "1 good, 2 bad" in str(e.value)
