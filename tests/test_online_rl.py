"""Online RL (GRPO with graders, RLAIF with a judge endpoint, PPO with a reward model) on tiny models.

The policy starts from a tiny Llama fine-tuned for a few seconds on the reverse-three-words task, so it answers
with words from its vocabulary. The verifiable task: the answer must mention the prompt record's ``keyword``
(a ``string_check`` grader over ``{{item.keyword}}``). Outcomes are measured independently of the task's own
evaluation: greedy answers from plain ``transformers`` generation, scored by the same grader / reward model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import tuneforge
from tuneforge.errors import DataError, RecipeError, TuneforgeError

from conftest import WORDS, ChatServer, base_recipe, greedy_answers, reverse_task, write_jsonl

KEYWORD_GRADER = {
    "type": "string_check",
    "name": "mentions",
    "input": "{{sample.output_text}}",
    "reference": "{{item.keyword}}",
    "operation": "like",
}


def prompt_records(n: int, seed: int) -> list[dict]:
    return [
        {"messages": r["messages"][:1], "keyword": "apple", "answer": r["messages"][1]["content"]}
        for r in reverse_task(n, seed)
    ]


@pytest.fixture(scope="module")
def policy(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model after a short SFT on the reverse task (a policy that answers with words)."""
    root = tmp_path_factory.mktemp("policy")
    data = write_jsonl(root / "sft.jsonl", reverse_task(200, seed=1))
    result = tuneforge.train(base_recipe(tiny_model, data, root / "run", max_steps=60, lr=3e-3), progress=False)
    return result.output_dir


def online_recipe(model: Path, data: Path, out: Path, method: str = "grpo", **section: object) -> dict:
    rec = base_recipe(model, data, out, max_steps=24, lr=2e-3, global_batch_size=8, eval_every=100)
    rec["method"] = method
    rec["data"]["val_fraction"] = 0.1
    rec["generation"] = {"max_new_tokens": 12}
    if method == "grpo":
        rec["grpo"] = {"graders": KEYWORD_GRADER, "group_size": 8, "eval_prompts": 32, **section}
    else:
        rec["ppo"] = dict(section)
    return rec


def mean_grade(grader_config: dict, answers: list[str], records: list[dict]) -> float:
    from tuneforge.rewards.graders import load_grader

    return sum(load_grader(grader_config).grade_batch(answers, records)) / len(records)


# ------------------------------------------------------------------------------------------------- GRPO


def test_grpo_raises_held_out_grader_reward(policy: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_records(200, seed=7))
    held_out = prompt_records(48, seed=99)
    before = mean_grade(KEYWORD_GRADER, greedy_answers(policy, held_out), held_out)
    result = tuneforge.train(online_recipe(policy, data, tmp_path / "run"), progress=False)
    after = mean_grade(KEYWORD_GRADER, greedy_answers(result.output_dir, held_out), held_out)
    assert before < 0.5 and after >= before + 0.4, (before, after)
    sampled = [h["reward"] for h in result.history]
    assert sum(sampled[-4:]) / 4 > sum(sampled[:4]) / 4 + 0.3
    for key in ("reward_std", "completion_length", "frac_groups_no_signal", "grader_errors"):
        assert key in result.history[-1]
    assert result.evals[0]["step"] == 0 and result.evals[-1]["step"] == 24  # the baseline, then the end
    assert result.evals[-1]["val/reward"] > result.evals[0]["val/reward"]


def _one_step_grads(prepared, model, micro: int, rows: range) -> dict[str, torch.Tensor]:
    task = prepared.make_task(model, micro, "fp32", torch.device("cpu"))
    task.begin_step(model, 0, rows)
    model.zero_grad(set_to_none=True)
    weight = task.loss_tokens(rows)
    first = list(rows)[: len(rows) // 2]  # two calls, as two replicas (or accumulation rounds) would make
    task.forward_backward(model, first, 1.0 / weight)
    task.forward_backward(model, list(rows)[len(first) :], 1.0 / weight)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_gradient_does_not_depend_on_the_split(policy: Path, tmp_path: Path, loss_type: str) -> None:
    from tuneforge.config import load_recipe
    from tuneforge.training.build import build_model, prepare

    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_records(40, seed=3))
    recipe = load_recipe(online_recipe(policy, data, tmp_path / "run", loss_type=loss_type, beta=0.05))
    prepared = prepare(recipe)
    model = build_model(recipe, torch.device("cpu"))
    rows = range(4)
    whole = _one_step_grads(prepared, model, 64, rows)
    split = _one_step_grads(prepared, model, 3, rows)
    assert whole and whole.keys() == split.keys()
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-7)


def test_grpo_resume_samples_and_trains_exactly_like_the_uninterrupted_run(policy: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_records(60, seed=5))
    straight = tuneforge.train(online_recipe(policy, data, tmp_path / "a"), train__max_steps=4, progress=False)
    cut = online_recipe(policy, data, tmp_path / "b")
    cut["train"].update(max_steps=4, checkpoint_every=2)
    from tuneforge.training.checkpoint import list_checkpoints

    first = tuneforge.train(cut, progress=False)
    resumed = tuneforge.train(cut, resume=list_checkpoints(first.run_dir / "checkpoints")[0], progress=False)
    assert [h["reward"] for h in resumed.history] == [h["reward"] for h in straight.history[2:]]
    assert [round(h["loss"], 6) for h in resumed.history] == [round(h["loss"], 6) for h in straight.history[2:]]


def test_grpo_reuses_each_batch_for_num_iterations_steps_with_the_clipped_ratio(policy: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_records(60, seed=21))
    rec = online_recipe(policy, data, tmp_path / "run", num_iterations=3)
    rec["train"]["max_steps"] = 6
    result = tuneforge.train(rec, progress=False)
    history = result.history
    assert len(history) == 6
    # one batch of completions per 3 steps: same rewards within a batch, a fresh batch after
    assert history[0]["reward"] == history[1]["reward"] == history[2]["reward"]
    assert history[3]["reward"] == history[4]["reward"] == history[5]["reward"]
    assert history[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # on-policy on the step that sampled
    assert history[1]["ratio_mean"] != pytest.approx(1.0, abs=1e-6)  # the policy moved: importance ratio
    rec["train"]["checkpoint_every"] = 4
    with pytest.raises(RecipeError, match="checkpoint_every: 4 must be a multiple of grpo.num_iterations=3"):
        tuneforge.train(rec, progress=False)


def test_a_crashing_grader_scores_zero_and_the_run_goes_on(policy: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_records(40, seed=11))
    grader = {
        "type": "python",
        "name": "fragile",
        "source": "def grade(sample, item):\n    if 'apple' in sample['output_text']:\n        raise ValueError('no')\n"
        "    return 0.5 if len(sample['output_text']) > 3 else 0.0\n",
    }
    rec = online_recipe(policy, data, tmp_path / "run", graders=grader, group_size=4)
    rec["train"]["max_steps"] = 3
    result = tuneforge.train(rec, progress=False)
    assert len(result.history) == 3
    completions = 8 * 4  # per step: global_batch_size prompts, group_size completions each
    assert sum(h["grader_errors"] for h in result.history) > 0  # the policy does say 'apple': the grader crashed
    for h in result.history:
        # every completion scored 0 or 0.5, and each crash counted as a 0: the reward is 0.5 * (good ones) / 32
        good = h["reward"] * completions / 0.5
        assert good == pytest.approx(round(good), abs=1e-4), h
        assert round(good) <= completions - h["grader_errors"], h


# ------------------------------------------------------------------------------------------------- RLAIF


class KeywordJudge(ChatServer):
    """An OpenAI-compatible judge (conftest's ``ChatServer``) that scores 1 when the answer mentions 'apple'."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: list[str] = []

    def reply(self, body: dict) -> str:
        answer = body["messages"][-1]["content"].split("Answer:", 1)[1].strip()
        self.answers.append(answer)
        return f"Score: {1 if 'apple' in answer else 0}"


def test_rlaif_grpo_with_a_judge_behind_an_openai_compatible_endpoint(
    policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_records(80, seed=13))
    judge = {
        "type": "score_model",
        "name": "judge",
        "model": "keyword-judge",
        "range": [0, 1],
        "input": [{"role": "user", "content": "Question: {{item.messages}}\nAnswer: {{sample.output_text}}"}],
        "sampling_params": {"temperature": 0},
        "max_concurrency": 4,
    }
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    with KeywordJudge() as server:
        rec = online_recipe(
            policy,
            data,
            tmp_path / "run",
            graders=judge,
            judge_base_url=server.url,
            judge_api_key_env="JUDGE_KEY",
            group_size=4,
        )
        rec["train"]["max_steps"] = 4
        result = tuneforge.train(rec, progress=False)
    # the held-out prompts are judged before and after training; every sampled completion in between
    trained = 4 * 8 * 4
    held_out = (len(server.answers) - trained) // 2
    assert held_out > 0 and len(server.answers) == trained + 2 * held_out
    sampled = server.answers[held_out : held_out + trained]
    rewards = [h["reward"] for h in result.history]
    assert all(h["grader_errors"] == 0 for h in result.history)
    expected = [sum("apple" in a for a in sampled[i * 32 : (i + 1) * 32]) / 32 for i in range(4)]
    assert rewards == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------- PPO


def keyword_pairs(n: int, seed: int) -> list[dict]:
    """Preference pairs: an answer mentioning 'apple' beats one that does not."""
    rng = random.Random(seed)
    others = [w for w in WORDS if w != "apple"]
    out = []
    for r in reverse_task(n, seed):
        words = rng.sample(others, 3)
        chosen = words[:]
        chosen[rng.randrange(3)] = "apple"
        out.append({"prompt": r["messages"][:1], "chosen": " ".join(chosen), "rejected": " ".join(words)})
    return out


@pytest.fixture(scope="module")
def reward_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rm")
    data = write_jsonl(root / "pairs.jsonl", keyword_pairs(300, seed=2))
    rec = base_recipe(tiny_model, data, root / "run", max_steps=40, lr=3e-3, global_batch_size=16)
    rec["method"] = "reward"
    return tuneforge.train(rec, progress=False).output_dir


def test_ppo_raises_reward_model_score_with_bounded_kl(policy: Path, reward_model: Path, tmp_path: Path) -> None:
    from tuneforge.models.reward import load_reward_model, score_conversations

    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_records(200, seed=17))
    held_out = prompt_records(48, seed=98)
    rm, rm_tokenizer = load_reward_model(reward_model)

    def score(model_dir: Path) -> float:
        answers = greedy_answers(model_dir, held_out)
        convs = [[*r["messages"], {"role": "assistant", "content": a}] for r, a in zip(held_out, answers)]
        return float(score_conversations(rm, rm_tokenizer, convs).mean())

    before = score(policy)
    rec = online_recipe(
        policy, data, tmp_path / "run", method="ppo", reward_model=str(reward_model), kl_coef=0.05, epochs=2
    )
    rec["train"].update(max_steps=40, lr=3e-3, global_batch_size=32)
    result = tuneforge.train(rec, progress=False)
    after = score(result.output_dir)
    assert after > before + 1.0, (before, after)
    kls = [h["kl"] for h in result.history]
    assert 0.1 < max(kls) < 3.0, kls  # nats per token: the policy moved, but the penalty kept it near the reference
    assert (result.run_dir / "value_head.safetensors").exists()
    assert result.history[-1]["score"] > result.history[0]["score"]
    assert result.history[0]["policy_clipfrac"] == 0.0 and any(h["policy_clipfrac"] > 0 for h in result.history)


# ------------------------------------------------------------------------------------------------- errors


def test_online_methods_want_prompts_not_answers(policy: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", reverse_task(20))
    with pytest.raises(DataError) as e:
        tuneforge.train(online_recipe(policy, data, tmp_path / "run"), progress=False)
    assert "chat.jsonl:1: messages[1].role" in str(e.value) and "ending with a user" in str(e.value)


def test_prompts_that_leave_no_room_to_answer_are_named(policy: Path, tmp_path: Path) -> None:
    records = prompt_records(20, seed=1)
    records[4]["messages"][0]["content"] = "reverse: " + " ".join(WORDS * 3)
    data = write_jsonl(tmp_path / "prompts.jsonl", records)
    rec = online_recipe(policy, data, tmp_path / "run")
    rec["data"]["max_length"] = 40
    with pytest.raises(DataError) as e:
        tuneforge.train(rec, progress=False)
    assert "prompts.jsonl:5: messages: prompt is" in str(e.value) and "at most 28 tokens" in str(e.value)
    rec["data"]["on_overlong"] = "drop"
    rec["train"]["max_steps"] = 1
    result = tuneforge.train(rec, progress=False)
    assert result.data["prompts"]["dropped_overlong"] == 1


def test_recipe_errors_for_online_methods(policy: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_records(20, seed=1))
    rec = online_recipe(policy, data, tmp_path / "run")
    del rec["grpo"]
    with pytest.raises(RecipeError, match="method grpo needs a 'grpo:' section"):
        tuneforge.train(rec, progress=False)
    rec = online_recipe(policy, data, tmp_path / "run", graders={**KEYWORD_GRADER, "operation": "contains"})
    with pytest.raises(RecipeError, match="grpo.graders: operation"):
        tuneforge.train(rec, progress=False)
    rec = online_recipe(policy, data, tmp_path / "run", method="ppo", reward_model=str(tmp_path / "nope"))
    with pytest.raises(RecipeError, match="ppo.reward_model: .*nope is not a directory"):
        tuneforge.train(rec, progress=False)
    with pytest.raises(TuneforgeError, match="--resume applies to single-process runs"):
        tuneforge.train(online_recipe(policy, data, tmp_path / "run"), replicas="1:2", resume="latest", progress=False)
    json.dumps(rec)  # recipes stay plain data


def test_data_validate_checks_prompt_records_and_keeps_grader_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tuneforge.cli import main

    records = prompt_records(3, seed=1)
    records[1] = reverse_task(1)[0]  # a chat that ends with the answer is not a prompt
    path = write_jsonl(tmp_path / "prompts.jsonl", records)
    assert main(["data", "validate", str(path), "--format", "prompt"]) == 1
    out = capsys.readouterr()
    assert "prompts.jsonl:2: messages[1].role: prompt ends with 'assistant'" in out.out + out.err
    assert "keyword" not in out.out + out.err  # extra keys are for the graders, not errors


# ------------------------------------------------------------------------------------------------ elastic replicas


def _weights(result: tuneforge.api.TrainResult) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (result.output_dir / "adapter_config.json").exists() else "model.safetensors"
    return load_file(str(result.output_dir / name))


def _rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in a)
    return (num / sum(float(a[k].norm() ** 2) for k in a)) ** 0.5


ELASTIC = {"timeout_s": 20, "hang_timeout_s": 60, "checkpoint_every": 0}


@pytest.mark.slow
def test_grpo_on_replicas_with_a_kill_mid_rollout_equals_one_process(policy: Path, tmp_path: Path) -> None:
    """Each replica samples half the step's groups; replica 1 is SIGKILLed after sampling, before the shares are
    gathered; the survivor recomputes the step. Weights and per-step rewards equal the single-process run's."""
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_records(120, seed=21))
    recipe = online_recipe(policy, data, tmp_path / "single", num_iterations=2, beta=0.05)
    recipe["train"].update(max_steps=6, micro_batch_size=2, checkpoint_every=2)
    single = tuneforge.train(recipe, progress=False)
    recipe["output"]["dir"] = str(tmp_path / "elastic")
    recipe["resilience"] = ELASTIC
    elastic = tuneforge.train(recipe, replicas="2:2", fault_plan="kill:1@2", progress=False)
    report = elastic.extra["report"]
    assert len(report.failures) == 1 and report.steps_lost == 0
    assert [h["reward"] for h in elastic.history] == pytest.approx([h["reward"] for h in single.history], abs=1e-6)
    assert [h["step"] for h in elastic.history] == list(range(1, 7))
    assert _rel_diff(_weights(single), _weights(elastic)) <= 1e-5


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ppo_on_2_then_3_then_1_replicas_equals_one_process(policy: Path, reward_model: Path, tmp_path: Path) -> None:
    """PPO (two epochs per batch of rollouts) while the job grows to 3 replicas and shrinks to 1: a replica that
    joins mid-batch gets the batch's rollouts with the live state; the result equals the single-process run."""
    import threading
    import time

    from tuneforge.distributed import scale

    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_records(200, seed=23))
    recipe = online_recipe(policy, data, tmp_path / "single", method="ppo", reward_model=str(reward_model), epochs=2)
    recipe["train"].update(max_steps=24, micro_batch_size=2, checkpoint_every=2, global_batch_size=6)
    single = tuneforge.train(recipe, progress=False)
    run_dir = tmp_path / "elastic"
    recipe["output"]["dir"] = str(run_dir)
    recipe["resilience"] = {**ELASTIC, "replicas": 2, "min_replicas": 1, "max_replicas": 3, "hot_spares": 1}
    box: dict[str, object] = {}
    thread = threading.Thread(target=lambda: box.update(result=tuneforge.train(recipe, replicas="1:3", progress=False)))
    thread.start()

    def steps_done() -> int:
        path = run_dir / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + 240
        while steps_done() < n and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)

    try:
        wait_for(3)
        scale(run_dir, 3)
        wait_for(13)
        scale(run_dir, 1)
    finally:
        thread.join(420)
    assert not thread.is_alive() and "result" in box
    elastic = box["result"]
    assert isinstance(elastic, tuneforge.api.TrainResult)
    from tuneforge.distributed.metrics import read_events

    worlds: list[int] = []
    for e in sorted(
        (e for e in read_events(run_dir) if e["kind"] == "attempt" and e["committed"]), key=lambda e: e["step"]
    ):
        if not worlds or worlds[-1] != e["world"]:
            worlds.append(e["world"])
    assert worlds[0] == 2 and 3 in worlds and worlds[-1] == 1, worlds
    assert elastic.extra["report"].steps_lost == 0
    assert [h["score"] for h in elastic.history] == pytest.approx([h["score"] for h in single.history], abs=1e-5)
    assert _rel_diff(_weights(single), _weights(elastic)) <= 1e-5
