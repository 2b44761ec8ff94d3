"""Reward graders: each type, templates, the multi formula, judges behind a real server, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tuneforge.errors import RecipeError
from tuneforge.rewards import similarity, templates
from tuneforge.rewards.cli import grader_cli
from tuneforge.rewards.graders import load_grader
from tuneforge.rewards.judge import parse_score

from conftest import ChatServer, free_port, tiny_llama

OUT = "{{sample.output_text}}"


def check(op: str, reference: str = "{{item.answer}}") -> dict:
    return {"type": "string_check", "name": "check", "input": OUT, "reference": reference, "operation": op}


# --------------------------------------------------------------------------------------------- templates


def test_templates_reach_nested_values_lists_and_output_json():
    item = {"answer": "4", "meta": {"tags": ["math", "easy"], "n": 3}, "choices": [{"label": "A"}]}
    sample = {"output_text": '```json\n{"final": {"value": 4}}\n```'}
    text = "{{item.meta.tags[1]}}|{{ item.meta.n }}|{{item.choices.0.label}}|{{sample.output_json.final.value}}|{{item.meta.tags}}"
    assert templates.render(text, sample, item) == 'easy|3|A|4|["math", "easy"]'
    assert templates.render("no placeholders {x}", sample, item) == "no placeholders {x}"


@pytest.mark.parametrize(
    "template, message",
    [
        ("{{item.answr}}", "template '{{item.answr}}': item has no key 'answr' — did you mean 'answer'?"),
        ("{{item.meta.tags[5]}}", "item.meta.tags is a list of 1; 5 is not an index in it"),
        ("{{item.answer.x}}", "item.answer is a str, it has no field 'x'"),
        ("{{sample.output_json.a}}", "sample.output_json: the output text is not JSON"),
    ],
)
def test_missing_values_name_the_template(template, message):
    with pytest.raises(templates.TemplateError) as e:
        templates.render(template, {"output_text": "plain text"}, {"answer": "4", "meta": {"tags": ["t"]}})
    assert message in str(e.value)


def test_a_missing_key_scores_zero_with_the_error_not_a_crash():
    grader = load_grader(check("eq", "{{item.solution}}"))
    ok, missing = grader.evaluate_batch(["4", "4"], [{"solution": "4"}, {"answer": "4"}])
    assert ok.score == 1.0 and ok.error is None
    assert missing.score == 0.0 and "{{item.solution}}" in missing.error


# ------------------------------------------------------------------------------------------ string_check


@pytest.mark.parametrize(
    "op, output, expected",
    [
        ("eq", "Paris", 1.0),
        ("eq", "paris", 0.0),
        ("ne", "Paris", 0.0),
        ("ne", "Lyon", 1.0),
        ("like", "The capital is Paris.", 1.0),
        ("like", "the capital is paris.", 0.0),
        ("ilike", "THE CAPITAL IS PARIS.", 1.0),
        ("ilike", "Lyon", 0.0),
    ],
)
def test_string_check_operations(op, output, expected):
    assert load_grader(check(op)).grade({"output_text": output}, {"answer": "Paris"}) == expected


# --------------------------------------------------------------------------------------- text_similarity


def test_metrics_against_hand_computed_values():
    # 1-4 gram precisions 5/6, 3/5, 1/4, and 0/3 smoothed to 1/(2*3); equal lengths: no brevity penalty.
    expected_bleu = (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert similarity.bleu("the cat sat on the mat", "the cat is on the mat") == pytest.approx(expected_bleu)
    # A short output is penalised: exp(1 - 6/3) times its (perfect) precisions.
    assert similarity.bleu("the cat is", "the cat is on the mat") == pytest.approx(math.exp(1 - 6 / 3))
    # ROUGE-1: overlap 3 of 3 output and 6 reference unigrams -> F1 = 2 * 1 * 0.5 / 1.5.
    assert similarity.rouge_n("The cat SAT", "the cat sat on the mat", 1) == pytest.approx(2 / 3)
    assert similarity.rouge_n("the cat sat", "the cat sat on the mat", 2) == pytest.approx(2 * 1 * 0.4 / 1.4)
    assert similarity.rouge_l("a b c d", "a c d e") == pytest.approx(0.75)  # LCS "a c d"
    assert similarity.fuzzy_match("kitten", "sitting") == pytest.approx(2 * 4 / 13)  # LCS "ittn"
    # No word in common scores 0 on every word metric (BLEU's smoothing must not invent a score); the character
    # LCS of fuzzy_match finds only the space: 2 * 1 / (7 + 7). (cosine and meteor: tests/test_similarity.py.)
    lexical = [name for name in similarity.METRICS if name not in ("cosine", "meteor")]
    disjoint = dict.fromkeys(lexical, 0.0) | {"fuzzy_match": 2 * 1 / 14}
    for name in lexical:
        same = similarity.similarity(name, "the same six words in here", "the same six words in here")
        assert same == pytest.approx(1.0), name
        assert similarity.similarity(name, "xyz uvw", "qrs pno") == pytest.approx(disjoint[name]), name


def test_text_similarity_grader_renders_then_scores():
    grader = load_grader(
        {
            "type": "text_similarity",
            "name": "sim",
            "input": OUT,
            "reference": "{{item.ref}}",
            "evaluation_metric": "rouge_l",
        }
    )
    assert grader.grade("a c d e", {"ref": "a b c d"}) == pytest.approx(0.75)


@pytest.mark.parametrize("metric, message", [("rouge_6", "did you mean 'rouge_l'"), ("cosin", "did you mean 'cosine'")])
def test_unknown_metrics_are_clear_errors(metric, message):
    with pytest.raises(RecipeError) as e:
        load_grader(
            {"type": "text_similarity", "name": "s", "input": OUT, "reference": OUT, "evaluation_metric": metric}
        )
    assert "evaluation_metric" in str(e.value) and message in str(e.value)


# ------------------------------------------------------------------------------------------------ python


def test_python_grader_batches_and_reports_errors():
    source = "def grade(sample, item):\n    return float(sample['output_text'].strip() == item['answer'])\n"
    grader = load_grader({"type": "python", "name": "py", "source": source})
    assert grader.grade_batch([" 4", "5", {"output_text": "4"}], [{"answer": "4"}] * 3) == [1.0, 0.0, 1.0]
    [bad] = grader.evaluate_batch(["4"], [{}])
    assert bad.score == 0.0 and "KeyError" in bad.error


# ------------------------------------------------------------------------------------------------- multi


def _multi(formula: str) -> dict:
    return {
        "type": "multi",
        "name": "combined",
        "graders": {
            "exact": check("eq"),
            "overlap": {
                "type": "text_similarity",
                "name": "o",
                "input": OUT,
                "reference": "{{item.answer}}",
                "evaluation_metric": "rouge_1",
            },
        },
        "calculate_output": formula,
    }


@pytest.mark.parametrize(
    "formula, combine",
    [
        ("0.5 * exact + 0.5 * overlap", lambda e, o: 0.5 * e + 0.5 * o),
        ("max(exact, overlap) - min(exact, overlap) / 2", lambda e, o: max(e, o) - min(e, o) / 2),
        ("abs(exact - overlap) ** 2", lambda e, o: abs(e - o) ** 2),
        ("-overlap + 1", lambda e, o: 1 - o),
    ],
)
def test_multi_formula(formula, combine):
    result = load_grader(_multi(formula)).evaluate("answer is", {"answer": "answer"})
    exact, overlap = result.details["sub_scores"]["exact"], result.details["sub_scores"]["overlap"]
    assert exact == 0.0 and overlap == pytest.approx(2 * 0.5 * 1 / 1.5)  # rouge_1: precision 1/2, recall 1
    assert result.score == pytest.approx(combine(exact, overlap)) and result.error is None


def test_multi_formula_runtime_errors_score_zero():
    result = load_grader(_multi("overlap / exact")).evaluate("x", {"answer": "y"})
    assert result.score == 0.0 and "ZeroDivisionError" in result.error
    result = load_grader(_multi("(exact - 1) ** 0.5")).evaluate("x", {"answer": "y"})
    assert result.score == 0.0 and "not a real number" in result.error


@pytest.mark.parametrize(
    "formula, message",
    [
        ("exact + bonus", "unknown name 'bonus'"),
        ("__import__('os').system('true')", "is not allowed"),
        ("exact.real", "is not allowed"),
        ("(lambda: 1)()", "is not allowed"),
        ("[exact][0]", "is not allowed"),
        ("round(exact)", "is not allowed"),
        ("max(*[exact])", "plain argument"),
        ("exact if overlap else 1", "is not allowed"),
        ("'1' + exact", "is not allowed"),
        ("exact +", "not a valid formula"),
    ],
)
def test_unsafe_or_wrong_formulas_are_refused_at_load(formula, message):
    with pytest.raises(RecipeError) as e:
        load_grader(_multi(formula))
    assert "calculate_output" in str(e.value) and message in str(e.value)


def test_sub_grader_errors_propagate_through_multi():
    config = _multi("exact + overlap")
    config["graders"]["exact"] = check("eq", "{{item.missing}}")
    result = load_grader(config).evaluate("answer", {"answer": "answer"})
    assert result.score == pytest.approx(1.0)  # the failed sub-grader counts as 0
    assert result.error.startswith("exact: template '{{item.missing}}'")


# ------------------------------------------------------------------------------------------- validation


GRADE_SRC = "def grade(s, i):\n  return 1\n"
USER_X = [{"role": "user", "content": "x"}]
JUDGE = {"type": "score_model", "model": "m", "base_url": "http://127.0.0.1:9"}
TYPO_SUB = {"type": "string_check", "input": OUT, "reference": "x", "opration": "eq"}


@pytest.mark.parametrize(
    "config, message",
    [
        ({"name": "x"}, "type: required field is missing"),
        ({"type": "string_chek"}, "did you mean 'string_check'"),
        ({**check("eq"), "operation": "equals"}, "operation: unknown operation 'equals'"),
        (
            {**check("eq"), "refrence": "x"},
            "refrence: unknown field for a string_check grader — did you mean 'reference'",
        ),
        ({k: v for k, v in check("eq").items() if k != "reference"}, "reference: required field is missing"),
        ({**check("eq"), "input": 3}, "input: expected a string"),
        ({**check("eq"), "input": "{{sample.output}}"}, "sample has no field 'output'"),
        ({"type": "python", "source": "def grade(s, i):\n  return (\n"}, "source: line 2"),
        ({"type": "python", "source": "def score(s, i):\n  return 1\n"}, "must define a top-level function grade"),
        (
            {"type": "python", "source": GRADE_SRC, "limits": {"cpu_second": 1}},
            "limits.cpu_second: unknown limit — did you mean",
        ),
        (
            {"type": "python", "source": GRADE_SRC, "limits": {"memory_mb": -1}},
            "limits.memory_mb: expected a positive number",
        ),
        ({"type": "multi", "graders": {"a": TYPO_SUB}, "calculate_output": "a"}, "graders.a.opration"),
        ({"type": "multi", "graders": {}, "calculate_output": "1"}, "graders: expected at least one grader"),
        ({**JUDGE, "input": USER_X, "range": [1, 0]}, "range: expected [low, high]"),
        (
            {**JUDGE, "input": [{"role": "user", "content": [{"type": "input_text", "text": "{{itm.q}}"}]}]},
            "input[0].content[0].text: template '{{itm.q}}': unknown namespace",
        ),
        ({**JUDGE, "input": [{"role": "judge", "content": "x"}]}, "input[0].role: unknown role 'judge'"),
        (
            {**JUDGE, "input": USER_X, "sampling_params": {"temprature": 0}},
            "sampling_params.temprature: unknown sampling parameter — did you mean 'temperature'",
        ),
        ({**JUDGE, "input": USER_X, "sampling_params": {"seed": 1.5}}, "sampling_params.seed: expected an integer"),
        ({"type": "label_model"}, "not supported by tuneforge"),
    ],
)
def test_config_errors_name_the_field(config, message):
    with pytest.raises(RecipeError) as e:
        load_grader(config)
    assert message in str(e.value)


def test_judge_without_endpoint_or_key_is_a_load_error(no_ambient_openai):
    with pytest.raises(RecipeError, match="no endpoint is configured"):
        load_grader(
            {"type": "score_model", "name": "j", "model": "gpt-4o", "input": [{"role": "user", "content": "x"}]}
        )
    with pytest.raises(RecipeError, match="JUDGE_KEY is not set"):
        load_grader(
            {
                "type": "score_model",
                "name": "j",
                "model": "gpt-4o",
                "api_key_env": "JUDGE_KEY",
                "input": [{"role": "user", "content": "x"}],
            }
        )


def test_load_from_files_reports_line_and_column(tmp_path):
    good = tmp_path / "grader.yaml"
    good.write_text(
        "type: string_check\nname: c\ninput: '{{sample.output_text}}'\nreference: '{{item.answer}}'\noperation: eq\n"
    )
    assert load_grader(good).grade("4", {"answer": "4"}) == 1.0
    wrapped = tmp_path / "job.json"
    wrapped.write_text(json.dumps({"grader": check("ilike")}))
    assert load_grader(wrapped).grade("Answer: FOUR", {"answer": "four"}) == 1.0
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "type": "string_check",\n  "name": }\n')
    with pytest.raises(RecipeError, match=r"broken\.json:3:11: not valid JSON"):
        load_grader(broken)
    bad_field = tmp_path / "bad.json"
    bad_field.write_text(json.dumps({**check("eq"), "operation": "=="}))
    with pytest.raises(RecipeError, match=r"bad\.json: operation"):
        load_grader(bad_field)


# ----------------------------------------------------------------------------------- score_model (judge)


@pytest.mark.parametrize(
    "reply, score",
    [
        ("0.8", 0.8),
        ("Score: 7/10", 7.0),
        ('{"score": 0.3, "reason": "ok"}', 0.3),
        ("On a scale of 0 to 1, I give 0.8", 0.8),
        ("<think>maybe 5</think>Rating: 4", 4.0),
    ],
)
def test_parse_score(reply, score):
    assert parse_score(reply) == score


class JudgeServer(ChatServer):
    """A deterministic judge behind a real OpenAI-compatible HTTP server (conftest's ``ChatServer``)."""

    def reply(self, body: dict) -> str:
        prompt = body["messages"][-1]["content"]
        if "RAMBLE" in prompt:
            return "I cannot decide."
        if "BOAST" in prompt:
            return "Score: 17"
        answer = prompt.split("Answer:")[1].split("\n")[0].strip()
        reference = prompt.split("Reference:")[1].split("\n")[0].strip()
        return (
            f"The answer {'matches' if answer == reference else 'differs'}. Score: {1 if answer == reference else 0.25}"
        )


@pytest.fixture(scope="module")
def judge_server():
    with JudgeServer() as server:
        yield server


def _judge_config(url: str, **extra) -> dict:
    return {
        "type": "score_model",
        "name": "judge",
        "model": "judge-model",
        "base_url": url,
        "input": [
            {"role": "system", "content": "You grade answers. Reply with 'Score: N'."},
            {
                "role": "user",
                "content": [
                    {
                        "type": "input_text",
                        "text": "Question: {{item.question}}\nAnswer: {{sample.output_text}}\nReference: {{item.answer}}",
                    }
                ],
            },
        ],
        "range": [0, 1],
        "sampling_params": {"temperature": 0, "max_completions_tokens": 32, "seed": 7},
        **extra,
    }


def test_score_model_calls_a_real_endpoint_with_the_openai_client(judge_server, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-judge-test")
    grader = load_grader(_judge_config(f"http://127.0.0.1:{judge_server.port}/v1", api_key_env="JUDGE_KEY"))
    judge_server.requests.clear()
    items = [{"question": "2+2?", "answer": "4"}] * 3 + [
        {"question": "RAMBLE", "answer": "x"},
        {"question": "BOAST", "answer": "x"},
    ]
    results = grader.evaluate_batch(["4", "5", "4", "?", "?"], items)
    assert [r.score for r in results[:3]] == [1.0, 0.25, 1.0]
    assert results[3].score == 0.0 and "no number" in results[3].error
    assert results[4].score == 1.0 and results[4].details["raw_score"] == 17.0  # clamped to range
    assert len(judge_server.requests) == 5
    request = judge_server.requests[0]
    assert request["authorization"] == "Bearer sk-judge-test"
    assert (
        request["body"]["temperature"] == 0
        and request["body"]["max_completion_tokens"] == 32
        and request["body"]["seed"] == 7
    )
    prompts = sorted(r["body"]["messages"][1]["content"] for r in judge_server.requests)
    assert "Question: 2+2?\nAnswer: 5\nReference: 4" in prompts


def test_recipe_level_endpoint_is_the_default(judge_server):
    config = _judge_config("")
    del config["base_url"]
    grader = load_grader(config, base_url=f"http://127.0.0.1:{judge_server.port}/v1", api_key="sk-recipe")
    judge_server.requests.clear()
    assert grader.grade("4", {"question": "q", "answer": "4"}) == 1.0
    assert judge_server.requests[0]["authorization"] == "Bearer sk-recipe"


def test_unreachable_judge_scores_zero_with_an_error():
    port = free_port()  # a port nobody listens on
    grader = load_grader(_judge_config(f"http://127.0.0.1:{port}/v1", timeout=2, max_retries=0))
    result = grader.evaluate("4", {"question": "q", "answer": "4"})
    assert result.score == 0.0 and "judge call failed: APIConnectionError" in result.error


def test_multi_with_a_judge_and_a_check(judge_server):
    config = {
        "type": "multi",
        "name": "mix",
        "graders": {"judge": _judge_config(f"http://127.0.0.1:{judge_server.port}/v1"), "exact": check("eq")},
        "calculate_output": "0.5 * judge + 0.5 * exact",
    }
    grader = load_grader(config)
    assert grader.grade_batch(["4", "5"], [{"question": "q", "answer": "4"}] * 2) == [1.0, 0.125]


def _tiny_judge_model(path: Path) -> None:
    """A 1-layer Llama whose output head is zero, so greedy decoding always emits token 0: "0.7"."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"0.7": 0, "<unk>": 1, "<pad>": 2, "</s>": 3, "user": 4, "assistant": 5, "score": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="</s>",
        chat_template="{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}assistant {% endif %}",
    )
    tokenizer.save_pretrained(path)
    model = tiny_llama(
        0,
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        initializer_range=0.02,
        tie_word_embeddings=False,
        pad_token_id=2,
        eos_token_id=3,
        bos_token_id=None,
    )
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.save_pretrained(path)


def test_score_model_with_a_local_hugging_face_directory(tmp_path):
    import torch

    torch.set_num_threads(1)
    _tiny_judge_model(tmp_path / "judge")
    config = _judge_config("")
    del config["base_url"]
    config["model"] = str(tmp_path / "judge")
    config["sampling_params"] = {"temperature": 0, "max_completions_tokens": 3}
    result = load_grader(config).evaluate("4", {"question": "q", "answer": "4"})
    assert result.error is None, result.error
    assert result.details["reply"].split() == ["0.7", "0.7", "0.7"]
    assert result.score == pytest.approx(0.7)


# --------------------------------------------------------------------------------------------------- CLI


def test_grader_cli(tmp_path, capsys):
    path = tmp_path / "grader.json"
    path.write_text(json.dumps(_multi("0.5 * exact + 0.5 * overlap")))
    item_file = tmp_path / "item.json"
    item_file.write_text(json.dumps({"answer": "Paris"}))
    assert grader_cli(str(path), f"@{item_file}", '{"output_text": "Paris"}') == 0
    out = capsys.readouterr().out
    assert "score: 1" in out and '"exact": 1.0' in out
    assert grader_cli(str(path), '{"answer": "Paris"}', "Lyon") == 0  # plain text sample
    assert "score: 0" in capsys.readouterr().out
    assert grader_cli(str(path), '{"question": "no answer key"}', "Paris") == 1
    assert "{{item.answer}}" in capsys.readouterr().err
    assert grader_cli(str(path), "{not json", "Paris") == 1
    assert "--item: not valid JSON" in capsys.readouterr().err
    assert grader_cli(str(tmp_path / "missing.json"), "{}", "x") == 1
    assert "grader config not found" in capsys.readouterr().err


def test_grader_cli_python_grader_reports_the_sandbox(tmp_path, capsys):
    path = tmp_path / "py.json"
    path.write_text(
        json.dumps(
            {
                "type": "python",
                "name": "p",
                "source": "def grade(sample, item):\n    return len(sample['output_text']) / 10\n",
            }
        )
    )
    assert grader_cli(str(path), "{}", "hello") == 0
    captured = capsys.readouterr()
    assert "score: 0.5" in captured.out and "sandbox: separate isolated interpreter" in captured.err
