from __future__ import annotations

import hashlib

import pytest

from tuneforge.data.sanitize import EXACT_SPLIT_BELOW, canonical_json, content_hash, sanitize, split
from tuneforge.errors import TuneforgeError


def qa(i: int, answer: str | None = None) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": answer or f"a{i}"}]}


def test_sanitize_counts_each_reason_and_keeps_first_in_order():
    examples = [
        qa(0),
        {"text": "doc"},
        qa(0),  # duplicate of the first
        {"text": "   \n"},  # whitespace only
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},  # no loss
        {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": " "}],
            "rejected": [{"role": "assistant", "content": "r"}],
        },  # empty chosen side
        {"text": "x" * 50},  # too long
        {"text": "doc"},  # duplicate
        qa(1),
    ]
    kept, stats = sanitize(examples, max_chars=20)
    assert kept == [qa(0), {"text": "doc"}, qa(1)]
    assert (stats.n_in, stats.n_out, stats.duplicates, stats.empty, stats.too_long) == (9, 3, 2, 3, 1)
    assert "2 duplicate(s)" in stats.summary() and "> 20 chars" in stats.summary()

    kept, stats = sanitize(examples, dedup=False, drop_empty=False)
    assert len(kept) == len(examples) and stats.duplicates == stats.empty == stats.too_long == 0


def test_dedup_is_exact_not_fuzzy():
    a = {"text": "Hello"}
    kept, stats = sanitize([a, {"text": "hello"}, {"text": "Hello "}, dict(a)])
    assert len(kept) == 3 and stats.duplicates == 1


def test_tool_call_only_answer_is_not_empty():
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    ex = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [call]}]}
    kept, stats = sanitize([ex])
    assert kept == [ex] and stats.empty == 0


def test_split_is_deterministic_and_seed_dependent():
    examples = [qa(i) for i in range(2000)]
    train, val = split(examples, 0.1, seed=7)
    assert (train, val) == split(examples, 0.1, seed=7)
    assert len(train) + len(val) == 2000
    # the threshold rule: exactly the examples whose sha256(seed, canonical JSON) number in [0, 1) is below 0.1
    unit = lambda ex: int.from_bytes(hashlib.sha256(b"7\n" + canonical_json(ex).encode()).digest()[:8], "big") / 2**64  # noqa: E731
    assert val == [ex for ex in examples if unit(ex) < 0.1] and 0 < len(val) < len(examples)
    assert val != split(examples, 0.1, seed=8)[1]
    assert train == [ex for ex in examples if ex in train]  # input order kept


def test_split_is_stable_when_records_are_added():
    base = [qa(i) for i in range(EXACT_SPLIT_BELOW)]
    more = base + [qa(i) for i in range(EXACT_SPLIT_BELOW, 2 * EXACT_SPLIT_BELOW)]
    _, val_base = split(base, 0.2, seed=0)
    _, val_more = split(more, 0.2, seed=0)
    in_val = {canonical_json(e) for e in val_more}
    assert {canonical_json(e) for e in base if canonical_json(e) in in_val} == {canonical_json(e) for e in val_base}


def test_split_duplicates_land_on_the_same_side():
    examples = [qa(i) for i in range(1500)] + [qa(i) for i in range(1500)]
    train, val = split(examples, 0.3, seed=1)
    assert not {canonical_json(e) for e in train} & {canonical_json(e) for e in val}


@pytest.mark.parametrize(
    ("n", "fraction", "n_val"), [(10, 0.1, 1), (10, 0.25, 2), (3, 0.1, 1), (2, 0.9, 1), (1, 0.5, 0)]
)
def test_split_tiny_sets_exact(n, fraction, n_val):
    examples = [qa(i) for i in range(n)]
    train, val = split(examples, fraction, seed=3)
    assert len(val) == n_val and len(train) == n - n_val
    assert split(examples, fraction, seed=3) == (train, val)


def test_split_edge_cases():
    examples = [qa(i) for i in range(5)]
    assert split(examples, 0.0, seed=0) == (examples, [])
    assert split([], 0.5, seed=0) == ([], [])
    for bad in (1.0, -0.1):
        with pytest.raises(TuneforgeError, match="val_fraction"):
            split(examples, bad, seed=0)


def test_content_hash():
    a = [{"text": "x", "meta": 1}, {"text": "y"}]
    same = [{"meta": 1, "text": "x"}, {"text": "y"}]  # key order does not matter
    assert content_hash(a) == content_hash(same)
    assert len(content_hash(a)) == 64
    assert content_hash(a) != content_hash(list(reversed(a)))  # example order does
    assert content_hash(a) != content_hash([{"text": "x", "meta": 1}, {"text": "y "}])
    assert content_hash([{"text": "ab"}]) != content_hash([{"text": "a"}, {"text": "b"}])
