"""Assistant-only masks under the public chat templates of real model families (``tests/assets/chat_templates``).

For every family and every case, each trained assistant turn must be learned exactly as it is served: the
prompt serving renders (``render_chat(..., add_generation_prompt=True)`` of the conversation before the turn)
tokenizes as the start of the sequence that trains the turn, and the supervised tokens are the family's own
rendering of the answer up to and including its end-of-turn token — nothing else in any sequence.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from chat_families import FAMILIES, family_tokenizer

from tuneforge.data.templates import (
    ChatTemplateError,
    chat_views,
    encode_chat_views,
    encode_chats,
    end_of_turn,
    render_chat,
)

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str, **extra: object) -> dict:
    return {"role": "assistant", "content": text, **extra}


THREE_TURNS = [
    user("What is the capital of France?"),
    assistant("Paris."),
    user("And of Italy?"),
    assistant("Rome."),
    user("Which one is bigger?"),
    assistant("Paris, by population."),
]
CASES = {
    "single_turn": [user("What is the capital of France?"), assistant("Paris.")],
    "system_and_user": [SYSTEM, user("What is the capital of France?"), assistant("Paris.")],
    "three_turns": THREE_TURNS,
    "system_and_three_turns": [SYSTEM, *THREE_TURNS],
    "weight_0_turns": [user("one"), assistant("two", weight=0), user("three"), assistant("four")],
}
REASONING_CASES = {  # for the families whose templates render reasoning
    "reasoning_single_turn": [user("What is 2 + 3?"), assistant("5.", reasoning_content="2 + 3 = 5")],
    "reasoning_three_turns": [
        user("What is 2 + 3?"),
        assistant("5.", reasoning_content="2 + 3 = 5"),
        user("And times 4?"),
        assistant("20.", reasoning_content="5 * 4 = 20"),
        user("Thanks!"),
        assistant("You are welcome."),  # no reasoning on this one: an empty block where the family writes one
    ],
}

# How each family's template writes an assistant turn after its generation prompt, through its end-of-turn token
# and the line break written with it (read off each template's source; the code is checked against these).
COMPLETION = {
    "gemma3": "{content}<end_of_turn>\n",
    "gpt_oss": "<|channel|>final<|message|>{content}<|return|>",
    "llama3": "{content}<|eot_id|>",
    "llama3_1": "{content}<|eot_id|>",
    "llama3_2": "{content}<|eot_id|>",
    "mistral_v0_3": " {content}</s>",
    "phi3_5": "{content}<|end|>\n",
    "phi4": "{content}<|im_end|>",
    "qwen2_5": "{content}<|im_end|>\n",
    "qwen3": "<think>\n{reasoning}\n</think>\n\n{content}<|im_end|>\n",
    "smollm3": "{content}<|im_end|>\n",
}
WITH_REASONING = {
    "gpt_oss": "<|channel|>analysis<|message|>{reasoning}<|end|><|start|>assistant<|channel|>final<|message|>"
    "{content}<|return|>",
    "qwen3": COMPLETION["qwen3"],
}
# Where a family's template renders a turn differently once later turns follow, each turn trains on its own.
SPLITS = {
    ("qwen3", "three_turns"),
    ("qwen3", "system_and_three_turns"),
    ("qwen3", "weight_0_turns"),  # one trained turn: one sequence all the same
    ("qwen3", "reasoning_three_turns"),
    ("gpt_oss", "three_turns"),
    ("gpt_oss", "system_and_three_turns"),
    ("gpt_oss", "reasoning_three_turns"),
    ("mistral_v0_3", "system_and_three_turns"),  # the system prompt goes with the last user message
}

PARAMS = [(f, c) for f in FAMILIES for c in CASES] + [(f, c) for f in WITH_REASONING for c in REASONING_CASES]


def expected_completion(family: str, message: dict) -> str:
    reasoning = message.get("reasoning_content")
    form = WITH_REASONING[family] if reasoning and family in WITH_REASONING else COMPLETION[family]
    return form.format(content=message["content"], reasoning=reasoning or "")


def trained_turns(conversation: list[dict]) -> list[int]:
    return [i for i, m in enumerate(conversation) if m["role"] == "assistant" and m.get("weight", 1)]


def served_prompt_ids(tokenizer: object, conversation: list[dict], turn: int) -> list[int]:
    """What serving feeds the model before it writes `turn` (as tuneforge.eval.generate renders and tokenizes)."""
    prompt = render_chat(tokenizer, conversation[:turn], None, add_generation_prompt=True)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def supervised_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(np.int8), 0]))
    return list(zip(edges[0::2], edges[1::2]))


@pytest.mark.parametrize(("family", "case"), PARAMS)
def test_masks_are_the_served_answers_with_the_end_of_turn_token(family: str, case: str) -> None:
    tokenizer = family_tokenizer(family)
    conversation = {**CASES, **REASONING_CASES}[case]
    (sequences,) = encode_chat_views(tokenizer, [conversation], None)

    expected = [expected_completion(family, conversation[i]) for i in trained_turns(conversation)]
    learned = [tokenizer.decode(s.ids[a:b]) for s in sequences for a, b in supervised_runs(s.mask)]
    assert learned == expected  # every trained answer, in order, and nothing else anywhere
    assert len(sequences) == (len(expected) if (family, case) in SPLITS else 1)


@pytest.mark.parametrize(("family", "case"), PARAMS)
def test_serving_renders_the_prompt_exactly_as_training_did(family: str, case: str) -> None:
    """The served prompt of every trained turn is a token prefix of the sequence that trains it, and the answer
    the model must then write is exactly that sequence's next supervised tokens."""
    tokenizer = family_tokenizer(family)
    conversation = {**CASES, **REASONING_CASES}[case]
    (sequences,) = encode_chat_views(tokenizer, [conversation], None)
    for turn in trained_turns(conversation):
        (seq,) = [s for s in sequences if turn in s.turns]
        prompt = served_prompt_ids(tokenizer, conversation, turn)
        assert seq.ids[: len(prompt)].tolist() == prompt
        run = next(b for a, b in supervised_runs(seq.mask) if a == len(prompt))  # supervision starts right there
        assert tokenizer.decode(seq.ids[len(prompt) : run]) == expected_completion(family, conversation[turn])


def test_the_end_of_turn_token_is_read_off_the_template() -> None:
    """Not the tokenizer's eos: Llama 3 declares <|end_of_text|>, Phi-3.5 <|endoftext|>; serving stops earlier."""
    found = {f: end_of_turn(family_tokenizer(f), None) for f in ("llama3", "phi3_5", "gpt_oss", "qwen3")}
    assert found == {"llama3": "<|eot_id|>", "phi3_5": "<|end|>", "gpt_oss": "<|return|>", "qwen3": "<|im_end|>"}
    assert family_tokenizer("llama3").eos_token == "<|end_of_text|>"


def test_mistral_trains_with_the_system_prompt_where_serving_puts_it() -> None:
    """Mistral v0.3 renders the system prompt with the last user message, so a chat ending in an answer renders
    without it; training must still see it — also with loss_on: all, which trains every token it shows."""
    tokenizer = family_tokenizer("mistral_v0_3")
    conversation = CASES["system_and_three_turns"]
    assert SYSTEM["content"] not in render_chat(tokenizer, conversation, None)
    for loss_on in ("assistant", "all"):
        sequences = chat_views(tokenizer, conversation, None, loss_on)
        assert len(sequences) == 3
        assert all(f"[INST] {SYSTEM['content']}\n\n" in s.text for s in sequences)
    ((ids, mask),) = encode_chats(tokenizer, [CASES["system_and_user"]], None, "all")  # one answer: one sequence
    assert SYSTEM["content"] in tokenizer.decode(ids[mask.astype(bool)])


def test_reasoning_a_template_cannot_render_is_refused_by_turn() -> None:
    tokenizer = family_tokenizer("llama3_1")
    conversation = [user("q"), assistant("a", reasoning_content="because"), user("q2"), assistant("b", thinking="so")]
    with pytest.raises(ChatTemplateError) as err:
        encode_chat_views(tokenizer, [CASES["single_turn"], conversation], None)
    problems = [(p.conversation, p.field) for p in err.value.problems]
    assert problems == [(1, "messages[1].reasoning_content"), (1, "messages[3].thinking")]
    assert "does not render reasoning" in err.value.problems[0].problem
    assert "conversation 1: messages[1].reasoning_content:" in str(err.value)


def test_reasoning_under_either_name_trains_on_either_family() -> None:
    """Qwen3 reads reasoning_content and gpt-oss thinking; a record written for one trains on the other."""
    conversation = [user("What is 2 + 3?"), assistant("5.", thinking="2 + 3 = 5")]
    ((ids, mask),) = encode_chats(family_tokenizer("qwen3"), [conversation], None)
    assert family_tokenizer("qwen3").decode(ids[mask.astype(bool)]) == "<think>\n2 + 3 = 5\n</think>\n\n5.<|im_end|>\n"


def test_a_conversation_the_template_rejects_names_the_message_and_the_templates_reason() -> None:
    tokenizer = family_tokenizer("mistral_v0_3")  # its template demands alternating user / assistant turns
    with pytest.raises(ChatTemplateError) as err:
        encode_chats(tokenizer, [[user("a"), user("b"), assistant("c")]], None)
    (problem,) = err.value.problems
    assert problem.field == "messages[1]"
    assert "must alternate" in problem.problem


def test_a_template_whose_prompt_never_matches_is_refused_with_the_turn() -> None:
    """A prompt that changes whenever a message is added (here: a message count up front) cannot be served as
    trained, whatever is done with it."""
    counting = (
        "{{ messages|length }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer = family_tokenizer("qwen2_5")
    with pytest.raises(ChatTemplateError) as err:
        encode_chats(tokenizer, [CASES["single_turn"]], counting)
    assert err.value.problems[0].field == "messages[1]"
    assert "renders the conversation before this turn differently" in err.value.problems[0].problem


def test_one_sequence_per_example_refuses_a_conversation_the_template_splits() -> None:
    """DPO, KTO and reward models need one sequence per example; SFT takes the split (encode_chat_views)."""
    tokenizer = family_tokenizer("qwen3")
    with pytest.raises(ChatTemplateError) as err:
        encode_chats(tokenizer, [CASES["single_turn"], THREE_TURNS], None)
    assert [(p.conversation, p.field) for p in err.value.problems] == [(1, "messages[1]")]
    assert "trains as a sequence of its own" in err.value.problems[0].problem


def test_the_error_survives_a_worker_process() -> None:
    """Tokenizing runs in worker processes: the problems must come back whole."""
    with pytest.raises(ChatTemplateError) as err:
        encode_chats(family_tokenizer("gemma3"), [[user("q"), assistant("a", reasoning_content="r")]], None)
    back = pickle.loads(pickle.dumps(err.value))
    assert back.problems == err.value.problems and str(back) == str(err.value)


def test_a_prompt_the_tokenizer_merges_into_the_answer_is_kept_as_served() -> None:
    """A tokenizer without pre-tokenization merges across the prompt / answer boundary ("\\nA" is one token), so
    the whole render's tokens do not start with the served prompt's; the turn is then tokenized as prompt tokens +
    answer tokens, so the model still trains on exactly the prompt it is served."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.decoder = decoders.Fuse()
    special = ["<|im_start|>", "<|im_end|>"]
    corpus = ["assistant\nAnswer: yes", "user\nAsk: why", "assistant\nAnswer: no"] * 50
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=80, special_tokens=special, show_progress=False))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", additional_special_tokens=special
    )
    tokenizer.chat_template = family_tokenizer("qwen2_5").chat_template
    conversation = [user("Ask: why"), assistant("Answer: yes")]
    whole = tokenizer(render_chat(tokenizer, conversation, None), add_special_tokens=False)["input_ids"]
    prompt = served_prompt_ids(tokenizer, conversation, 1)
    assert whole[: len(prompt)] != prompt  # the premise: the boundary merges

    ((ids, mask),) = encode_chats(tokenizer, [conversation], None)
    assert ids[: len(prompt)].tolist() == prompt
    assert mask[: len(prompt)].sum() == 0 and tokenizer.decode(ids[mask.astype(bool)]) == "Answer: yes<|im_end|>\n"


def test_without_an_end_of_turn_token_everything_the_model_writes_is_learned() -> None:
    """A plain template with no generation prompt and no control tokens: after the served prompt the model must
    write the role label too, and nothing tells where the turn ends but the template's own newline."""
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (view,) = chat_views(family_tokenizer("qwen2_5"), CASES["single_turn"], plain)
    assert [view.text[a:b] for a, b in view.spans] == ["assistant: Paris.\n"]


def test_reasoning_is_validated_as_part_of_an_assistant_message() -> None:
    from tuneforge.data.formats import check_record

    answer = assistant("a", reasoning_content=None)  # as OpenAI-compatible exports write "no reasoning"
    chat = {"messages": [{"role": "user", "content": "q", "thinking": "x"}, answer]}
    assert check_record(chat, "messages") == [
        ("messages[0].thinking", "not allowed on a user message", "only on assistant messages")
    ]
    (sequence,) = chat_views(family_tokenizer("gpt_oss"), [user("q"), answer], None)
    assert sequence.text.endswith("<|channel|>final<|message|>a<|return|>")
