"""Templates, loss masks, token cache, packing, mixing and the plan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tuneforge.config import load_recipe
from tuneforge.data.batching import IGNORE, collate
from tuneforge.data.mixing import mixture_stream
from tuneforge.data.pipeline import load_sources, tokenize_sources
from tuneforge.data.sampler import build_plan
from tuneforge.data.templates import encode_chats
from tuneforge.data.token_cache import TokenizedSource, pack_arrays
from tuneforge.errors import DataError
from tuneforge.models.loading import load_tokenizer

from conftest import base_recipe, reverse_task, write_jsonl


def test_assistant_only_mask_covers_exactly_the_answers(tiny_model: Path) -> None:
    tok = load_tokenizer(str(tiny_model))
    conv = [
        {"role": "user", "content": "reverse: a b"},
        {"role": "assistant", "content": "b a"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "skip me", "weight": 0},
        {"role": "user", "content": "last"},
        {"role": "assistant", "content": "kept"},
    ]
    ((ids, mask),) = encode_chats(tok, [conv], tok.chat_template)
    learned = tok.decode(ids[mask.astype(bool)])
    assert learned == "b a<|im_end|>\nkept<|im_end|>\n"
    ((ids_all, mask_all),) = encode_chats(tok, [conv], tok.chat_template, loss_on="all")
    assert mask_all.all() and (ids_all == ids).all()


def test_packed_rows_do_not_attend_across_documents(tiny_model: Path) -> None:
    """The last token of a packed document gives the same logits as the document alone."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(tiny_model))
    docs = encode_chats(tok, [r["messages"] for r in reverse_task(2)], tok.chat_template)
    src = pack_arrays("s", docs)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    packed = collate([np.array([[0, 0], [0, 1]])], [src], tok.pad_token_id, pad_to=64)
    alone = collate([np.array([[0, 1]])], [src], tok.pad_token_id)
    with torch.no_grad():
        a = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits
        b = model(input_ids=alone.input_ids, position_ids=alone.position_ids, use_cache=False).logits
    n0, n1 = len(docs[0][0]), len(docs[1][0])
    torch.testing.assert_close(a[0, n0 : n0 + n1], b[0, :n1], atol=1e-5, rtol=1e-5)
    # labels never cross a document boundary
    assert packed.labels[0, n0 - 1] == IGNORE


def _source(name: str, lengths: list[int], supervised: list[int]) -> TokenizedSource:
    docs = [
        (np.arange(n, dtype=np.int32), np.r_[np.zeros(n - s, np.uint8), np.ones(s, np.uint8)])
        for n, s in zip(lengths, supervised)
    ]
    return pack_arrays(name, docs)


def test_mixing_realises_token_ratio_within_two_percent() -> None:
    rng = np.random.default_rng(0)
    big_len = rng.integers(20, 120, 500)
    small_len = rng.integers(5, 30, 40)
    big = _source("domain", big_len.tolist(), (big_len // 2).tolist())
    small = _source("general", small_len.tolist(), (small_len // 2).tolist())
    plan = build_plan(
        [big, small],
        [0.75, 0.25],
        mix_by="tokens",
        seed=3,
        max_length=128,
        packing=True,
        global_batch_size=16,
        epochs=1.0,
        max_steps=None,
    )
    share = plan.mix.realised("tokens")
    assert abs(share[0] - 0.75) < 0.02 and abs(share[1] - 0.25) < 0.02
    assert plan.mix.passes[1] > 2 and plan.mix.passes[0] == pytest.approx(1.0, abs=0.05)  # small one repeated
    # one epoch of the first source, ending on a step boundary: all 500 of its examples are in the plan, the plan
    # is whole steps, and its last step is the one in which the 500th example of the source was drawn
    primary = plan.refs[:, 0] == 0
    assert set(plan.refs[primary, 1].tolist()) == set(range(500)) and plan.mix.examples[0] == int(primary.sum())
    assert len(plan.row_offsets) - 1 == plan.num_steps * 16
    assert int(primary[: plan.row_offsets[(plan.num_steps - 1) * 16]].sum()) < 500
    # by examples instead
    plan_ex = build_plan(
        [big, small],
        [0.5, 0.5],
        mix_by="examples",
        seed=3,
        max_length=128,
        packing=True,
        global_batch_size=16,
        epochs=1.0,
        max_steps=None,
    )
    assert abs(plan_ex.mix.realised("examples")[0] - 0.5) < 0.02


def test_mixture_stream_is_deterministic_and_seeded() -> None:
    costs = [np.ones(10), np.ones(7)]

    def take(seed: int) -> list:
        return [next(s) for s in [mixture_stream(costs, [1, 1], seed)] for _ in range(40)]

    assert take(1) == take(1)
    assert take(1) != take(2)


def test_plan_packs_rows_and_covers_steps() -> None:
    src = _source("a", [30] * 100, [10] * 100)
    plan = build_plan(
        [src],
        [1.0],
        mix_by="tokens",
        seed=0,
        max_length=64,
        packing=True,
        global_batch_size=4,
        epochs=1.0,
        max_steps=None,
    )
    assert all(len(plan.row(r)) == 2 for r in range(plan.num_steps * 4))  # two 30-token docs per 64-row
    seen = plan.refs[:, 1]
    assert len(set(seen.tolist())) == 100  # every example once
    unpacked = build_plan(
        [src],
        [1.0],
        mix_by="tokens",
        seed=0,
        max_length=64,
        packing=False,
        global_batch_size=4,
        epochs=1.0,
        max_steps=7,
    )
    assert unpacked.num_steps == 7 and len(unpacked.refs) == 28


def test_token_cache_hit_on_second_run(tiny_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", reverse_task(50))
    recipe = load_recipe(base_recipe(tiny_model, data, tmp_path / "out"))
    tok = load_tokenizer(str(tiny_model))
    first = tokenize_sources(load_sources(recipe), tok, tok.chat_template, recipe)
    second = tokenize_sources(load_sources(recipe), tok, tok.chat_template, recipe)
    assert not first[0].train.cache_hit and second[0].train.cache_hit
    assert isinstance(second[0].train.ids, np.memmap)
    assert np.array_equal(first[0].train.ids, second[0].train.ids)
    # a different max length is a different cache entry
    other = load_recipe(base_recipe(tiny_model, data, tmp_path / "out"), {"data.max_length": 48})
    third = tokenize_sources(load_sources(other), tok, tok.chat_template, other)
    assert not third[0].train.cache_hit


def test_overlong_examples_are_refused_with_their_line(tiny_model: Path, tmp_path: Path) -> None:
    records = reverse_task(10)
    records[6]["messages"][1]["content"] = " ".join(["banana"] * 80)
    data = write_jsonl(tmp_path / "d.jsonl", records)
    recipe = load_recipe(base_recipe(tiny_model, data, tmp_path / "out"), {"data.val_fraction": 0})
    tok = load_tokenizer(str(tiny_model))
    with pytest.raises(DataError) as e:
        tokenize_sources(load_sources(recipe), tok, tok.chat_template, recipe)
    assert f"{data}:7: messages: too long after tokenization" in str(e.value)
    recipe = load_recipe(
        base_recipe(tiny_model, data, tmp_path / "out"), {"data.val_fraction": 0, "data.on_overlong": "drop"}
    )
    kept = tokenize_sources(load_sources(recipe), tok, tok.chat_template, recipe)
    assert len(kept[0].train) == 9
