"""Evaluation tasks and the engine under them: every task type and metric on the tiny model, log-likelihoods checked
against direct forward passes, batch-size invariance, the bundled suite, and task-file errors that name the place."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tuneforge.errors import DataError
from tuneforge.eval import loglik, metrics
from tuneforge.eval.bundled import SUITES_DIR, general_records, write_general
from tuneforge.eval.generate import generate_from_ids, stop_ids
from tuneforge.eval.runner import encode_pair, evaluate, evaluate_task, generation_metric
from tuneforge.eval.scores import MetricStats, macro_f1_of, mean_of
from tuneforge.eval.tasks import GenerationTask, TaskError, load_tasks, task_from_config

from conftest import write_jsonl


@pytest.fixture(scope="module")
def loaded(tiny_model: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 0.3 M-parameter model gains nothing from threads, and a shared machine loses a lot
    torch.set_flush_denormal(True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    yield model, AutoTokenizer.from_pretrained(tiny_model)
    torch.set_num_threads(threads)


def direct_logprob(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log p(continuation | context) from one unbatched forward pass over the whole sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([context + continuation])).logits[0].float()
    lp = logits.log_softmax(-1)
    rows = range(len(context) - 1, len(context) + len(continuation) - 1)
    total = sum(lp[r, t].item() for r, t in zip(rows, continuation))
    greedy = all(int(logits[r].argmax()) == t for r, t in zip(rows, continuation))
    return total, greedy


def random_requests(n: int, seed: int = 0) -> list[loglik.Request]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ctx = [rng.randrange(5, 300) for _ in range(rng.randint(1, 24))]
        conts = [[rng.randrange(5, 300) for _ in range(rng.randint(1, 7))] for _ in range(rng.randint(1, 5))]
        out.append(loglik.Request(ctx, conts))
    return out


# ------------------------------------------------------------------------------------------- log-likelihood


@pytest.mark.parametrize("shared", [True, False])
def test_loglik_equals_a_direct_forward_pass(loaded, shared: bool) -> None:
    model, _ = loaded
    requests = random_requests(12)
    got = loglik.score(model, requests, batch_size=6, share_context=shared)
    for request, scored in zip(requests, got):
        assert [s.tokens for s in scored] == [len(c) for c in request.continuations]
        for cont, s in zip(request.continuations, scored):
            want, greedy = direct_logprob(model, list(request.context), list(cont))
            assert s.logprob == pytest.approx(want, abs=1e-4)
            assert s.greedy == greedy


def test_loglik_is_the_same_for_any_batch_size(loaded) -> None:
    model, _ = loaded
    requests = random_requests(17, seed=1)
    runs = {bs: loglik.score(model, requests, batch_size=bs) for bs in (1, 3, 8, 64)}
    flat = {bs: np.array([s.logprob for row in r for s in row]) for bs, r in runs.items()}
    for bs in (3, 8, 64):
        assert np.abs(flat[bs] - flat[1]).max() < 1e-5
        assert [s.greedy for row in runs[bs] for s in row] == [s.greedy for row in runs[1] for s in row]
    again = loglik.score(model, requests, batch_size=8)
    assert [s.logprob for row in again for s in row] == flat[8].tolist()  # bit for bit at a given batch size


def test_loglik_truncates_from_the_left_like_lm_eval(loaded) -> None:
    model, _ = loaded
    ctx, cont = list(range(10, 40)), [50, 51, 52]
    (scored,) = loglik.score(model, [loglik.Request(ctx, [cont])], max_length=16)
    # the model sees the last 16 tokens of context + continuation[:-1]
    want, _ = direct_logprob(model, ctx[-(16 + 1 - len(cont)) :], cont)
    assert scored[0].logprob == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError, match="longer than the model"):
        loglik.score(model, [loglik.Request([1], [list(range(20))])], max_length=16)


def test_rolling_windows_score_every_token_once() -> None:
    tokens = list(range(100, 137))
    windows = loglik.rolling_requests(tokens, prefix=1, max_length=10)
    assert [t for w in windows for c in w.continuations for t in c] == tokens
    assert windows[0].context == [1]
    for w in windows:  # every window is one forward pass of at most max_length tokens
        assert len(w.context) + len(w.continuations[0]) - 1 <= 10
    assert windows[-1].context == tokens[26:30]  # the short last window gets all the context that fits (4 + 7 - 1)


def test_prompt_tuning_adapter_is_scored_without_the_shared_cache(loaded) -> None:
    import peft

    model, _ = loaded
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    torch.manual_seed(0)
    tuned = peft.get_peft_model(copy.deepcopy(model), config).eval()
    assert not loglik.shares_context(tuned) and loglik.shares_context(model)
    requests = random_requests(5, seed=2)
    got = loglik.score(tuned, requests, batch_size=4)
    single = loglik.score(tuned, requests, batch_size=1)
    for a, b in zip(got, single):
        assert [x.logprob for x in a] == pytest.approx([x.logprob for x in b], abs=1e-5)
    plain = loglik.score(model, requests, batch_size=4)
    assert got[0][0].logprob != pytest.approx(plain[0][0].logprob, abs=1e-3)  # the virtual tokens count


# ---------------------------------------------------------------------------------------- multiple choice


def mc_records(n: int) -> list[dict]:
    rng = random.Random(3)
    words = ["apple", "banana", "cherry", "delta", "echo", "fox", "golf", "hotel"]
    return [
        {
            "question": f"reverse: {' '.join(rng.sample(words, 3))}",
            "choices": rng.sample(words, 4),
            "answer": i % 4,
            "skill": "ab"[i % 2],
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("chat", [True, False])
def test_multiple_choice_scores_each_choice_after_the_prompt(loaded, tmp_path: Path, chat: bool) -> None:
    from tuneforge.data.templates import render_chat

    model, tok = loaded
    records = mc_records(10)
    write_jsonl(tmp_path / "mc.jsonl", records)
    task = task_from_config(
        {
            "type": "multiple_choice",
            "data": "mc.jsonl",
            "prompt": "{{item.question}}",
            "chat": chat,
            "group_by": "skill",
        },
        base_dir=tmp_path,
    )
    result = evaluate_task(model, tok, task, batch_size=5)
    for record, item in zip(records, result.items):
        prompt = (
            render_chat(
                tok, [{"role": "user", "content": record["question"]}], tok.chat_template, add_generation_prompt=True
            )
            if chat
            else record["question"]
        )
        request = encode_pair(tok, prompt, [("" if chat else " ") + c for c in record["choices"]], chat=chat)
        want = [direct_logprob(model, list(request.context), list(c))[0] for c in request.continuations]
        assert item["loglik"] == pytest.approx(want, abs=1e-4)
        assert item["pred"] == int(np.argmax(want))
        lengths = np.array([len(c) for c in record["choices"]], dtype=float)
        assert item["pred_norm"] == int(np.argmax(np.array(want) / lengths))
    values = result.values()
    assert values["acc"] == pytest.approx(np.mean([i["pred"] == r["answer"] for i, r in zip(result.items, records)]))
    assert values["acc/a"] == pytest.approx(
        np.mean([i["pred"] == r["answer"] for i, r in zip(result.items, records) if r["skill"] == "a"])
    )

    # The model's own favourites as gold answers: accuracy 1, whatever the batch size.
    for record, item in zip(records, result.items):
        record["answer"] = record["choices"][item["pred"]]  # gold given as text this time
    write_jsonl(tmp_path / "mc.jsonl", records)
    again = evaluate_task(model, tok, load_tasks([_task_file(tmp_path, chat)])[0], batch_size=1)
    assert again.values()["acc"] == 1.0


def _task_file(root: Path, chat: bool) -> str:
    path = root / "mc.yaml"
    path.write_text(
        f"type: multiple_choice\ndata: mc.jsonl\nprompt: '{{{{item.question}}}}'\nchat: {str(chat).lower()}\n"
    )
    return str(path)


def test_plain_text_pairs_are_split_like_lm_eval(loaded) -> None:
    _, tok = loaded
    request = encode_pair(tok, "reverse: apple banana ", ["fox", "golf"], chat=False)
    whole = tok("reverse: apple banana fox")["input_ids"]
    assert list(request.context) + list(request.continuations[0]) == whole  # the trailing space moved over
    assert request.context == tok("reverse: apple banana")["input_ids"]


# ---------------------------------------------------------------------------------------------- generation


def test_generation_metrics_on_known_answers(tmp_path: Path) -> None:
    from rouge_score.rouge_scorer import RougeScorer
    from sacrebleu.metrics import BLEU

    write_jsonl(tmp_path / "g.jsonl", [{"prompt": "x", "answer": "a"}])
    task = task_from_config({"type": "generation", "data": "g.jsonl"}, base_dir=tmp_path)
    preds = ["The answer is 42.", "cat sat on the mat", "billing/refunds", "Paris", "b"]
    refs = ["42", "the cat sat on the mat", "billing/refunds", "paris", "a"]
    spec = GenerationTask.model_fields["metrics"].annotation.__args__[0]  # the Metric union

    def run(raw: dict) -> MetricStats:
        from pydantic import TypeAdapter

        return generation_metric(TypeAdapter(spec).validate_python(raw), preds, refs, task, [])

    assert run({"type": "exact_match"}).item_scores() == [0, 0, 1, 0, 0]
    assert run({"type": "exact_match", "lowercase": True}).value() == pytest.approx(2 / 5)
    assert run({"type": "regex", "pattern": r"answer is (\d+)"}).item_scores() == [1, 0, 0, 0, 0]
    assert run({"type": "regex", "pattern": "mat$"}).item_scores() == [0, 1, 0, 0, 0]
    assert run({"type": "macro_f1"}).value() == pytest.approx(metrics.macro_f1(preds, refs))
    labels = ["42", "billing/refunds", "paris", "a", "the cat sat on the mat"]
    assert run({"type": "macro_f1", "labels": labels}).value() == pytest.approx(metrics.macro_f1(preds, refs, labels))
    rouge = RougeScorer(["rougeL"])
    assert run({"type": "rouge_l"}).item_scores() == pytest.approx(
        [rouge.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]
    )
    assert run({"type": "bleu"}).value() == pytest.approx(BLEU().corpus_score(preds, [refs]).score)
    grader = {
        "type": "string_check",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "operation": "ilike",
    }
    task.items = [{"answer": r} for r in refs]
    assert run({"type": "grader", "grader": grader}).item_scores() == [1, 0, 1, 1, 0]  # reference inside the output


def test_python_grader_is_an_eval_metric(tmp_path: Path) -> None:
    """A reinforcement job's grader file scores generations as it scores rollouts (in the sandbox)."""
    grader = tmp_path / "grader.json"
    source = "def grade(sample, item):\n    return float(sample['output_text'].strip() == item['answer'])\n"
    grader.write_text(json.dumps({"type": "python", "name": "same", "source": source}))
    write_jsonl(tmp_path / "g.jsonl", [{"prompt": "x", "answer": a} for a in ("1", "2")])
    task = task_from_config(
        {"type": "generation", "data": "g.jsonl", "metrics": [{"type": "grader", "grader": "grader.json"}]},
        base_dir=tmp_path,
    )
    from pydantic import TypeAdapter

    spec = TypeAdapter(GenerationTask.model_fields["metrics"].annotation.__args__[0]).validate_python(
        {"type": "grader", "grader": "grader.json"}
    )
    notes: list[str] = []
    assert generation_metric(spec, [" 1", "3"], ["1", "2"], task, notes).item_scores() == [1.0, 0.0]
    assert notes == []


def test_generation_task_end_to_end(loaded, tmp_path: Path) -> None:
    """Greedy answers under the chat template: the same for any batch size, and scored against the records."""
    model, tok = loaded
    records = [
        {"messages": [{"role": "user", "content": r["question"]}], "answer": "?", "skill": r["skill"]}
        for r in mc_records(12)
    ]
    write_jsonl(tmp_path / "gen.jsonl", records)
    config = {
        "type": "generation",
        "data": "gen.jsonl",
        "max_new_tokens": 6,
        "group_by": "skill",
        "metrics": ["exact_match", "rouge_1"],
    }
    task = task_from_config(config, base_dir=tmp_path)
    one = evaluate_task(model, tok, task, batch_size=1)
    many = evaluate_task(model, tok, task, batch_size=8)
    preds = [i["prediction"] for i in one.items]
    assert preds == [i["prediction"] for i in many.items]
    # The model's answers as references: every one an exact match, per group too.
    for record, p in zip(records, preds):
        record["answer"] = p
    write_jsonl(tmp_path / "gen.jsonl", records)
    scored = evaluate_task(model, tok, task_from_config(config, base_dir=tmp_path), batch_size=4)
    assert scored.values()["exact_match"] == 1.0 and scored.values()["exact_match/a"] == 1.0
    assert set(scored.metrics) == {"exact_match", "rouge_1", "exact_match/a", "rouge_1/a", "exact_match/b", "rouge_1/b"}


def test_a_chat_record_answer_is_its_reference(tmp_path: Path) -> None:
    """A held-out SFT file is an evaluation set as it is: the last assistant turn is the reference."""
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    write_jsonl(tmp_path / "sft.jsonl", [record])
    task = task_from_config({"type": "generation", "data": "sft.jsonl"}, base_dir=tmp_path)
    assert task.messages(task.items[0]) == record["messages"][:1]
    assert task.reference(task.items[0]) == "hello"


def test_generation_stops_at_the_end_of_turn_token(loaded) -> None:
    model, tok = loaded
    llama3_like = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|pad|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    stops = stop_ids(tok, llama3_like)
    assert tok.convert_tokens_to_ids("<|pad|>") in stops and tok.eos_token_id in stops

    # A head that always writes the same ordinary token: stopping on it leaves nothing, not stopping fills the budget.
    token = tok("apple", add_special_tokens=False)["input_ids"][0]
    biased = _always(model, token)
    prompt = [tok("reverse: fox", add_special_tokens=False)["input_ids"]]
    assert generate_from_ids(biased, tok, prompt, max_new_tokens=5, batch_size=1, stops=[token]) == [""]
    assert generate_from_ids(biased, tok, prompt, max_new_tokens=5, batch_size=1, stops=[tok.eos_token_id]) == [
        tok.decode([token] * 5)
    ]


def _always(model, token: int):
    m = copy.deepcopy(model)
    m.config.tie_word_embeddings = False
    head = torch.nn.Linear(m.lm_head.in_features, m.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token] = 100.0
    m.lm_head = head
    return m.eval()


# ---------------------------------------------------------------------------------------------- perplexity


def test_perplexity_is_every_token_after_bos(loaded, tmp_path: Path) -> None:
    model, tok = loaded
    texts = ["the quick brown fox jumps over the lazy dog", "one two three four five six seven"]
    write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    task = task_from_config({"type": "perplexity", "data": "t.jsonl"}, base_dir=tmp_path)
    result = evaluate_task(model, tok, task, batch_size=2)
    nll, n_tok, n_bytes = 0.0, 0, 0
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        lp, _ = direct_logprob(model, [tok.bos_token_id], ids)
        nll, n_tok, n_bytes = nll - lp, n_tok + len(ids), n_bytes + len(t.encode())
    assert result.values()["perplexity"] == pytest.approx(math.exp(nll / n_tok), rel=1e-5)
    assert result.values()["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)


# ---------------------------------------------------------------------------------------------- statistics


def test_metric_statistics_survive_json() -> None:
    preds, refs = ["a", "b", "c", "a"], ["a", "a", "c", "b"]
    f1 = macro_f1_of(preds, refs)
    assert f1.value() == pytest.approx(metrics.macro_f1(preds, refs))
    for stats in (f1, mean_of([1, 0, 0.5, 1])):
        back = MetricStats.from_dict(json.loads(json.dumps(stats.to_dict())))
        assert back.value() == stats.value() and np.array_equal(back.stats, stats.stats)
    assert "sparse_rows" in f1.to_dict()  # per-class counts are mostly zeros


# ---------------------------------------------------------------------------------------------- suites, files


def test_the_bundled_suite_is_what_its_generator_writes(tmp_path: Path) -> None:
    from tuneforge.demo import world

    for path in write_general(tmp_path):
        assert path.read_bytes() == (SUITES_DIR / path.name).read_bytes(), (
            f"regenerate: python -m tuneforge.eval.bundled ({path.name})"
        )
    # the demo's quick evaluation set is a prefix of the shipped one
    assert general_records()["general-skills"][:40] == world.general_eval_items(4, 40)
    tasks = load_tasks(["general"])
    assert [t.name for t in tasks] == ["general-skills", "general-facts", "general-text"]
    assert [t.type for t in tasks] == ["generation", "multiple_choice", "perplexity"]


def test_the_suite_runs_on_a_model(loaded) -> None:
    model, tok = loaded
    results = evaluate(model, tok, load_tasks(["general"], limit=8), batch_size=8)
    values = results.flat_values()
    assert 0.0 <= values["general-facts/acc"] <= 1.0 and values["general-text/perplexity"] > 1.0
    assert "general-skills/exact_match/capital" in values


def test_unknown_task_names_suggest_the_nearest(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="unknown task 'generall' — did you mean 'general'"):
        load_tasks(["generall"])
    with pytest.raises(TaskError, match="task data not found"):
        load_tasks([str(_yaml(tmp_path, "type: generation\ndata: missing.jsonl\n"))])


def _yaml(root: Path, text: str, name: str = "task.yaml") -> Path:
    path = root / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("type: generation\ndata: d.jsonl\nmax_new_tokns: 4\n", r"task.yaml:3: max_new_tokns: unknown field"),
        (
            "type: generation\ndata: d.jsonl\nmetrics:\n  - exact_mach\n",
            r"task.yaml:4: metrics\[0\].type: unknown metric 'exact_mach' — did you mean 'exact_match'",
        ),
        (
            "type: generation\ndata: d.jsonl\nmetrics:\n  - type: regex\n    pattern: '(unclosed'\n",
            r"task.yaml:5: metrics\[0\].pattern: not a valid regular expression",
        ),
        (
            "type: generation\ndata: d.jsonl\nmetrics:\n  - type: regex\n",
            r"task.yaml:4: metrics\[0\].pattern: required field is missing",
        ),
        (
            "type: multiple_choise\ndata: d.jsonl\n",
            r"task.yaml:1: type: unknown task type 'multiple_choise' — did you mean 'multiple_choice'",
        ),
        ("data: d.jsonl\n", r"task.yaml:1: type: required field is missing"),
        (
            "type: generation\ndata: d.jsonl\nmax_new_tokens: 0\n",
            r"task.yaml:3: max_new_tokens: Input should be greater than 0",
        ),
        ("type: generation\ndata: d.jsonl\nprompt: '{{ itm.q }}'\n", r"task.yaml:3: prompt: .*unknown namespace 'itm'"),
        ("type: generation\n  data: [\n", r"task.yaml:2: not valid YAML"),
    ],
)
def test_task_file_errors_name_file_line_and_field(tmp_path: Path, text: str, message: str) -> None:
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(TaskError, match=message):
        load_tasks([str(_yaml(tmp_path, text))])


def test_bad_records_are_named_by_file_and_line(tmp_path: Path) -> None:
    write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"question": "q", "choices": ["a", "b"], "answer": 0},
            {"question": "q", "choices": ["a", "b"], "answer": 5},
            "{broken",
        ],
    )
    path = _yaml(tmp_path, "type: multiple_choice\ndata: d.jsonl\nprompt: '{{item.question}}'\n")
    with pytest.raises(DataError, match=r"d.jsonl:3: not valid JSON"):
        load_tasks([str(path)])
    write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"question": "q", "choices": ["a", "b"], "answer": 0},
            {"question": "q", "choices": ["a"], "answer": 0},
            {"choices": ["a", "b"], "answer": 7},
        ],
    )
    with pytest.raises(DataError) as e:
        load_tasks([str(path)])
    text = str(e.value)
    assert "d.jsonl:2: choices: expected a list of at least two choices" in text
    assert (
        "d.jsonl:3: " in text
        and "item has no key 'question'" in text
        and "d.jsonl:3: answer: 7 is not a choice" in text
    )
