"""The OpenAI-compatible endpoint end to end: the official ``openai`` client against a real uvicorn server.

Two LoRA adapters of one tiny base and the base itself, concurrently, each answer equal token for token to
plain PEFT greedy decoding; the served prompt equal to the trained one; errors as OpenAI error objects naming
the field; stop strings, ``n`` with seeds, embeddings, adapters loaded and unloaded at run time, a client that
disconnects freeing its slot; then ``tuneforge serve`` / ``tuneforge deploy`` as processes, and the same routes
inside ``tuneforge server`` resolving its fine-tuned model names.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch

from tuneforge.errors import TuneforgeError

from conftest import build_tiny_model, free_port

# A chat template of its own for adapter "b": serving must render b's prompts with it, not the base's ChatML.
TEMPLATE_B = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"
)
QUESTIONS = ["reverse: apple banana cherry", "the quick brown fox", "reverse: golf hotel india"]
MAX_TOKENS = 10


def wide_base(src: Path, out: Path, std: float = 0.2) -> Path:
    """A copy of a tiny model with wide random weights: varied greedy answers with clear margins between the
    top two tokens (the default initialisation repeats one token: a weak test of token equality)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    model.save_pretrained(out)
    for f in src.iterdir():
        if f.is_file() and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    return out


def make_adapter(base: Path, out: Path, seed: int, template: str | None = None) -> Path:
    """A PEFT LoRA adapter with random non-zero B, saved with its tokenizer (and chat template), as training saves."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-api")
    tiny = build_tiny_model(root / "tiny", extra_texts=["the quick brown fox jumps over the lazy dog"])
    base = wide_base(tiny, root / "base")
    return {
        "base": base,
        "a": make_adapter(base, root / "a", 1),
        "b": make_adapter(base, root / "b", 2, template=TEMPLATE_B),
        "c": make_adapter(base, root / "c", 3),
    }


class InProcessServer:
    """``create_app`` over a catalog, on uvicorn in a thread on a free port (the test can look at the engine)."""

    def __init__(self, catalog: Any, api_key: str | None = None) -> None:
        import uvicorn

        from tuneforge.serve.app import create_app

        self.catalog = catalog
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(create_app(catalog, api_key=api_key), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def engine(self) -> Any:
        (engine,) = self.catalog.engines.values()
        return engine


@pytest.fixture(scope="module")
def server(models: dict[str, Path]) -> Iterator[InProcessServer]:
    """One server for the module: adapters a and b (b named by NAME=REF); the base is served as 'base'."""
    from tuneforge.serve.catalog import Catalog, add_all
    from tuneforge.serve.engine import Engine

    catalog = Catalog(lambda path: Engine(path, max_batch_size=8))
    add_all(catalog, [str(models["a"]), f"b={models['b']}"])
    with InProcessServer(catalog) as s:
        yield s


@pytest.fixture
def client(server: InProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=180)


def messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": question}]


def trained_prompt(model_dir: Path, conversation: list[dict[str, str]]) -> list[int]:
    """The prompt tokens training put before an answer to `conversation`: tuneforge.data.templates' own render."""
    from tuneforge.data.templates import encode_chat_views
    from tuneforge.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    earlier = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in conversation]  # not trained here
    turns = [*earlier, {"role": "assistant", "content": "fox"}]
    (seq,) = encode_chat_views(tokenizer, [turns], tokenizer.chat_template)[0]
    return seq.ids[: int(np.argmax(seq.mask))].tolist()


def peft_greedy(base: Path, adapter: Path | None, prompt: list[int], stop_id: int) -> tuple[list[int], list[float]]:
    """Plain PEFT (or transformers for the base) greedy decoding: the tokens and each one's log-probability."""
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter)
    out = model.eval().generate(
        input_ids=torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=MAX_TOKENS,
        do_sample=False,
        eos_token_id=stop_id,
        pad_token_id=stop_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    ids = out.sequences[0, len(prompt) :].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, ids)]
    if ids and ids[-1] == stop_id:  # the end-of-turn token ends the answer; it is not part of it
        ids, logprobs = ids[:-1], logprobs[:-1]
    return ids, logprobs


# ------------------------------------------------------------------------------------------------- tests


def test_models_are_listed_with_lineage(client: openai.OpenAI) -> None:
    cards = {m.id: m.model_dump() for m in client.models.list()}
    assert set(cards) == {"base", "a", "b"}
    assert (cards["a"]["parent"], cards["a"]["root"]) == ("base", "base")
    assert (cards["b"]["parent"], cards["b"]["root"]) == ("base", "base")
    assert (cards["base"]["parent"], cards["base"]["root"]) == (None, "base")
    assert client.models.retrieve("b").id == "b"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_two_adapters_and_the_base_concurrently_equal_peft_greedy(
    server: InProcessServer, models: dict[str, Path]
) -> None:
    """Six requests at once — three models × streamed and whole — each token for token PEFT's greedy answer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["base"])
    stop_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    jobs = [(m, q, stream) for m, q in zip(["a", "b", "base"], QUESTIONS) for stream in (False, True)]
    expected, prompts = {}, {}
    for model, question, _ in jobs:
        prompts[model] = trained_prompt(models[model], messages(question))
        adapter = models[model] if model != "base" else None
        expected[model] = peft_greedy(models["base"], adapter, prompts[model], stop_id)
    answers = {tuple(ids) for ids, _ in expected.values()}
    assert len(answers) == 3, "the three models must answer differently for this test to tell them apart"

    async def ask(model: str, question: str, stream: bool) -> tuple[str, list[Any], Any]:
        client = openai.AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=180)
        kw: dict[str, Any] = dict(model=model, messages=messages(question), max_tokens=MAX_TOKENS, temperature=0)
        kw.update(logprobs=True, top_logprobs=2)
        if not stream:
            r = await client.chat.completions.create(**kw)
            return r.choices[0].message.content or "", r.choices[0].logprobs.content, r.usage
        text, tokens, usage = "", [], None
        async for chunk in await client.chat.completions.create(
            **kw, stream=True, stream_options={"include_usage": True}
        ):
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                text += c.delta.content or ""
                tokens += c.logprobs.content if c.logprobs and c.logprobs.content else []
        return text, tokens, usage

    async def everything() -> list[tuple[str, list[Any], Any]]:
        return await asyncio.gather(*(ask(*job) for job in jobs))

    for (model, _, stream), (text, tokens, usage) in zip(jobs, asyncio.run(everything())):
        ids, logprobs = expected[model]
        where = f"{model}, stream={stream}"
        assert text == tokenizer.decode(ids, skip_special_tokens=True), where
        assert [t.token for t in tokens] == [tokenizer.decode([i]) for i in ids], where
        assert bytes(b for t in tokens for b in t.bytes).decode(errors="replace") == text, where  # exact bytes
        assert [t.logprob for t in tokens] == pytest.approx(logprobs, abs=1e-3), where
        assert all(len(t.top_logprobs) == 2 for t in tokens), where
        assert usage.completion_tokens == len(ids) + (len(ids) < MAX_TOKENS), where  # a stop token counts
        assert usage.prompt_tokens == len(prompts[model]), where


def test_the_served_prompt_is_the_trained_prompt(
    server: InProcessServer, client: openai.OpenAI, models: dict[str, Path]
) -> None:
    """b's prompts are rendered with b's own template, token for token as training rendered them."""
    from tuneforge.serve.prompts import chat_prompt_ids

    conversation = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "reverse: apple banana cherry"},
        {"role": "assistant", "content": "cherry banana apple"},
        {"role": "user", "content": "reverse: one two three"},
    ]
    for name in ("a", "b"):
        served = server.catalog.get(name)
        assert chat_prompt_ids(served, conversation) == trained_prompt(models[name], conversation)
    assert trained_prompt(models["a"], conversation) != trained_prompt(models["b"], conversation)
    # Over HTTP: the chat answer is the completion of exactly the trained prompt's tokens.
    prompt = trained_prompt(models["b"], conversation)
    chat = client.chat.completions.create(model="b", messages=conversation, max_tokens=MAX_TOKENS, temperature=0)
    raw = client.completions.create(model="b", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert chat.usage.prompt_tokens == raw.usage.prompt_tokens == len(prompt)
    # completions stop on eos only; chat also on the end-of-turn token (the same token for ChatML)
    assert chat.choices[0].message.content == raw.choices[0].text


def test_bad_requests_are_error_objects_naming_the_field(server: InProcessServer, client: openai.OpenAI) -> None:
    url = server.url + "/chat/completions"

    def error(body: Any, path: str = "/chat/completions") -> tuple[int, dict[str, Any]]:
        r = httpx.post(server.url + path, json=body) if not isinstance(body, bytes) else httpx.post(url, content=body)
        return r.status_code, r.json()["error"]

    status, e = error({"model": "a"})
    assert (status, e["param"], e["type"]) == (400, "messages", "invalid_request_error")
    assert "messages" in e["message"]
    status, e = error({"model": "a", "messages": [{"role": "user", "content": 3}]})
    assert (status, e["param"]) == (400, "messages[0].content")
    status, e = error({"model": "a", "messages": [{"role": "robot", "content": "hi"}]})
    assert (status, e["param"]) == (400, "messages[0].role")
    status, e = error({"model": "a", "messages": messages("hi"), "temperature": "hot"})
    assert (status, e["param"]) == (400, "temperature")
    status, e = error({"model": "a", "messages": messages("hi"), "tools": [{"type": "function"}]})
    assert (status, e["param"], e["code"]) == (400, "tools", "unsupported_parameter")
    status, e = error({"model": "a", "messages": messages("hi"), "temprature": 0})
    assert (status, e["param"]) == (400, "temprature") and "temperature" in e["message"]  # did you mean
    status, e = error({"model": "a", "messages": messages("hi"), "max_tokens": 100_000})
    assert (status, e["param"], e["code"]) == (400, "max_tokens", "context_length_exceeded")
    status, e = error(b"{not json")
    assert (status, e["code"]) == (400, "invalid_json")
    status, e = error({"model": "a", "prompt": []}, "/completions")
    assert (status, e["param"]) == (400, "prompt")
    status, e = error({"model": "a", "input": 5}, "/embeddings")
    assert (status, e["param"]) == (400, "input")

    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nope", messages=messages("hi"))
    assert nf.value.body["param"] == "model" and nf.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):  # a stream that cannot start is an HTTP error, not a broken stream
        client.chat.completions.create(model="nope", messages=messages("hi"), stream=True)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="a", messages=messages("hi"), top_logprobs=2)
    assert bad.value.body["param"] == "top_logprobs"


def test_stop_strings_end_the_answer_before_the_match(client: openai.OpenAI, server: InProcessServer) -> None:
    kw: dict[str, Any] = dict(model="a", messages=messages(QUESTIONS[0]), max_tokens=MAX_TOKENS, temperature=0)
    full = client.chat.completions.create(**kw)
    text = full.choices[0].message.content or ""
    assert len(text) >= 4
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    expected = text[: text.find(stop)]
    cut = client.chat.completions.create(**kw, stop=[stop, "never-seen-stop"])
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < full.usage.completion_tokens  # generation stopped there
    streamed = "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stop=stop, stream=True)
    )
    assert streamed == expected
    raw = client.completions.create(model="a", prompt="the quick brown", max_tokens=MAX_TOKENS, temperature=0)
    raw_text = raw.choices[0].text
    stop = raw_text[len(raw_text) // 2 : len(raw_text) // 2 + 1]
    cut_raw = client.completions.create(
        model="a", prompt="the quick brown", max_tokens=MAX_TOKENS, temperature=0, stop=stop
    )
    assert cut_raw.choices[0].text == raw_text[: raw_text.find(stop)]
    assert server.engine().stats()["running"] == 0


def test_n_choices_with_a_seed_are_reproducible(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model="b", messages=messages(QUESTIONS[1]), max_tokens=MAX_TOKENS, temperature=1.0)
    first = client.chat.completions.create(**kw, n=3, seed=7)
    again = client.chat.completions.create(**kw, n=3, seed=7)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    # choice i is the request with seed 7 + i, whatever else ran alongside it
    assert texts == [client.chat.completions.create(**kw, seed=7 + i).choices[0].message.content for i in range(3)]
    assert len(set(texts)) > 1, "sampling at temperature 1 with different seeds gave three identical answers"
    assert first.usage.prompt_tokens == client.chat.completions.create(**kw, seed=1).usage.prompt_tokens
    chunks = list(client.completions.create(model="b", prompt="one two", max_tokens=4, n=2, seed=3, stream=True))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}


def test_embeddings_of_the_base_and_an_adapter(server: InProcessServer, client: openai.OpenAI) -> None:
    texts = ["the quick brown fox", "reverse: apple banana cherry"]
    floats = client.embeddings.create(model="a", input=texts, encoding_format="float")
    packed = client.embeddings.create(model="a", input=texts)  # the client asks for base64 by default
    assert [d.index for d in floats.data] == [0, 1]
    vectors = np.array([d.embedding for d in floats.data])
    assert vectors.shape == (2, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.allclose(np.array([d.embedding for d in packed.data]), vectors, atol=1e-6)
    base = np.array(client.embeddings.create(model="base", input=texts[0], encoding_format="float").data[0].embedding)
    assert not np.allclose(base, vectors[0], atol=1e-4)  # the adapter changes the hidden states
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0
    raw = httpx.post(server.url + "/embeddings", json={"model": "a", "input": texts[0], "encoding_format": "base64"})
    decoded = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, vectors[0], atol=1e-6)


def test_adapters_load_and_unload_at_run_time(
    server: InProcessServer, client: openai.OpenAI, models: dict[str, Path]
) -> None:
    root = server.url
    r = httpx.post(root + "/load_lora_adapter", json={"lora_name": "c", "lora_path": str(models["c"])})
    assert r.status_code == 200, r.text
    card = client.models.retrieve("c")
    assert (card.model_dump()["parent"], card.model_dump()["root"]) == ("base", "base")
    answer = client.chat.completions.create(model="c", messages=messages(QUESTIONS[0]), max_tokens=4, temperature=0)
    assert answer.choices[0].message.content
    again = httpx.post(root + "/load_lora_adapter", json={"lora_name": "c", "lora_path": str(models["c"])})
    assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"
    full = httpx.post(root + "/load_lora_adapter", json={"lora_name": "d", "lora_path": str(models["base"])})
    assert full.status_code == 400 and full.json()["error"]["param"] == "lora_path"
    missing = httpx.post(root + "/load_lora_adapter", json={"lora_name": "d", "lora_path": "/no/such/dir"})
    assert missing.status_code == 400 and "no such" in missing.json()["error"]["message"]
    r = httpx.post(root + "/unload_lora_adapter", json={"lora_name": "c"})
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="c", messages=messages("hi"), max_tokens=2)
    assert httpx.post(root + "/unload_lora_adapter", json={"lora_name": "c"}).status_code == 404
    assert "c" not in {m.id for m in client.models.list()}


def wait_until_idle(server: InProcessServer, timeout: float = 20.0) -> int:
    """Engine rows still running once the engine has caught up (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while server.engine().stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return server.engine().stats()["running"]


def test_a_client_that_disconnects_frees_its_slot(server: InProcessServer) -> None:
    limit = 450  # tokens (the context is 512); ignore_eos: the answer runs to the limit unless its client goes
    body = {"model": "a", "messages": messages("hi"), "max_tokens": limit, "temperature": 1.0, "ignore_eos": True}
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", server.url + "/chat/completions", json={**body, "stream": True}) as r,
    ):
        assert r.status_code == 200, r.read()
        data = (line for line in r.iter_lines() if line.startswith("data: {"))
        for _ in range(4):  # the role chunk, then text
            next(data)
        assert server.engine().stats()["running"] == 1  # generation is under way
    # leaving the block closed the connection mid-stream
    assert wait_until_idle(server) == 0
    steps = server.engine().stats()["steps"]
    with pytest.raises(httpx.ReadTimeout):  # a client waiting for a whole answer gives up
        httpx.post(server.url + "/chat/completions", json=body, timeout=0.2)
    assert wait_until_idle(server) == 0
    assert server.engine().stats()["steps"] - steps < limit  # the request did not run to its end


def test_one_engine_per_base_stopped_once_nothing_uses_it(models: dict[str, Path]) -> None:
    from tuneforge.serve.catalog import Catalog, Spec
    from tuneforge.serve.engine import Engine

    catalog = Catalog(lambda path: Engine(path, max_batch_size=2))
    try:
        a, b = catalog.add(str(models["a"])), catalog.add(Spec(str(models["b"]), "bee"))
        assert a.engine is b.engine and len(catalog.engines) == 1  # one copy of the base
        assert sorted(catalog.names()) == ["a", "base", "bee"] and catalog.get(str(models["a"])).id == "a"
        engine = a.engine
        replaced = catalog.add(Spec(str(models["c"]), "bee"))  # a new adapter under the name, same engine
        assert (
            replaced.engine is engine and b.adapter not in engine.adapters() and replaced.adapter in engine.adapters()
        )
        for name in ("a", "bee"):
            catalog.remove(name)
        assert engine.adapters() == [] and len(catalog.engines) == 1  # the base is still served
        catalog.remove("base")
        assert catalog.engines == {} and catalog.names() == []
        with pytest.raises(KeyError):
            catalog.get("base")
    finally:
        catalog.close()


def test_serve_refuses_what_it_cannot_serve(models: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Clear ``error:`` lines and a non-zero exit, before anything listens."""
    from tuneforge.cli import main

    assert main(["serve", "/no/such/run"]) != 0
    assert capsys.readouterr().err.startswith("error: model /no/such/run: no such file or directory")
    assert main(["serve", f"x={models['a']}", f"x={models['b']}"]) != 0
    assert "the name 'x' is served already; give it another name: NAME=" in capsys.readouterr().err
    assert main(["serve", str(models["a"]), "--api-key-env", "TUNEFORGE_TEST_UNSET_KEY"]) != 0
    assert "TUNEFORGE_TEST_UNSET_KEY" in capsys.readouterr().err
    assert main(["serve", str(models["a"]), "--engine", "vllm"]) != 0  # no vLLM, no GPU here
    assert "--engine vllm" in capsys.readouterr().err


def test_serve_and_server_take_the_same_engine_flags(
    models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from tuneforge.cli import build_parser, main
    from tuneforge.serve.cli import engine_factory

    for command in ("serve", "server"):
        args = build_parser().parse_args([command, "--max-batch-size", "3", "--max-model-len", "48"])
        engine = engine_factory(args)(models["base"])
        try:
            assert (engine.max_batch_size, engine.max_model_len) == (3, 48)
        finally:
            engine.stop()
    assert main(["server", "--engine", "vllm", "--no-tracking"]) != 0  # no vLLM, no GPU here: refused at once
    assert "--engine vllm" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ as processes


def _start(cmd: list[str], url: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    raise RuntimeError(f"did not start: {log.read_text()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


@pytest.mark.slow
def test_deploy_a_registered_version_and_move_its_alias(
    server: InProcessServer, client: openai.OpenAI, models: dict[str, Path]
) -> None:
    """``deploy models:/support/N --alias production``: served as support@production, alias set once it serves;
    deploying version 2 with the same alias swaps what the name answers with, without a restart."""
    from tuneforge.serve.cli import deploy
    from tuneforge.tracking import registry
    from tuneforge.tracking.mlflow_tracker import Tracker

    with Tracker.start(experiment="serve", run_name="r", params={}, tags={}) as tracker:
        v1 = tracker.register_model(models["b"], "support", {"base_model": str(models["base"])})
        v2 = tracker.register_model(models["c"], "support", {"base_model": str(models["base"])})
    kw: dict[str, Any] = dict(messages=messages(QUESTIONS[1]), max_tokens=MAX_TOKENS, temperature=0)
    b_answer = client.chat.completions.create(model="b", **kw).choices[0].message.content

    first = deploy(f"models:/support/{v1}", server=server.url, alias="production")
    assert (first["id"], first["alias"]["version"], first["version"]["version"]) == ("support@production", v1, v1)
    assert registry.resolve("models:/support@production").version == v1
    assert client.chat.completions.create(model="support@production", **kw).choices[0].message.content == b_answer

    second = deploy(f"models:/support/{v2}", server=server.url, alias="production")
    assert second["alias"]["version"] == v2 and registry.resolve("models:/support@production").version == v2
    assert client.chat.completions.create(model="support@production", **kw).choices[0].message.content != b_answer
    assert {m.id for m in client.models.list()} >= {"support@production", "a", "b", "base"}

    with pytest.raises(TuneforgeError, match="--alias needs a registered version"):
        deploy(str(models["c"]), server=server.url, alias="production")
    assert httpx.delete(server.url + "/deployments/support@production").status_code == 200
    assert "support@production" not in {m.id for m in client.models.list()}


@pytest.mark.slow
def test_tuneforge_serve_with_a_key_and_deploy_without_restart(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tuneforge.cli import main

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "SERVE_KEY": "secret-key"}
    cmd = [sys.executable, "-m", "tuneforge", "serve", f"support={models['a']}", "--port", str(port)]
    proc = _start([*cmd, "--api-key-env", "SERVE_KEY", "--max-batch-size", "4"], url, env, tmp_path / "serve.log")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=url + "/v1", api_key="secret-key", max_retries=0, timeout=180)
        assert {m.id for m in client.models.list()} == {"support", "base"}
        monkeypatch.setenv("TUNEFORGE_API_KEY", "secret-key")
        assert main(["deploy", str(models["b"]), "--name", "bee", "--server", url + "/v1"]) == 0
        assert '"id": "bee"' in capsys.readouterr().out
        assert {m.id for m in client.models.list()} == {"support", "base", "bee"}
        answer = client.chat.completions.create(model="bee", messages=messages("hi"), max_tokens=3, temperature=0)
        assert answer.choices[0].message.content
        assert main(["deploy", "/no/such/run", "--server", url + "/v1"]) != 0
        assert capsys.readouterr().err.startswith("error: ")
        monkeypatch.setenv("TUNEFORGE_API_KEY", "wrong")
        assert main(["deploy", str(models["c"]), "--server", url + "/v1"]) != 0
        assert "401" in capsys.readouterr().err
    finally:
        _stop(proc)


@pytest.mark.slow
def test_the_jobs_service_serves_its_fine_tuned_models(models: dict[str, Path], tmp_path: Path) -> None:
    """``tuneforge server``: a project's ``ft:`` model answers chat on first request; another project's key
    cannot see it; a registered base name answers too; /v1/models lists a model deployed at run time."""
    from tuneforge.service.auth import create_key
    from tuneforge.service.base_models import add_model
    from tuneforge.service.db import Database, Job, Project

    add_model("tiny", models["base"])  # in this test's $TUNEFORGE_HOME, which the server inherits
    db_url = f"sqlite:///{tmp_path / 'service.db'}"
    db = Database(db_url)
    db.migrate()
    mine, theirs = create_key(db, "mine"), create_key(db, "theirs")
    name = "ft:tiny:mine::abc123"
    with db.session() as s:  # what the scheduler writes when a job succeeds
        project = s.query(Project).filter_by(name="mine").one()
        s.add(
            Job(
                id="ftjob-abc123",
                project_pk=project.pk,
                status="succeeded",
                request={},
                model="tiny",
                training_file="file-x",
                method="sft",
                seed=0,
                fine_tuned_model=name,
                output_dir=str(models["a"]),
            )
        )
    db.dispose()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "tuneforge", "server", "--port", str(port), "--database-url", db_url, "--no-tracking"]
    proc = _start(cmd, url, dict(os.environ), tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=mine, max_retries=0, timeout=120)
        listed = {m.id: m.model_dump() for m in client.models.list()}
        assert (listed[name]["parent"], listed[name]["root"]) == ("tiny", "tiny")
        answer = client.chat.completions.create(
            model=name, messages=messages(QUESTIONS[0]), max_tokens=4, temperature=0
        )
        assert answer.model == name and answer.choices[0].message.content
        base = client.chat.completions.create(
            model="tiny", messages=messages(QUESTIONS[0]), max_tokens=4, temperature=0
        )
        assert base.choices[0].message.content != answer.choices[0].message.content
        other = openai.OpenAI(base_url=url + "/v1", api_key=theirs, max_retries=0, timeout=180)
        with pytest.raises(openai.NotFoundError):
            other.chat.completions.create(model=name, messages=messages("hi"), max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="tfk-wrong", max_retries=0).chat.completions.create(
                model="tiny", messages=messages("hi")
            )
        r = httpx.post(
            url + "/v1/deployments",
            json={"model": str(models["b"]), "name": "bee"},
            headers={"Authorization": f"Bearer {mine}"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert "bee" in {m.id for m in client.models.list()}
        assert "bee" not in {m.id for m in other.models.list()}
    finally:
        _stop(proc)
