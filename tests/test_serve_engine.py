"""The serving engine on tiny models: mixed-adapter batches equal plain PEFT greedy decoding token for token;
continuous batching, sampling, adapters' life cycle, cancellation and errors."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tuneforge.serve import AdapterError, Engine, RequestError, SamplingParams, UnknownAdapterError

from conftest import build_tiny_model

PROMPTS = ["reverse: apple banana cherry", "the quick brown fox", "one two", "reverse: golf hotel india", "lazy dog"]
GREEDY = SamplingParams(temperature=0, max_tokens=12)


def _reinit(model_dir: Path, out: Path, std: float = 0.2, seed: int = 0) -> Path:
    """A copy of a tiny model with wide random weights: varied greedy answers with clear margins between the top
    two logits (the default init repeats one token, which would make token equality a weak test)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    model.save_pretrained(out)
    for f in model_dir.iterdir():  # the tokenizer's files
        if f.is_file() and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    return out


def make_adapter(base: Path, out: Path, seed: int, **lora: object) -> Path:
    """A LoRA adapter saved by PEFT, with random non-zero B (and perturbed DoRA magnitudes) so it changes answers."""
    import peft
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(**lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
            elif "lora_magnitude" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    return _reinit(
        build_tiny_model(root / "tiny", extra_texts=["the quick brown fox jumps over the lazy dog"]), root / "base"
    )


@pytest.fixture(scope="module")
def adapters(base: Path) -> dict[str, Path]:
    """Different ranks, targets and kinds: q/v rank 4; all-linear rank 8 with rsLoRA; DoRA on three layers."""
    root = base.parent
    return {
        "a": make_adapter(base, root / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": make_adapter(base, root / "b", 2, r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True),
        "d": make_adapter(
            base, root / "d", 3, r=4, lora_alpha=4, target_modules=["q_proj", "o_proj", "down_proj"], use_dora=True
        ),
    }


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    """Engines a test makes are stopped after it."""
    made: list[Engine] = []
    yield made
    for engine in made:
        engine.stop()


def new_engine(engines: list[Engine], base: Path, **kw: object) -> Engine:
    engine = Engine(base, **kw)
    engines.append(engine)
    return engine


def ids_of(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer(text)["input_ids"]


async def collect(engine: Engine, ids: list[int], params: SamplingParams = GREEDY, adapter: str | None = None):
    return [e async for e in engine.generate(ids, params, adapter=adapter)]


def tokens(events) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def peft_greedy(
    base: Path, adapters: dict[str, Path], jobs: list[tuple[list[int], str | None]], n: int
) -> list[list[int]]:
    """Plain PEFT: each prompt alone, its adapter set active (or all disabled for the base), greedy."""
    import peft
    from transformers import AutoModelForCausalLM

    names = sorted(adapters)
    model = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), adapters[names[0]], adapter_name=names[0]
    )
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    out = []
    for ids, adapter in jobs:
        kw = dict(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        if adapter is None:
            with model.disable_adapter():
                seq = model.generate(**kw)
        else:
            model.set_adapter(adapter)
            seq = model.generate(**kw)
        out.append(seq[0, len(ids) :].tolist())
    return out


# --------------------------------------------------------------------------------------------- correctness


def test_mixed_adapters_in_one_batch_equal_peft_greedy(base, adapters, engines):
    engine = new_engine(engines, base, max_batch_size=8)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    jobs = [(ids_of(engine, PROMPTS[0]), a) for a in (None, "a", "b", "d")]
    jobs += [(ids_of(engine, p), a) for p, a in zip(PROMPTS[1:], ("a", None, "b", "d"))]

    async def run():
        return await asyncio.gather(*[collect(engine, ids, adapter=a) for ids, a in jobs])

    got = [tokens(events) for events in asyncio.run(run())]
    expected = peft_greedy(base, adapters, jobs, GREEDY.max_tokens)
    assert got == expected
    assert len({tuple(t) for t in got[:4]}) == 4  # the base and each adapter answer the same prompt differently
    assert engine.stats()["steps"] < sum(len(t) for t in got)  # rows really shared decode steps


def test_long_prompt_prefilled_in_chunks_and_cache_growth(base, adapters, engines):
    """A prompt longer than the prefill budget goes in chunks; answers longer than the first cache buffer grow it."""
    engine = new_engine(engines, base, max_batch_size=4, max_prefill_tokens=8)
    engine.add_adapter("b", adapters["b"])
    long_prompt = ids_of(engine, " ".join(PROMPTS * 2))
    assert len(long_prompt) > 8
    jobs = [(long_prompt, "b"), (ids_of(engine, PROMPTS[1]), None)]
    params = SamplingParams(temperature=0, max_tokens=90)

    async def run():
        return await asyncio.gather(*[collect(engine, ids, params, adapter=a) for ids, a in jobs])

    got = [tokens(events) for events in asyncio.run(run())]
    assert got == peft_greedy(base, {"b": adapters["b"]}, jobs, 90)


def test_rows_joining_and_leaving_mid_decode_keep_every_answer_exact(base, adapters, engines):
    """A longer prompt joins a running batch (every row is re-padded), a short request leaves early (the last row
    moves into its place), the cache fills its 64 columns and drops the padding its rows share: each answer still
    equals PEFT's, token for token."""
    engine = new_engine(engines, base, max_batch_size=4, max_model_len=64)
    for name in ("a", "b"):
        engine.add_adapter(name, adapters[name])
    jobs = [
        (ids_of(engine, PROMPTS[4]), None, 3),  # row 0, leaves first: row 1 moves into its place
        (ids_of(engine, PROMPTS[2]), "a", 55),
        (ids_of(engine, " ".join(PROMPTS[:3])), "b", 30),
        (ids_of(engine, PROMPTS[1]), "a", 10),
    ]
    assert len(jobs[2][0]) > len(jobs[1][0]) + 6  # the newcomer is longer than the running rows
    got: dict[int, list[int]] = {}
    progress = dict.fromkeys(range(len(jobs)), 0)

    async def run(i: int, after: tuple[int, int] | None = None):
        if after is not None:  # start once request after[0] has after[1] tokens
            while progress[after[0]] < after[1]:
                await asyncio.sleep(0.001)
        ids, adapter, n = jobs[i]
        out = []
        async for event in engine.generate(ids, SamplingParams(temperature=0, max_tokens=n), adapter=adapter):
            out.append(event)
            progress[i] = len(out)
        got[i] = tokens(out)

    async def main():
        await asyncio.gather(run(0), run(1), run(2, after=(1, 4)), run(3, after=(2, 2)))

    asyncio.run(main())
    for i, (ids, adapter, n) in enumerate(jobs):
        assert got[i] == peft_greedy(base, adapters, [(ids, adapter)], n)[0], f"request {i}"


def test_rows_grouped_by_adapter_follow_every_change_of_the_batch():
    """Rows go through their adapter's stacks group by group, however the batch is laid out and as rows join,
    leave and change adapter (and a prefill comes between decode steps): every output equals each row computed
    alone with its own adapter (plain LoRA of two ranks, and DoRA)."""
    from torch import nn

    from tuneforge.serve.lora import LayerDelta, LoraBank

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    bank = LoraBank(model)
    s1, s2, s3 = (
        bank.install({"0": LayerDelta(torch.randn(r, 6), torch.randn(5, r), 0.5, mag)})
        for r, mag in ((2, None), (3, None), (2, torch.rand(5) + 0.5))  # the last one DoRA
    )
    layer = model[0]
    compositions = {  # the batch → whether its rows must move to be grouped
        (0, s1, s2, s3): False,  # every row its own group (the base's too)
        (s1, s1, s2, s2): False,  # groups of one width in consecutive rows, in slot order (as admitted)
        (s2, s2, s1, s1): True,
        (s1, s2, s1, s2): True,
        (s1, s2, s1): True,  # the last row left: groups of unequal width, padded
        (s2, s2): False,  # uniform: a prefill between two decode steps
        (s1, s2, s1, 0, s3, s3, 0): True,  # rows joined; the base's rows are left out of the groups
        (0, 0, s1, 0, 0): True,
        (0, 0, 0): False,
    }
    with torch.inference_mode():
        for composition, moves in compositions.items():
            x = torch.randn(len(composition), 2, 6)
            bank.use(list(composition))
            assert (bank.rows.groups is not None and bank.rows.groups.moves) == moves
            got = layer(x)
            for i, s in enumerate(composition):
                bank.use([s])
                assert torch.allclose(got[i], layer(x[i : i + 1])[0], atol=1e-6), (composition, i)
                bank.use(list(composition))


# --------------------------------------------------------------------------------------- continuous batching


def test_short_request_sent_with_a_long_one_finishes_first(base, engines):
    engine = new_engine(engines, base)
    order: list[str] = []

    async def run(name: str, text: str, max_tokens: int):
        await collect(engine, ids_of(engine, text), SamplingParams(temperature=0, max_tokens=max_tokens))
        order.append(name)

    async def main():
        await asyncio.gather(run("long", PROMPTS[0], 60), run("short", PROMPTS[1], 3))

    asyncio.run(main())
    assert order == ["short", "long"]


def test_request_arriving_mid_decode_joins_the_running_batch(base, engines):
    # A long request that cannot end on its own while the test runs (RoPE positions go past the tiny model's
    # nominal 64): the engine runs ahead of its consumer, so a short budget could be spent before the newcomer
    # arrives on a fast machine, and nothing would be left to join.
    engine = new_engine(engines, base, max_model_len=8192)
    long_ids, short_ids = ids_of(engine, PROMPTS[0]), ids_of(engine, PROMPTS[2])
    seen: dict[str, int] = {}

    async def main():
        long_gen = engine.generate(long_ids, SamplingParams(temperature=0, max_tokens=8000))
        async for event in long_gen:
            if event.completion_tokens >= 5:  # the long request is decoding: send the newcomer now
                seen["submitted_at"] = engine.stats()["steps"]
                short = await collect(engine, short_ids, SamplingParams(temperature=0, max_tokens=4))
                seen.update(engine.stats(), short=len(short), finish=short[-1].finish_reason)
                break
        await long_gen.aclose()

    asyncio.run(main())
    assert seen["short"] == 4 and seen["finish"] == "length"
    # The newcomer did not wait for the batch to end: when it was done the long request was still running, and
    # the newcomer took a few steps (its prefill, then four tokens), not the thousands the long one has left.
    assert seen["running"] == 1
    assert seen["steps"] - seen["submitted_at"] < 40


def test_a_long_prefill_does_not_stall_running_requests(base, engines):
    """Prefill goes one chunk per step: a running request keeps getting tokens while a long prompt is prefilled."""
    engine = new_engine(engines, base, max_prefill_tokens=8)
    long_prompt = ids_of(engine, " ".join(PROMPTS * 3))[:48]  # six chunks of 8
    seen: dict[str, int] = {}
    running: list[int] = []

    async def runner():
        async for event in engine.generate(ids_of(engine, PROMPTS[1]), SamplingParams(temperature=0, max_tokens=60)):
            running.append(event.completion_tokens)

    async def newcomer():
        while len(running) < 3:
            await asyncio.sleep(0.001)
        seen["before"] = running[-1]
        gen = engine.generate(long_prompt, SamplingParams(temperature=0, max_tokens=2))
        await gen.__anext__()
        seen["after"] = running[-1]
        await gen.aclose()

    async def main():
        await asyncio.gather(runner(), newcomer())

    asyncio.run(main())
    assert seen["after"] - seen["before"] >= 4  # ~6 decode steps ran during the 6 prefill chunks


# ------------------------------------------------------------------------------------------------ sampling


def test_same_seed_same_tokens_whatever_the_batch(base, adapters, engines):
    engine = new_engine(engines, base)
    engine.add_adapter("a", adapters["a"])
    ids = ids_of(engine, PROMPTS[0])
    params = SamplingParams(temperature=1.3, top_p=0.9, max_tokens=16, seed=1234)

    async def alone():
        return tokens(await collect(engine, ids, params, adapter="a"))

    async def crowded():
        others = [
            collect(engine, ids_of(engine, p), SamplingParams(temperature=1.0, max_tokens=20, seed=i), adapter=a)
            for i, (p, a) in enumerate(zip(PROMPTS, [None, "a", None, "a", None]))
        ]
        results = await asyncio.gather(*others[:2], collect(engine, ids, params, adapter="a"), *others[2:])
        return tokens(results[2])

    first, second = asyncio.run(alone()), asyncio.run(crowded())
    other_seed = asyncio.run(
        collect(engine, ids, SamplingParams(temperature=1.3, top_p=0.9, max_tokens=16, seed=99), "a")
    )
    assert first == second
    assert tokens(other_seed) != first


def test_stop_tokens_end_the_request_without_emitting_them(base, engines):
    engine = new_engine(engines, base)
    ids = ids_of(engine, PROMPTS[3])
    free = tokens(asyncio.run(collect(engine, ids, SamplingParams(temperature=0, max_tokens=12))))
    stop = free[4]
    cut = free.index(stop)
    events = asyncio.run(collect(engine, ids, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(stop,))))
    assert tokens(events) == free[:cut]
    last = events[-1]
    assert (last.token_id, last.finish_reason) == (None, "stop")
    assert last.completion_tokens == cut + 1 and last.prompt_tokens == len(ids)
    assert all(e.finish_reason is None for e in events[:-1])


def test_logprobs_are_the_models_log_softmax(base, engines):
    from transformers import AutoModelForCausalLM

    engine = new_engine(engines, base)
    ids = ids_of(engine, PROMPTS[1])
    events = asyncio.run(collect(engine, ids, SamplingParams(temperature=0, max_tokens=3, logprobs=3)))
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)
    first = events[0]
    top = logp.topk(3)
    assert first.token_id == int(top.indices[0])
    assert first.logprob == pytest.approx(float(top.values[0]), abs=1e-4)
    assert [t for t, _ in first.top_logprobs] == top.indices.tolist()
    assert [lp for _, lp in first.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    chosen_only = asyncio.run(collect(engine, ids, SamplingParams(temperature=0, max_tokens=2, logprobs=0)))
    assert chosen_only[0].logprob == pytest.approx(first.logprob, abs=1e-5) and chosen_only[0].top_logprobs is None
    assert asyncio.run(collect(engine, ids, SamplingParams(temperature=0, max_tokens=1)))[0].logprob is None


# ------------------------------------------------------------------------------------------------ adapters


def test_lru_eviction_under_a_budget_keeps_pinned_adapters(base, adapters, engines):
    root = base.parent
    same = {
        n: make_adapter(base, root / f"lru-{n}", 10 + i, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        for i, n in enumerate("xyz")
    }
    probe = new_engine(engines, base)
    probe.add_adapter("x", same["x"], pin=True)
    size = probe.stats()["adapter_bytes"]
    assert size > 0
    engine = new_engine(engines, base, adapter_budget_bytes=2 * size)
    engine.add_adapter("x", same["x"], pin=True)
    engine.add_adapter("y", same["y"])
    engine.add_adapter("z", same["z"])
    assert engine.stats()["resident_adapters"] == ["x"]  # pinned: loaded at once; the others on first use
    ids = ids_of(engine, PROMPTS[0])

    def answer(name: str) -> list[int]:
        return tokens(asyncio.run(collect(engine, ids, adapter=name)))

    y_first = answer("y")
    assert engine.stats()["resident_adapters"] == ["x", "y"]
    answer("z")
    assert engine.stats()["resident_adapters"] == ["x", "z"]  # y was the least recently used unpinned one
    answer("x")
    assert answer("y") == y_first  # loaded again, same answer
    assert engine.stats()["resident_adapters"] == ["x", "y"]
    assert engine.stats()["adapter_bytes"] <= 2 * size

    engine.add_adapter("z", same["z"], pin=True)  # pinned later: loaded now, y makes room
    assert engine.stats()["resident_adapters"] == ["x", "z"]
    with pytest.raises(AdapterError, match="pinned adapters, over the adapter budget"):
        engine.add_adapter("y", same["y"], pin=True)
    with pytest.raises(AdapterError, match="budget"):
        new_engine(engines, base, adapter_budget_bytes=size // 2).add_adapter("x", same["x"])


def test_request_waits_for_room_when_the_budget_is_held_by_running_requests(base, adapters, engines):
    """Budget for one adapter, two requests for two adapters at once: the second waits for the first, then runs."""
    root = base.parent
    same = {
        n: make_adapter(base, root / f"wait-{n}", 20 + i, r=4, lora_alpha=8, target_modules=["q_proj"])
        for i, n in enumerate("pq")
    }
    probe = new_engine(engines, base)
    probe.add_adapter("p", same["p"], pin=True)
    engine = new_engine(engines, base, adapter_budget_bytes=probe.stats()["adapter_bytes"])
    for name, path in same.items():
        engine.add_adapter(name, path)
    ids = ids_of(engine, PROMPTS[0])
    params = SamplingParams(temperature=0, max_tokens=20)
    solo = {n: tokens(asyncio.run(collect(engine, ids, params, adapter=n))) for n in same}

    async def both():
        return await asyncio.gather(*[collect(engine, ids, params, adapter=n) for n in same])

    together = [tokens(events) for events in asyncio.run(both())]
    assert together == [solo["p"], solo["q"]] and solo["p"] != solo["q"]
    assert engine.stats()["adapter_bytes"] <= probe.stats()["adapter_bytes"]


def test_add_remove_and_replace_at_runtime(base, adapters, engines):
    engine = new_engine(engines, base)
    ids = ids_of(engine, PROMPTS[0])
    engine.add_adapter("m", adapters["a"])
    with_a = tokens(asyncio.run(collect(engine, ids, adapter="m")))
    engine.add_adapter("m", adapters["b"])  # the same name now serves another adapter
    with_b = tokens(asyncio.run(collect(engine, ids, adapter="m")))
    assert with_a != with_b
    assert engine.adapters() == ["m"]
    engine.remove_adapter("m")
    assert engine.adapters() == [] and engine.stats()["resident_adapters"] == []
    with pytest.raises(UnknownAdapterError, match="'m' is not loaded"):
        asyncio.run(collect(engine, ids, adapter="m"))
    with pytest.raises(UnknownAdapterError):
        engine.remove_adapter("m")


# ------------------------------------------------------------------------------------------- cancellation


def test_consumer_that_stops_iterating_frees_its_row_at_once(base, engines):
    engine = new_engine(engines, base, max_batch_size=1)  # one row: the next request needs the freed one
    ids = ids_of(engine, PROMPTS[0])

    async def main():
        gen = engine.generate(ids, SamplingParams(temperature=0, max_tokens=400))
        got = [await gen.__anext__(), await gen.__anext__()]
        await gen.aclose()  # a client that disconnects
        after = await collect(engine, ids, SamplingParams(temperature=0, max_tokens=3))
        return got, after

    got, after = asyncio.run(main())
    assert len(got) == 2 and len(after) == 3
    stats = engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["steps"] < 100  # the abandoned request did not run on towards its 400 tokens


def test_stop_aborts_requests_in_flight(base, engines):
    engine = new_engine(engines, base)
    ids = ids_of(engine, PROMPTS[0])

    async def main():
        gen = engine.generate(ids, SamplingParams(temperature=0, max_tokens=400))
        await gen.__anext__()
        engine.stop()
        return [e async for e in gen]

    rest = asyncio.run(main())
    assert rest[-1].finish_reason == "abort" and rest[-1].token_id is None


# ------------------------------------------------------------------------------------------------- errors


def test_bad_requests_are_refused_clearly(base, adapters, engines):
    engine = new_engine(engines, base, max_model_len=32)
    engine.add_adapter("a", adapters["a"])
    ids = ids_of(engine, PROMPTS[0])
    with pytest.raises(UnknownAdapterError, match="did you mean 'a'"):
        asyncio.run(collect(engine, ids, adapter="aa"))
    with pytest.raises(RequestError, match="prompt: 40 tokens do not fit .* 32"):
        asyncio.run(collect(engine, [ids[0]] * 40))
    with pytest.raises(RequestError, match="top_p"):
        asyncio.run(collect(engine, ids, SamplingParams(top_p=0)))
    with pytest.raises(RequestError, match="max_tokens"):
        asyncio.run(collect(engine, ids, SamplingParams(max_tokens=0)))
    with pytest.raises(RequestError, match="vocabulary"):
        asyncio.run(collect(engine, [engine.vocab_size + 5]))
    with pytest.raises(RequestError, match="non-empty list"):
        asyncio.run(collect(engine, []))
    # max_tokens past the context is cut to what fits: finish_reason "length" at the context's end
    events = asyncio.run(collect(engine, ids, SamplingParams(temperature=0, max_tokens=100)))
    assert events[-1].finish_reason == "length" and len(ids) + events[-1].completion_tokens == 32


@pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT's own warnings about the odd adapters built here
def test_adapters_that_cannot_be_served_are_refused_with_the_reason(base, adapters, engines, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    engine = new_engine(engines, base)
    with pytest.raises(AdapterError, match="not a PEFT adapter directory"):
        engine.add_adapter("none", tmp_path)

    cfg = json.loads((base / "config.json").read_text())
    cfg["hidden_size"] = 32  # a recorded base that exists, with another shape
    wide = tmp_path / "wide-base"
    wide.mkdir()
    (wide / "config.json").write_text(json.dumps(cfg))
    moved = shutil.copytree(adapters["a"], tmp_path / "moved")
    acfg = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**acfg, "base_model_name_or_path": str(wide)}))
    with pytest.raises(AdapterError, match="another model .*hidden_size 32"):
        engine.add_adapter("moved", moved)
    (moved / "adapter_config.json").write_text(json.dumps({**acfg, "base_model_name_or_path": "org/some-other-model"}))
    with pytest.raises(AdapterError, match="base_model_name_or_path is 'org/some-other-model'"):
        engine.add_adapter("moved", moved)

    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=engine.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    small.save_pretrained(tmp_path / "small")
    misfit = peft.get_peft_model(small, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    misfit.save_pretrained(tmp_path / "misfit")
    acfg = json.loads((tmp_path / "misfit" / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = str(base)  # claims our base: the layer shapes still give it away
    (tmp_path / "misfit" / "adapter_config.json").write_text(json.dumps(acfg))
    with pytest.raises(AdapterError, match="q_proj: lora_A .* do not fit the base layer"):
        engine.add_adapter("misfit", tmp_path / "misfit")

    for name, config in {
        "prompt": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "bias": peft.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True),
        # Trained in full beside LoRA: served for the embedding and LM head (see below), not for other modules.
        "saved": peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["norm"]),
    }.items():
        model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
        model.save_pretrained(tmp_path / name)
        with pytest.raises(
            AdapterError,
            match={
                "prompt": "PROMPT_TUNING.*cannot share a batch",
                "bias": "lora_bias",
                "saved": "modules_to_save lists 'norm'",
            }[name],
        ):
            engine.add_adapter(name, tmp_path / name)
    assert engine.adapters() == []


@pytest.mark.filterwarnings("ignore:.*ensure_weight_tying")  # the untied head of a tied base, on purpose
def test_adapters_that_train_the_embedding_or_head_share_the_batch(base, adapters, engines, tmp_path):
    """``modules_to_save=[embed_tokens]`` as the shipped sft-lora recipe trains it (the tied head stays tied to the
    trained embedding), and an untied ``lm_head``: each row reads its own adapter's tables, in one batch with base
    rows and an ordinary LoRA adapter; greedy answers equal PEFT's token for token; the tables count in the budget."""
    import peft
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tuneforge.config import AdapterConfig
    from tuneforge.models.adapters import apply_adapter

    def trained(model, out: Path, seed: int) -> Path:
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
                elif "modules_to_save" in name:
                    p.add_(torch.randn_like(p) * 0.2)
        model.save_pretrained(out)
        return out

    tied = AutoModelForCausalLM.from_pretrained(base)
    assert tied.config.tie_word_embeddings
    recipe = AdapterConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"])
    embed_model = apply_adapter(tied, recipe)
    inner = embed_model.base_model.model
    assert inner.lm_head.weight is inner.model.embed_tokens.modules_to_save["default"].weight  # the head follows
    untied_head = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], modules_to_save=["lm_head"])
    head_model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), untied_head)
    paths = {
        "e": trained(embed_model, tmp_path / "e", 5),
        "h": trained(head_model, tmp_path / "h", 6),
        "a": adapters["a"],
    }
    engine = new_engine(engines, base, max_batch_size=8)
    for name, path in paths.items():
        engine.add_adapter(name, path)
    jobs = [(ids_of(engine, PROMPTS[0]), a) for a in (None, "e", "h", "a")]
    jobs += [(ids_of(engine, p), a) for p, a in zip(PROMPTS[1:], ("e", None, "e", "h"))]

    async def run():
        return await asyncio.gather(*[collect(engine, ids, adapter=a) for ids, a in jobs])

    got = [tokens(events) for events in asyncio.run(run())]
    # PEFT with one adapter at a time (each adapter's own PeftModel, as it was trained and saved).
    expected = [peft_greedy(base, {a: paths[a]} if a else paths, [(ids, a)], GREEDY.max_tokens)[0] for ids, a in jobs]
    assert got == expected
    assert len({tuple(t) for t in got[:4]}) == 4  # each adapter's tables change its answers

    def own_bytes(name: str) -> int:  # LoRA's A and B, and one [vocab, hidden] table, in fp32
        tensors = load_file(str(paths[name] / "adapter_model.safetensors"))
        lora = sum(t.numel() for k, t in tensors.items() if "lora_" in k)
        return 4 * (lora + engine.vocab_size * engine.model.config.hidden_size)

    # The tied adapter's file holds its table twice (as the embedding and as the head): resident once, counted once.
    for name in ("h", "a"):
        engine.remove_adapter(name)
    assert engine.stats()["adapter_bytes"] == own_bytes("e")
    engine.remove_adapter("e")
    engine.add_adapter("h", paths["h"], pin=True)
    assert engine.stats()["adapter_bytes"] == own_bytes("h")


# ---------------------------------------------------------------------------------------------- embeddings


def test_embeddings_are_pooled_normalised_and_padding_free(base, adapters, engines):
    engine = new_engine(engines, base)
    engine.add_adapter("b", adapters["b"])
    short, long = ids_of(engine, PROMPTS[2]), ids_of(engine, PROMPTS[0] + " " + PROMPTS[1])
    batch = engine.embed([short, long])
    alone = engine.embed([short])
    vectors = torch.tensor(batch)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(torch.tensor(alone[0]), vectors[0], atol=1e-5)  # padding does not leak into the mean
    adapted = torch.tensor(engine.embed([short], adapter="b")[0])
    assert float(adapted @ vectors[0]) < 0.999  # the adapter's model embeds differently
    with pytest.raises(UnknownAdapterError):
        engine.embed([short], adapter="nope")
