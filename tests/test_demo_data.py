from __future__ import annotations

import json
import re
import time
from collections import Counter

import pytest

from tuneforge.demo import tickets, world
from tuneforge.demo.world import RECALL_SKILLS, SKILLS, WORD_SKILLS


def _user(record: dict) -> str:
    return next(m["content"] for m in record["messages"] if m["role"] == "user")


# --- general skills -------------------------------------------------------------------------------------


def test_general_generators_are_deterministic_per_seed() -> None:
    assert world.general_corpus(3, 50) == world.general_corpus(3, 50)
    assert world.general_corpus(3, 50) != world.general_corpus(4, 50)
    assert world.general_chat_examples(3, 100) == world.general_chat_examples(3, 100)
    assert world.general_chat_examples(3, 100) != world.general_chat_examples(4, 100)
    assert world.general_eval_items(3, 100) == world.general_eval_items(3, 100)
    assert world.general_eval_items(3, 100) != world.general_eval_items(4, 100)


def test_world_is_fixed_and_consistent() -> None:
    w = world.world()
    assert len(w.capital) == len(world.COUNTRIES)
    assert len(set(w.capital.values())) == len(w.capital)  # capitals are a bijection
    assert set(w.profession) == set(w.color) == set(world.PEOPLE)
    # The facts taught in prose are the facts asked in evaluation.
    prose = " ".join(world.general_corpus(0, 400))
    for country, capital in w.capital.items():
        stated = (f"The capital of {country} is {capital}.", f"{capital} is the capital city of {country}.")
        assert any(s in prose for s in stated)


def test_chat_records_have_openai_shape_and_correct_answers() -> None:
    w = world.world()
    checked = Counter()
    for record in world.general_chat_examples(0, 700):
        user, assistant = record["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        q, a = user["content"], assistant["content"]
        if m := re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", q):
            x, y = int(m[1]), int(m[3])
            assert int(a) == (x + y if m[2] == "+" else x - y) >= 0
            checked["table"] += 1
        elif m := re.fullmatch(r"How many (letters|vowels) are in ([a-z ]+)\?", q):
            letters = m[2].split()
            assert int(a) == (len(letters) if m[1] == "letters" else sum(ch in "aeiou" for ch in letters))
            checked["word"] += 1
        elif m := re.fullmatch(r"What is the capital of (\w+)\?", q):
            assert a == w.capital[m[1]]
            checked["fact"] += 1
    assert min(checked.values()) > 10 and len(checked) == 3


def test_recall_questions_cover_the_tables() -> None:
    subs = world.recall_questions("sub")
    assert len(subs) == len(world.QUESTIONS["sub"]) * world.DIGIT_MAX**2
    for qa in subs:
        m = re.fullmatch(r"What is (\d+) - (\d+)\?|Subtract (\d+) from (\d+)\.", qa.question)
        a, b = (int(m[1]), int(m[2])) if m[1] else (int(m[4]), int(m[3]))
        assert int(qa.answer) == a - b and 0 <= a - b < world.DIGIT_MAX
    with pytest.raises(ValueError, match="not a recall skill"):
        world.recall_questions("length")


def test_eval_items_are_balanced_and_answers_short() -> None:
    items = world.general_eval_items(0, 20 * len(SKILLS))
    assert Counter(i["skill"] for i in items) == dict.fromkeys(SKILLS, 20)
    for item in items:
        assert [m["role"] for m in item["messages"]] == ["user"]
        assert 1 <= len(item["answer"].split()) <= 5


def test_word_skill_eval_items_are_held_out_and_recall_items_are_trained() -> None:
    train_questions = {_user(r) for r in world.general_chat_examples(0, 5000)}
    corpus = "\n".join(world.general_corpus(0, 2000))
    recall_overlap = 0
    for item in world.general_eval_items(0, 500):
        q = _user(item)
        if item["skill"] in RECALL_SKILLS:
            recall_overlap += q in train_questions  # by design: facts and tables are recalled
        else:
            assert q not in train_questions, q
            assert f"{q}\n" not in corpus and f"{q} A:" not in corpus, q
    assert recall_overlap > 0


def test_spelled_words_in_eval_never_appear_in_training() -> None:
    spelled = re.compile(r"(?<![A-Za-z])((?:[a-z] ){2,4}[a-z])(?![A-Za-z])")
    train_words = {w for r in world.general_chat_examples(1, 3000) for w in spelled.findall(_user(r))}
    train_words |= set(spelled.findall("\n".join(world.general_corpus(1, 500))))
    eval_items = [i for i in world.general_eval_items(1, 400) if i["skill"] in WORD_SKILLS]
    eval_words = {w for i in eval_items for w in spelled.findall(_user(i))}
    assert len(eval_words) > 50 and len(train_words) > 500 and not (eval_words & train_words)


def test_general_generation_is_fast() -> None:
    start = time.perf_counter()
    world.general_chat_examples(0, 10_000)
    world.general_eval_items(0, 10_000)
    assert time.perf_counter() - start < 2.0


def test_custom_render_reaches_the_corpus() -> None:
    render = lambda msgs: "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)  # noqa: E731
    docs = world.general_corpus(0, 100, render=render)
    assert any("<|im_start|>assistant\n" in d for d in docs)
    assert not any("Assistant: " in d for d in docs)


# --- tickets --------------------------------------------------------------------------------------------


def test_taxonomy_has_at_least_100_unique_three_level_leaves() -> None:
    labels = tickets.leaf_labels()
    assert len(labels) >= 100
    assert len(set(labels)) == len(labels)
    assert all(len(label.split("/")) == 3 and all(label.split("/")) for label in labels)
    # Every topic noun names exactly one topic, or the labels would be ambiguous.
    nouns = [n for topics in tickets.TOPIC_NOUNS.values() for ns in topics.values() for n in ns]
    assert len(nouns) == len(set(nouns))
    frames = [f for fs in tickets.TYPE_FRAMES.values() for f in fs]
    assert len(frames) == len(set(frames)) and all(f.count("{n}") == 1 for f in frames)


def test_ticket_generators_are_deterministic_per_seed() -> None:
    assert tickets.ticket_examples(5, 300) == tickets.ticket_examples(5, 300)
    assert tickets.ticket_examples(5, 300) != tickets.ticket_examples(6, 300)
    assert tickets.ticket_eval_items(5, 300) == tickets.ticket_eval_items(5, 300)
    assert tickets.ticket_eval_items(5, 300) != tickets.ticket_eval_items(6, 300)


def test_every_leaf_appears_in_training_and_eval_data() -> None:
    labels = set(tickets.leaf_labels())
    train = tickets.ticket_examples(0, len(labels))
    assert {r["messages"][-1]["content"] for r in train} == labels
    counts = Counter(r["messages"][-1]["content"] for r in tickets.ticket_examples(0, 10 * len(labels)))
    assert set(counts.values()) == {10}  # balanced rounds
    # ... but not periodic: a fixed order would put the same leaves in the same batches every round.
    order = [r["messages"][-1]["content"] for r in tickets.ticket_examples(0, 2 * len(labels))]
    assert order[: len(labels)] != order[len(labels) :]
    evals = tickets.ticket_eval_items(0, 2 * len(labels))
    assert Counter(i["answer"] for i in evals) == dict.fromkeys(labels, 2)


def test_ticket_records_have_expected_shape() -> None:
    record = tickets.ticket_examples(0, 1)[0]
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
    record = tickets.ticket_examples(0, 1, system_prompt=tickets.TICKET_SYSTEM_PROMPT)[0]
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]
    assert record["messages"][0]["content"] == tickets.TICKET_SYSTEM_PROMPT
    item = tickets.ticket_eval_items(0, 1)[0]
    assert [m["role"] for m in item["messages"]] == ["user"]
    assert item["skill"] == "tickets" and item["answer"] in tickets.leaf_labels()


def _signals(label: str) -> list[str]:
    kind, area, topic = label.split("/")
    return [f.format(n=n) for f in tickets.TYPE_FRAMES[kind] for n in tickets.TOPIC_NOUNS[area][topic]]


def test_each_ticket_carries_its_signal_sentence() -> None:
    for record in tickets.ticket_examples(1, 500) + tickets.ticket_eval_items(1, 200):
        text = _user(record).lower()
        label = record.get("answer") or record["messages"][-1]["content"]
        assert any(signal in text for signal in _signals(label)), (text, label)


def test_eval_signals_are_unseen_combinations_for_their_leaf() -> None:
    """Evaluation pairs a leaf's frame and noun in a way training never does (compositional hold-out)."""
    seen: dict[str, set[str]] = {}
    for record in tickets.ticket_examples(0, 20_000):
        text, label = _user(record).lower(), record["messages"][-1]["content"]
        seen.setdefault(label, set()).update(sig for sig in _signals(label) if sig in text)
    for item in tickets.ticket_eval_items(0, 600):
        used = {sig for sig in _signals(item["answer"]) if sig in _user(item).lower()}
        assert used and not (used & seen[item["answer"]]), (item, used & seen[item["answer"]])


def test_ticket_eval_is_held_out_from_training() -> None:
    train_texts = {r["messages"][1]["content"] for r in tickets.ticket_examples(0, 20_000)}
    for item in tickets.ticket_eval_items(0, 1000):
        assert _user(item) not in train_texts


def test_ticket_generation_is_fast_and_writes_jsonl(tmp_path) -> None:
    start = time.perf_counter()
    records = tickets.ticket_examples(0, 10_000)
    assert time.perf_counter() - start < 1.5
    path = tickets.write_jsonl(records[:10], tmp_path / "sub" / "t.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records[:10]


@pytest.mark.parametrize("n", [0, 1, 7])
def test_small_counts(n: int) -> None:
    assert len(tickets.ticket_examples(0, n)) == n
    assert len(world.general_eval_items(0, n)) == n
    assert len(world.general_corpus(0, n)) == n


def test_base_corpus_knows_the_ticket_words_but_not_the_task() -> None:
    """A pre-trained model knows everyday words; it must not have seen the classification task."""
    from dataclasses import replace

    from tuneforge.demo.run import FULL, pretraining_corpus

    corpus = "\n".join(pretraining_corpus(replace(FULL, corpus_docs=3000, page_docs=100)))
    corpus_words = set(re.findall(r"[a-z]+", corpus.lower()))
    ticket_words = set()
    for record in tickets.ticket_examples(0, 3000):
        text = " ".join(m["content"] for m in record["messages"] if m["role"] != "assistant")
        ticket_words |= set(re.findall(r"[a-z]+", text.lower()))
    assert len(ticket_words & corpus_words) / len(ticket_words) > 0.9
    assert not any(label in corpus for label in tickets.leaf_labels())
    paths = [line for line in corpus.splitlines() if "/" in line]  # help centre pages: one or two words
    assert paths and all(line.count("/") == 1 and " " not in line for line in paths)


def test_the_base_is_pre_trained_on_every_token_the_ticket_labels_are_written_in() -> None:
    """LoRA leaves the (tied) embedding and LM head as the base has them: a label token the base never had as a
    training target is one only full fine-tuning learns to write (the cause of LoRA's 0.05 macro-F1 against full
    fine-tuning's 0.96, when the corpus had no paths). Tokenizer and corpus as build_base makes them."""
    from dataclasses import replace

    from tuneforge.demo.run import FULL, pretraining_corpus, tokenizer_texts
    from tuneforge.models.tiny import train_tokenizer

    size = replace(FULL, corpus_docs=1500, page_docs=50, general_chat=1500)
    corpus, chats = pretraining_corpus(size), world.general_chat_examples(2, size.general_chat)
    tokenizer = train_tokenizer(tokenizer_texts(corpus, chats), vocab_size=size.vocab_size)
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    targets = Counter(i for doc in corpus for i in ids(doc))
    targets.update(i for c in chats for m in c["messages"] for i in ids(m["content"]))
    label_tokens = {i for label in tickets.leaf_labels() for i in ids(label)}
    rare = {tokenizer.convert_ids_to_tokens(i): targets[i] for i in label_tokens if targets[i] < 10}
    assert not rare, rare


# --- preference pairs and RL prompts --------------------------------------------------------------------


def _named_topics(text: str) -> set[str]:
    """``area/topic`` of every topic noun a ticket's text names."""
    text = text.lower()
    return {
        f"{area}/{topic}"
        for area, topics in tickets.TOPIC_NOUNS.items()
        for topic, nouns in topics.items()
        if any(n in text for n in nouns)
    }


def test_preference_pairs_are_deterministic_hard_negatives() -> None:
    assert tickets.ticket_preferences(5, 300) == tickets.ticket_preferences(5, 300)
    assert tickets.ticket_preferences(5, 300) != tickets.ticket_preferences(6, 300)
    labels = set(tickets.leaf_labels())
    pairs = tickets.ticket_preferences(0, 2 * len(labels))
    assert Counter(p["chosen"] for p in pairs) == dict.fromkeys(labels, 2)
    kinds: Counter = Counter()
    for p in pairs:
        assert [m["role"] for m in p["prompt"]] == ["user"]
        chosen, rejected = p["chosen"].split("/"), p["rejected"].split("/")
        assert p["rejected"] in labels and p["rejected"] != p["chosen"]
        if chosen[1:] == rejected[1:]:
            kinds["wrong type"] += 1
        elif chosen[:2] == rejected[:2]:
            kinds["sibling topic"] += 1
        else:  # another area: only when the text itself names that topic (a misfiled ticket)
            assert chosen[0] == rejected[0] and "/".join(rejected[1:]) in _named_topics(p["prompt"][0]["content"])
            kinds["named topic"] += 1
    assert kinds["wrong type"] > 60 and kinds["sibling topic"] > 60 and kinds["named topic"] > 0, kinds


def test_preference_prompts_are_training_tickets_with_their_labels() -> None:
    for p in tickets.ticket_preferences(1, 300):
        text = p["prompt"][0]["content"].lower()
        assert any(signal in text for signal in _signals(p["chosen"])), p
    eval_texts = {_user(i) for i in tickets.ticket_eval_items(5, 1200)}
    assert not eval_texts & {p["prompt"][-1]["content"] for p in tickets.ticket_preferences(6, 3000)}


def test_rl_prompts_are_sft_tickets_without_the_answer() -> None:
    prompts = tickets.ticket_prompts(4, 200, system_prompt=tickets.TICKET_SYSTEM_PROMPT)
    examples = tickets.ticket_examples(4, 200, system_prompt=tickets.TICKET_SYSTEM_PROMPT)
    for prompt, example in zip(prompts, examples, strict=True):
        assert prompt["messages"] == example["messages"][:-1]
        assert [m["role"] for m in prompt["messages"]] == ["system", "user"]
        assert prompt["label"] == example["messages"][-1]["content"] and prompt["label"] in tickets.leaf_labels()
    eval_texts = {_user(i) for i in tickets.ticket_eval_items(5, 1200)}
    assert not eval_texts & {_user(p) for p in tickets.ticket_prompts(7, 3000)}


def test_demo_writes_preference_and_prompt_files_that_validate(tmp_path) -> None:
    from tuneforge.data.validate import validate_file
    from tuneforge.demo.run import FULL, QUICK, write_data

    read = lambda p: [json.loads(line) for line in p.read_text().splitlines()]  # noqa: E731
    for size in (QUICK, FULL):
        files = write_data(tmp_path / str(size.ticket_pairs), size)
        assert files["tickets_preferences"].name == "tickets_preferences.jsonl"
        report = validate_file(files["tickets_preferences"], "preference")
        assert report.ok and len(report.examples) == size.ticket_pairs
        report = validate_file(files["tickets_prompts"], "prompt", allow_extra="*")
        assert report.ok and len(report.examples) == size.ticket_prompts

        sft = {_user(r): r["messages"][-1]["content"] for r in read(files["tickets"])}
        prompts, pairs = read(files["tickets_prompts"]), read(files["tickets_preferences"])
        # the grader's label is the SFT answer: the leaf of the ticket's signal sentence, in the same text form
        assert {p["label"] for p in prompts} <= set(sft.values())
        assert all(any(sig in _user(p).lower() for sig in _signals(p["label"])) for p in prompts)
        assert all(sft[_user(p)] == p["label"] for p in prompts if _user(p) in sft)
        assert all(p["chosen"] != p["rejected"] for p in pairs)
        evals = {_user(i) for i in read(files["tickets_eval"])}
        assert not evals & {_user(p) for p in prompts}
        assert not evals & {p["prompt"][-1]["content"] for p in pairs}
    assert (FULL.ticket_pairs, FULL.ticket_prompts) == (2000, 1200)


def test_base_cache_key_follows_only_what_the_base_is_built_from() -> None:
    """Changing fine-tuning or evaluation keeps the cached base; changing pre-training or its data rebuilds it."""
    from dataclasses import fields, replace

    from tuneforge.demo.run import FULL, NOT_IN_BASE_KEY, base_key

    assert set(NOT_IN_BASE_KEY) <= {f.name for f in fields(FULL)}  # no stale names
    for name in (
        "finetune_steps",
        "finetune_batch",
        "finetune_lr",
        "lora_lr",
        "ticket_train",
        "general_eval",
        "ticket_eval",
    ):
        changed = replace(FULL, **{name: getattr(FULL, name) * 2})
        assert base_key(changed) == base_key(FULL), name
    for name in (
        "pretrain_steps",
        "pretrain_batch",
        "pretrain_lr",
        "corpus_docs",
        "page_docs",
        "general_chat",
        "hidden_size",
        "max_length",
        "vocab_size",
    ):
        changed = replace(FULL, **{name: getattr(FULL, name) * 2})
        assert base_key(changed) != base_key(FULL), name
