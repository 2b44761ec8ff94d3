"""Data at scale: streaming scan, parallel tokenization, the O(1) warm start and what invalidates it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from chat_families import FAMILIES, family_tokenizer

from tuneforge.config import load_recipe
from tuneforge.data import ahead, encode, pipeline
from tuneforge.data.hashset import HashSet
from tuneforge.data.pipeline import load_sources, tokenize_sources
from tuneforge.data.sanitize import content_hash
from tuneforge.data.stream import MAX_ISSUES, scan_sources
from tuneforge.data.templates import render_chat
from tuneforge.data.tokenize import control_tokens, encode_texts_ids
from tuneforge.errors import DataError
from tuneforge.models.loading import load_tokenizer
from tuneforge.paths import cache_dir
from tuneforge.training import sft_task

from conftest import WORDS, base_recipe, build_tiny_model, reverse_task, write_jsonl

HOUR_AGO = 3600


def unique_chats(n: int, seed: int = 0) -> list[dict]:
    """Reverse-three-words chats made unique by a number, with some repeats and blanks for sanitising."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        w = rng.sample(WORDS, 3)
        out.append(
            {
                "messages": [
                    {"role": "user", "content": f"reverse {i}: " + " ".join(w)},
                    {"role": "assistant", "content": " ".join(reversed(w))},
                ]
            }
        )
    for i in range(0, n, 50):
        out[i] = out[i // 2]  # exact duplicates, dropped by dedup
    return out


def _age(path: Path) -> None:
    """Give `path` an mtime an hour old, as any data file not written just now has."""
    t = path.stat().st_mtime - HOUR_AGO
    os.utime(path, (t, t))


def _tokens(recipe, tok, template=None):
    return tokenize_sources(scan_sources(recipe, verify=recipe.data.verify), tok, template or tok.chat_template, recipe)


def test_hash_set_keeps_first_occurrences_like_a_python_set() -> None:
    rng = np.random.default_rng(0)
    table, seen = HashSet(capacity=16), set()
    for _ in range(50):
        keys = rng.integers(1, 3000, 400).astype(np.uint64)
        expected = []
        for k in keys.tolist():
            expected.append(k not in seen)
            seen.add(k)
        assert table.add(keys).tolist() == expected
    assert len(table) == len(seen)


def _sentencepiece_style(prepend_scheme: str | None, lstrip: bool = False):
    """A Llama-2-like tokenizer: ``▁`` for spaces, prepended by the normalizer (None) or by ``Metaspace``."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(byte_fallback=False))
    if prepend_scheme is None:
        core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        core.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=prepend_scheme)
    corpus = [" ".join(random.Random(i).sample(WORDS, 5)) + " é 🙂 42" for i in range(200)]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "[INST]", "[/INST]"])
    core.train_from_iterator(corpus, trainer=trainer)
    core.add_tokens([AddedToken("<tool>", lstrip=lstrip, normalized=True)])  # matched after normalisation
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")


def _texts_for(tokenizer) -> list[str]:
    """Rendered chats (when the tokenizer has a template) and the awkward cases: control tokens first, last,
    back to back, inside a word, alone; no control token; nothing; spaces and non-ASCII at the cuts."""
    specials = sorted(control_tokens(tokenizer) or {"</s>": 0}, key=len)
    a, b = specials[0], specials[-1]
    texts = [
        "",
        "plain words only",
        f"{a}",
        f"{a}{b}",
        f"{a}start",
        f"end{b}",
        f"in{a}side{b}out",
        f" {a} spaced {b} ",
        f"é🙂{a}\n\nüber {b}  <tool> two  spaces<tool>x",
    ]
    if getattr(tokenizer, "chat_template", None):
        convs = [
            [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}],
            [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": " é🙂 spaced "},
                {"role": "assistant", "content": "ok "},
                {"role": "user", "content": "again"},
                {"role": "assistant", "content": "\nsure"},
            ],
        ]
        for conv in convs:
            try:
                texts += [render_chat(tokenizer, conv, None), render_chat(tokenizer, conv[:-1], None, True)]
            except Exception:  # a template with demands of its own (alternation, a system slot): the cases above
                pass
    return texts * 2  # repeated pieces come from the cache of the same call


@pytest.mark.parametrize(
    "name", [*FAMILIES, "sentencepiece-normalizer", "metaspace-first", "metaspace-always", "lstrip-token"]
)
def test_piecewise_tokenization_is_exactly_the_tokenizers(name: str) -> None:
    if name in FAMILIES:
        tokenizer = family_tokenizer(name)
    elif name == "lstrip-token":  # an added token that eats the space before it: pieces are not independent
        tokenizer = _sentencepiece_style("first", lstrip=True)
        assert control_tokens(tokenizer) == {}
    else:
        tokenizer = _sentencepiece_style({"sentencepiece-normalizer": None}.get(name, name.split("-")[1]))
    texts = _texts_for(tokenizer)
    expected = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    got = encode_texts_ids(tokenizer, texts)
    for text, ids, offsets, (got_ids, got_offsets) in zip(
        texts, expected["input_ids"], expected["offset_mapping"], got
    ):
        assert got_ids.tolist() == ids, text
        assert [tuple(o) for o in got_offsets.tolist()] == [tuple(o) for o in offsets], text


@pytest.mark.parametrize("n", [600, 2400])  # the exact split (< 1000 examples) and the threshold split
def test_streaming_scan_matches_the_in_memory_pipeline(tiny_model: Path, tmp_path: Path, n: int) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", unique_chats(n))
    recipe = load_recipe(base_recipe(tiny_model, data, tmp_path / "out"), {"data.val_fraction": 0.05})
    (mem,) = load_sources(recipe)
    (scanned,) = scan_sources(recipe)
    # the same examples on the same side of the split, in the same order: the same content hashes
    assert scanned.train.data_hash == content_hash(mem.train) and scanned.val is not None
    assert scanned.val.data_hash == content_hash(mem.val) and scanned.data_hash == mem.data_hash
    assert scanned.stats == mem.stats and mem.stats["duplicates"] > 0
    # and the same tokens: the in-memory records hit the entry the stream wrote
    tok = load_tokenizer(str(tiny_model))
    (streamed,) = tokenize_sources([scanned], tok, tok.chat_template, recipe)
    (from_memory,) = tokenize_sources([mem], tok, tok.chat_template, recipe)
    assert not streamed.train.cache_hit and from_memory.train.cache_hit and from_memory.val.cache_hit
    assert np.array_equal(streamed.train.ids, from_memory.train.ids)
    assert not list((cache_dir("tokens") / "spool").iterdir())  # spools are removed once tokenized


def test_token_cache_bytes_are_identical_for_one_and_many_workers(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "PARALLEL_MIN_EXAMPLES", 1)  # fork workers for this small file too
    data = write_jsonl(tmp_path / "d.jsonl", unique_chats(1500))
    tok = load_tokenizer(str(tiny_model))
    entries = {}
    for workers in (1, 3):
        monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / f"home-{workers}"))
        recipe = load_recipe(base_recipe(tiny_model, data, tmp_path / "out"), {"data.num_workers": workers})
        (src,) = _tokens(recipe, tok)
        entry = cache_dir("tokens") / src.train.cache_key
        entries[workers] = {p.name: p.read_bytes() for p in sorted(entry.iterdir())}
    assert set(entries[1]) == {"ids.bin", "mask.bin", "offsets.bin", "supervised.bin", "meta.json"}
    assert entries[1] == entries[3]


def test_warm_start_reads_no_data_and_maps_tokens_and_plan(tiny_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", unique_chats(300))
    _age(data)
    recipe = load_recipe(base_recipe(tiny_model, data, tmp_path / "out"))
    cold = sft_task.prepare(recipe)
    # the data file is unreadable now: a warm start must not need to open it
    data.chmod(0)
    try:
        (scanned,) = scan_sources(recipe)
        assert scanned.trusted and scanned.train.spool is None  # fingerprint and manifest only
        warm = sft_task.prepare(recipe)
    finally:
        data.chmod(0o644)
    assert warm.tokens[0].train.cache_hit and not cold.tokens[0].train.cache_hit
    assert isinstance(warm.tokens[0].train.ids, np.memmap) and isinstance(warm.plan.refs, np.memmap)
    assert np.array_equal(warm.plan.refs, cold.plan.refs) and warm.plan.num_steps == cold.plan.num_steps
    assert warm.plan.mix.summary() == cold.plan.mix.summary()
    assert warm.data_info[warm.tokens[0].name]["train"] == cold.data_info[cold.tokens[0].name]["train"]


def test_what_invalidates_the_cache(tiny_model: Path, tmp_path: Path) -> None:
    records = unique_chats(200)
    data = write_jsonl(tmp_path / "d.jsonl", records)
    _age(data)
    tok = load_tokenizer(str(tiny_model))
    recipe = load_recipe(base_recipe(tiny_model, data, tmp_path / "out"))
    (first,) = _tokens(recipe, tok)
    key = first.train.cache_key

    def again(overrides: dict | None = None, template: str | None = None, tokenizer=tok):
        r = load_recipe(base_recipe(tiny_model, data, tmp_path / "out"), overrides or {})
        return _tokens(r, tokenizer, template)[0].train

    assert again().cache_hit and again().cache_key == key
    # the recipe's settings that change tokens: each a different entry
    for overrides in ({"data.max_length": 48}, {"data.loss_on": "all"}, {"data.on_overlong": "drop"}):
        miss = again(overrides)
        assert not miss.cache_hit and miss.cache_key != key, overrides
    # settings that change which examples are kept or split: the source is scanned again
    for overrides in ({"train.seed": 1}, {"data.val_fraction": 0.2}, {"data.sanitize.dedup": False}):
        assert not again(overrides).cache_hit, overrides
    # another chat template, another tokenizer
    assert not again(template=tok.chat_template.replace("<|im_start|>", "<|im_start|> ")).cache_hit
    other_tok = load_tokenizer(str(build_tiny_model(tmp_path / "other", vocab_size=300)))
    assert not again(tokenizer=other_tok).cache_hit

    # an edited file (a record added): a new fingerprint, a new manifest, new tokens
    new = {"messages": [{"role": "user", "content": "reverse: a b c"}, {"role": "assistant", "content": "c b a"}]}
    write_jsonl(data, [*records, new])
    _age(data)
    edited = again()
    assert not edited.cache_hit and edited.cache_key != key

    # same size and mtime, other content: only --verify can tell (without it the stored hash is trusted)
    before = data.read_bytes()
    stat = data.stat()
    swapped = before.replace(b"reverse 7:", b"reverse 8:", 1)
    assert len(swapped) == len(before) and swapped != before
    data.write_bytes(swapped)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert again().cache_key == edited.cache_key  # trusted: the documented trade-off
    verified = again({"data.verify": True})
    assert not verified.cache_hit and verified.cache_key != edited.cache_key


def test_warm_manifest_with_cold_tokens_reads_the_source_again(tiny_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", unique_chats(200))
    _age(data)
    tok = load_tokenizer(str(tiny_model))
    recipe = load_recipe(base_recipe(tiny_model, data, tmp_path / "out"), {"data.cache": False})
    (a,) = _tokens(recipe, tok)  # no token cache: every start tokenizes, from the manifest's rescan
    (b,) = _tokens(recipe, tok)
    assert not a.train.cache_hit and not b.train.cache_hit
    assert np.array_equal(a.train.ids, b.train.ids) and np.array_equal(a.val.mask, b.val.mask)


def test_every_bad_line_of_a_large_file_is_named(tiny_model: Path, tmp_path: Path) -> None:
    records: list[dict | str] = list(reverse_task(6000))
    bad = set()
    for i in range(3, len(records), 5):
        records[i] = '{"messages": [' if i % 2 else {"messages": [{"role": "user", "content": "no answer"}]}
        bad.add(i + 1)
    data = write_jsonl(tmp_path / "d.jsonl", records)
    recipe = load_recipe(base_recipe(tiny_model, data, tmp_path / "out"))
    with pytest.raises(DataError) as e:
        scan_sources(recipe)
    assert len(bad) > MAX_ISSUES and len(e.value.issues) == MAX_ISSUES  # in memory: capped
    assert f"{len(bad)} bad ({len(bad)} issue(s))" in str(e.value)
    report = Path(str(e.value).split("every issue, one per line: ")[1].split()[0])
    named = {int(line.split(":")[1]) for line in report.read_text().splitlines()}
    assert named == bad
    assert not list((cache_dir("tokens") / "spool").iterdir())


@pytest.mark.slow
def test_prepare_memory_does_not_grow_with_the_data(tiny_model: Path, tmp_path: Path) -> None:
    """Peak RSS of a cold prepare (in a fresh process) for 4× the data grows far less than the data does."""
    script = (
        "import json, resource, sys\n"
        "from tuneforge.config import load_recipe\n"
        "from tuneforge.training import sft_task\n"
        "sft_task.prepare(load_recipe(json.loads(sys.argv[1])))\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
    )
    rng = random.Random(0)
    peaks, sizes = [], []
    for n in (8000, 32000):
        data = tmp_path / f"text-{n}.jsonl"
        with data.open("w") as f:
            for i in range(n):
                f.write(json.dumps({"text": f"{i} " + " ".join(rng.choices(WORDS, k=150))}) + "\n")
        spec = base_recipe(tiny_model, data, tmp_path / "out")
        spec["method"] = "cpt"
        spec["data"].update(max_length=256, num_workers=1)
        env = dict(os.environ, TUNEFORGE_HOME=str(tmp_path / f"home-{n}"))
        out = subprocess.run(
            [sys.executable, "-c", script, json.dumps(spec)], env=env, capture_output=True, text=True, check=True
        )
        peaks.append(int(out.stdout.split()[-1]))
        sizes.append(data.stat().st_size)
    assert peaks[1] - peaks[0] < (sizes[1] - sizes[0]) / 4, (peaks, sizes)


def _entries(tokens) -> dict[str, dict[str, bytes]]:
    """Every token-cache entry of tokenized sources: name → file → bytes."""
    out = {}
    for src in tokens:
        for side, split in (("train", src.train), ("val", src.val)):
            if split is not None:
                entry = cache_dir("tokens") / split.cache_key
                out[f"{src.name}/{side}"] = {p.name: p.read_bytes() for p in sorted(entry.iterdir())}
    return out


def _ahead_then_ordinary(recipe, tok, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, start_after: int = 1):
    """Tokenize `recipe` twice, in fresh homes: tokens made during the scan, then the ordinary way (from the spool)."""
    monkeypatch.setattr(ahead, "START_AFTER", start_after)  # start the workers for these small files too
    monkeypatch.setattr(pipeline, "PARALLEL_MIN_EXAMPLES", 1)
    results = []
    for mode in ("ahead", "ordinary"):
        monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / f"home-{mode}"))
        factory = pipeline.ahead_factory(recipe, ("messages",), lambda: (tok, tok.chat_template))
        assert factory is not None
        try:
            scanned = scan_sources(recipe, ahead=factory if mode == "ahead" else None)
        except DataError as e:
            results.append((e, None))
            continue
        made = [s.train.spool is not None and s.train.spool.tokens is not None for s in scanned]
        try:
            tokens = tokenize_sources(scanned, tok, tok.chat_template, recipe)
        except DataError as e:
            results.append((e, made))
        else:
            results.append((_entries(tokens), made))
        assert not [p for p in cache_dir("tokens").iterdir() if p.name.startswith(".")]  # no partial entry left
    return results


def test_tokens_made_during_the_scan_are_the_ordinary_paths_bytes(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = unique_chats(2400)  # with duplicates: dedup decides what is tokenized
    for i in range(0, len(records), 7):  # a second turn, half of them with weight 0
        m = records[i]["messages"]
        records[i] = {"messages": [*m, {"role": "user", "content": "again"}, {**m[1], "weight": i % 2}]}
    data = write_jsonl(tmp_path / "d.jsonl", records)
    other = write_jsonl(tmp_path / "e.jsonl", unique_chats(1200, seed=1))
    spec = base_recipe(tiny_model, data, tmp_path / "out")
    spec["data"].update(num_workers=2, val_fraction=0.05, on_overlong="truncate", max_length=40)
    spec["data"]["sources"].append({"path": str(other)})
    recipe = load_recipe(spec)
    tok = load_tokenizer(str(tiny_model))
    (ahead_entries, made), (ordinary_entries, not_made) = _ahead_then_ordinary(recipe, tok, monkeypatch, tmp_path)
    assert not isinstance(ahead_entries, DataError), str(ahead_entries)
    assert made == [True, True] and not_made == [False, False]
    assert set(ahead_entries) == {"d/train", "d/val", "e/train", "e/val"}
    assert ahead_entries == ordinary_entries  # the same entries (keys), byte for byte


@pytest.mark.parametrize(
    "case", ["overlong", "overlong before the workers start", "rank split", "bad record", "explicit validation file"]
)
def test_tokenizing_during_the_scan_falls_back_to_the_ordinary_path(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    records: list = unique_chats(600 if case == "rank split" else 1500)
    spec = base_recipe(tiny_model, tmp_path / "d.jsonl", tmp_path / "out")
    spec["data"]["num_workers"] = 2
    early = case == "overlong before the workers start"  # in a batch buffered until then, written as they start
    at = 300 if early else 1200
    if case.startswith("overlong"):  # on_overlong: error names the line; nothing is trained
        records[at] = {"messages": [{"role": "user", "content": " ".join(WORDS * 3)}, records[5]["messages"][1]]}
    if case == "bad record":
        records[1300] = {"messages": [{"role": "user", "content": "no answer"}]}
    if case == "explicit validation file":
        spec["data"]["validation"] = str(write_jsonl(tmp_path / "v.jsonl", unique_chats(50, seed=3)))
    write_jsonl(tmp_path / "d.jsonl", records)
    recipe = load_recipe(spec)
    tok = load_tokenizer(str(tiny_model))
    if early:
        monkeypatch.setattr(encode, "IN_FLIGHT_PER_WORKER", 1)  # a window smaller than the buffered batches
    (a, made), (b, _) = _ahead_then_ordinary(recipe, tok, monkeypatch, tmp_path, 1400 if early else 1)
    if case.startswith("overlong") or case == "bad record":  # the same error, naming the same file:line: field
        assert isinstance(a, DataError) and isinstance(b, DataError)
        assert str(a) == str(b) and [str(i) for i in a.issues] == [str(i) for i in b.issues]
        assert f"d.jsonl:{1301 if case == 'bad record' else at + 1}:" in str(a.issues[0])
    else:
        assert a == b and made == [case == "explicit validation file"]


def test_prepare_tokenizes_chats_while_it_scans_them(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ahead, "START_AFTER", 1)
    finished: list = []
    finish = ahead.TokenizeAhead.finish
    monkeypatch.setattr(ahead.TokenizeAhead, "finish", lambda self: finished.append(finish(self)) or finished[-1])
    data = write_jsonl(tmp_path / "d.jsonl", unique_chats(1500))
    recipe = load_recipe(base_recipe(tiny_model, data, tmp_path / "out"), {"data.num_workers": 2})
    during = sft_task.prepare(recipe)
    assert len(finished) == 1 and finished[0] is not None  # the prepare's tokens were made during its scan
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home-ordinary"))
    monkeypatch.setattr(sft_task, "ahead_factory", lambda *args: None)
    after = sft_task.prepare(recipe)
    assert len(finished) == 1
    for a, b in ((during.tokens[0].train, after.tokens[0].train), (during.tokens[0].val, after.tokens[0].val)):
        assert a.cache_key == b.cache_key and not a.cache_hit and not b.cache_hit
        for name in ("ids", "mask", "offsets", "supervised"):
            assert np.array_equal(getattr(a, name), getattr(b, name))
    assert np.array_equal(during.plan.refs, after.plan.refs)
