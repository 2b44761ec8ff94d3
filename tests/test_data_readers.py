from __future__ import annotations

import json

import pytest

from tuneforge.data.readers import RawRecord, read_records
from tuneforge.errors import TuneforgeError

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "weight": 1}]}


def _lines(records: list[RawRecord]) -> list[int]:
    return [r.line for r in records]


def test_jsonl_counts_blank_lines_and_keeps_reading_after_bad_json(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(
        json.dumps(CHAT) + "\n"  # 1
        "\n"  # 2 blank
        "   \n"  # 3 whitespace only
        '{"text": "a"\n'  # 4 broken
         + json.dumps({"text": "b"}) + "\n"  # 5
    )
    records = list(read_records(p))
    assert _lines(records) == [1, 4, 5]
    assert records[0].value == CHAT and records[0].error is None
    assert records[1].value is None and records[1].error.startswith("invalid JSON")
    assert records[2].value == {"text": "b"}
    assert all(r.path == str(p) for r in records)


def test_jsonl_bad_utf8_spoils_only_its_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n{"text": "\xc3\xa9t\xc3\xa9"}\n')
    records = list(read_records(p))
    assert [r.error is None for r in records] == [True, False, True]
    assert "UTF-8" in records[1].error
    assert records[2].value == {"text": "été"}


def test_json_array_and_data_object(tmp_path):
    rows = [{"text": "a"}, {"text": "b"}, CHAT]
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps(rows, indent=2))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": rows}))
    for p in (arr, wrapped):
        records = list(read_records(p))
        assert [r.value for r in records] == rows
        assert _lines(records) == [1, 2, 3]  # record numbers, not file lines


def test_json_invalid_document_and_wrong_top_level(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"text": "a"},\n  {"text": }\n]\n')
    (rec,) = list(read_records(bad))
    assert rec.error is not None and "line 3" in rec.error and rec.line == 3

    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"text": "a"}))
    (rec,) = list(read_records(obj))
    assert rec.error is not None and "array" in rec.error


def test_csv_header_counts_and_multiline_fields(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text(
        "prompt,completion\n"  # 1
        "hi,hello\n"  # 2
        '"two\nline prompt","and a\nthree\nline answer"\n'  # 3-6: three newlines inside quotes
        "\n"  # 7 blank
        "short,row,extra\n"  # 8 wrong width
        "last,one\n",  # 9
        newline="",
    )
    records = list(read_records(p))
    assert _lines(records) == [2, 3, 8, 9]
    assert records[1].value == {"prompt": "two\nline prompt", "completion": "and a\nthree\nline answer"}
    assert records[2].error == "wrong number of CSV fields: 3, the header has 2"
    assert records[3].value == {"prompt": "last", "completion": "one"}


def test_csv_crlf_bom_and_json_messages_column(tmp_path):
    p = tmp_path / "d.csv"
    good = json.dumps(CHAT["messages"]).replace('"', '""')
    text = f'messages\r\n"{good}"\r\n"[not json"\r\n'
    p.write_bytes("\ufeff".encode() + text.encode())
    records = list(read_records(p))
    assert _lines(records) == [2, 3]
    assert records[0].value == CHAT  # decoded from the JSON string, BOM not part of the column name
    assert records[1].error is not None and "messages" in records[1].error


def test_csv_field_longer_than_default_limit(tmp_path):
    p = tmp_path / "d.csv"
    doc = "word " * 40_000  # 200k characters, above csv's 128 KiB default
    p.write_text(f'text\n"{doc}"\n')
    (rec,) = list(read_records(p))
    assert rec.value == {"text": doc}


def test_parquet_nested_and_json_string_messages(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [
        CHAT,  # has weight on the assistant message ...
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},  # ... this has none
    ]
    nested = tmp_path / "nested.parquet"
    pq.write_table(pa.Table.from_pylist(rows), nested)
    records = list(read_records(nested))
    assert _lines(records) == [1, 2]
    # Arrow fills missing struct fields with null; the reader must give the records back as written.
    assert [r.value for r in records] == rows

    strings = tmp_path / "strings.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": json.dumps(r["messages"])} for r in rows]), strings)
    assert [r.value for r in read_records(strings)] == rows


def test_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    d = tmp_path / "ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(d))
    records = list(read_records(d))
    assert [r.value for r in records] == rows
    assert _lines(records) == [1, 2, 3, 4, 5]

    one = tmp_path / "one"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(one))
    assert [r.value for r in read_records(one)] == rows

    two = tmp_path / "two"
    splits = {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows)}
    datasets.DatasetDict(splits).save_to_disk(str(two))
    with pytest.raises(TuneforgeError, match="train"):
        list(read_records(two))


def test_missing_unsupported_and_plain_directory(tmp_path):
    with pytest.raises(TuneforgeError) as e:
        read_records(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(e.value) and ".parquet" in str(e.value)

    txt = tmp_path / "data.txt"
    txt.write_text("hello")
    with pytest.raises(TuneforgeError) as e:
        read_records(txt)
    assert "data.txt" in str(e.value) and ".jsonl" in str(e.value) and ".csv" in str(e.value)

    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(TuneforgeError, match="save_to_disk"):
        list(read_records(plain))
