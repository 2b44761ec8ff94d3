"""A small generated world and the "general skills" a tiny model can learn from it.

The demo pre-trains a ~2-5 M parameter model from scratch in a few CPU minutes, so its general skills must
be learnable from about a million tokens: a closed world of invented facts, small arithmetic and string
operations, all asked in a handful of fixed phrasings with answers of a few tokens.

Held-out design (what ``general_eval_items`` asks):

* Facts (``capital``, ``profession``, ``color``) are the *trained* facts in the *trained* phrasings.
  The world is closed: nobody can know the capital of Arvonia without having read it, so the skill is
  recall, and recall is exactly what catastrophic forgetting destroys. Paraphrase generalisation is not
  something a model this small shows reliably after two minutes, so held-out phrasings would measure
  that instead of retention.
* Arithmetic (``add``, ``sub``, ``larger``) uses operand pairs that never occur in training data.
* String operations (``reverse``, ``uppercase``, ``first_letter``, ``length``) use words that never occur in
  training data. Words are written spelled out (``t a m``) because a BPE tokenizer merges letters into
  opaque tokens; spelled out, each operation is a rule over letters that transfers to unseen words instead
  of a per-word lookup.

The split is a fixed hash of the content (``is_held_out``), independent of any seed, so no seed can leak an
evaluation item into training.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

Render = Callable[[list[dict]], str]

# The world is the same for every seed: training and evaluation must talk about the same facts.
WORLD_SEED = 20240611

COUNTRIES = (
    "Arvonia", "Belmora", "Calvaro", "Dravia", "Elunor", "Feyland", "Gorvia", "Halvir",
    "Istrel", "Kelmar", "Lunaris", "Morvane", "Ostrel", "Pellia", "Quoran", "Sorvia",
)
CAPITALS = (
    "Abrak", "Bexil", "Corvo", "Dunmar", "Eskel", "Fario", "Grent", "Holm",
    "Ivra", "Kesto", "Lodan", "Mirel", "Nesk", "Orlo", "Pavik", "Rusk",
)
PEOPLE = (
    "Brin", "Cato", "Dena", "Elko", "Fira", "Gus", "Hale", "Ivo",
    "Juno", "Kira", "Lark", "Milo", "Nell", "Otto", "Pim", "Rue",
)
PROFESSIONS = ("baker", "pilot", "farmer", "doctor", "painter", "singer", "teacher", "sailor")
COLORS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple")

FACT_SKILLS = ("capital", "profession", "color")
TABLE_SKILLS = ("add", "sub")
WORD_SKILLS = ("length", "vowels")
SKILLS = FACT_SKILLS + TABLE_SKILLS + WORD_SKILLS
RECALL_SKILLS = FACT_SKILLS + TABLE_SKILLS  # evaluated on trained items; WORD_SKILLS on held-out words

DIGIT_MAX = 10  # table operands 0-9: sums of one or two digits, subtraction as the table read backwards

# Letters for generated words: no q/x/y, so words stay pronounceable and the alphabet small.
_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"
_WORD_SHAPES = ("cvc", "vcv", "cvcv", "cvvc", "vcvc", "cvcvc", "vcvcv")

# Two phrasings per skill; training and evaluation use the same ones.
QUESTIONS: dict[str, tuple[str, ...]] = {
    "capital": ("What is the capital of {c}?", "Name the capital city of {c}."),
    "profession": ("What does {p} do for a living?", "What is the job of {p}?"),
    "color": ("What is the favorite color of {p}?", "Which color does {p} like most?"),
    "add": ("What is {a} + {b}?", "Add {a} and {b}."),
    "sub": ("What is {a} - {b}?", "Subtract {b} from {a}."),
    "length": ("How many letters are in {w}?", "Count the letters: {w}"),
    "vowels": ("How many vowels are in {w}?", "Count the vowels: {w}"),
}

# Statements of the facts for the pre-training prose.
_STATEMENTS: dict[str, tuple[str, ...]] = {
    "capital": (
        "The capital of {c} is {x}.",
        "{c} is a country. Its capital is {x}.",
        "{x} is the capital city of {c}.",
    ),
    "profession": ("{p} works as a {x}.", "{p} is a {x}.", "By trade, {p} is a {x}."),
    "color": (
        "The favorite color of {p} is {x}.",
        "{p} likes {x} more than any other color.",
        "{p} always wears {x}, the favorite color of {p}.",
    ),
}


@dataclass(frozen=True)
class World:
    """The invented facts: country → capital, person → profession, person → favorite color."""

    capital: dict[str, str]
    profession: dict[str, str]
    color: dict[str, str]


@dataclass(frozen=True)
class QA:
    """One question with its short answer."""

    skill: str
    question: str
    answer: str

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.question}, {"role": "assistant", "content": self.answer}]


@lru_cache(maxsize=1)
def world() -> World:
    """The one world, drawn from ``WORLD_SEED`` (cached: it never changes)."""
    rng = random.Random(WORLD_SEED)
    capitals = list(CAPITALS)
    rng.shuffle(capitals)
    return World(
        capital=dict(zip(COUNTRIES, capitals)),
        profession={p: rng.choice(PROFESSIONS) for p in PEOPLE},
        color={p: rng.choice(COLORS) for p in PEOPLE},
    )


def is_held_out(key: str) -> bool:
    """Whether a piece of content belongs to evaluation: a fixed 1-in-5 hash split, the same everywhere."""
    return zlib.crc32(key.encode("utf-8")) % 5 == 0


def spell(word: str) -> str:
    """``"tam"`` → ``"t a m"``: one token per letter, whatever the tokenizer merges."""
    return " ".join(word)


def render_plain(messages: list[dict]) -> str:
    """A plain-text chat surface form; pass the tokenizer's own chat template instead when there is one."""
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def _word(rng: random.Random) -> str:
    shape = rng.choice(_WORD_SHAPES)
    return "".join(rng.choice(_CONSONANTS if ch == "c" else _VOWELS) for ch in shape)


def _table_pair(skill: str, x: int, y: int) -> tuple[int, int, int]:
    """(a, b, answer) for table entry (x, y): ``x + y`` or, read backwards, ``(x + y) - y = x``."""
    return (x, y, x + y) if skill == "add" else (x + y, y, x)


def _draw(rng: random.Random, skill: str, held_out: bool = False) -> QA:
    """One question of ``skill``; for word skills, on the requested side of the held-out split.

    Rejection sampling over thousands of words, so it stays fast.
    """
    w = world()
    template = rng.choice(QUESTIONS[skill])
    if skill == "capital":
        c = rng.choice(COUNTRIES)
        return QA(skill, template.format(c=c), w.capital[c])
    if skill in ("profession", "color"):
        p = rng.choice(PEOPLE)
        return QA(skill, template.format(p=p), getattr(w, skill)[p])
    if skill in TABLE_SKILLS:
        a, b, answer = _table_pair(skill, rng.randrange(DIGIT_MAX), rng.randrange(DIGIT_MAX))
        return QA(skill, template.format(a=a, b=b), str(answer))
    while True:
        word = _word(rng)
        if is_held_out(f"word:{word}") == held_out:
            answer = len(word) if skill == "length" else sum(ch in _VOWELS for ch in word)
            return QA(skill, template.format(w=spell(word)), str(answer))


def _statement(rng: random.Random) -> str:
    w = world()
    kind = rng.choice(FACT_SKILLS)
    template = rng.choice(_STATEMENTS[kind])
    if kind == "capital":
        c = rng.choice(COUNTRIES)
        return template.format(c=c, x=w.capital[c])
    p = rng.choice(PEOPLE)
    return template.format(p=p, x=getattr(w, kind)[p])


def _prose_doc(rng: random.Random) -> str:
    return " ".join(_statement(rng) for _ in range(rng.randint(6, 10)))


def _table_doc(rng: random.Random) -> str:
    """Two rows of the addition or subtraction table in order: the drill that makes the tables stick."""
    rows = []
    for _ in range(2):
        skill, y = rng.choice(TABLE_SKILLS), rng.randrange(DIGIT_MAX)
        sign = "+" if skill == "add" else "-"
        rows.append(" ".join(f"{a} {sign} {b} = {c}." for a, b, c in (_table_pair(skill, x, y) for x in range(DIGIT_MAX))))
    return "\n".join(rows)


def _chat_doc(rng: random.Random, render: Render) -> str:
    return "\n".join(render(_draw(rng, rng.choice(SKILLS)).messages()) for _ in range(rng.randint(4, 7)))


def _exercise_doc(rng: random.Random) -> str:
    return "\n".join(
        f"Q: {qa.question} A: {qa.answer}" for qa in (_draw(rng, rng.choice(SKILLS)) for _ in range(rng.randint(6, 10)))
    )


# Document mix of the pre-training corpus: (kind, cumulative probability).
CORPUS_MIX = (("prose", 0.25), ("table", 0.40), ("chat", 0.80), ("exercise", 1.0))


def general_corpus(seed: int, n_docs: int, render: Render | None = None) -> list[str]:
    """Raw text documents for continued pre-training: fact prose, table drills, Q/A sheets, chat transcripts.

    ``render`` turns one user/assistant exchange into text; give it the tokenizer's chat template so that
    pre-training already practises the surface form the chat evaluation uses (default: ``render_plain``).
    Words used by the word skills come from the training side of the split only (see ``is_held_out``).
    """
    render = render or render_plain
    rng = random.Random(f"corpus:{seed}")
    docs = []
    for _ in range(n_docs):
        u = rng.random()
        kind = next(k for k, p in CORPUS_MIX if u < p)
        if kind == "prose":
            docs.append(_prose_doc(rng))
        elif kind == "table":
            docs.append(_table_doc(rng))
        elif kind == "chat":
            docs.append(_chat_doc(rng, render))
        else:
            docs.append(_exercise_doc(rng))
    return docs


def general_chat_examples(seed: int, n: int) -> list[dict]:
    """``n`` single-turn chat records (OpenAI shape), skills drawn uniformly, training side of the split."""
    rng = random.Random(f"chat:{seed}")
    return [{"messages": _draw(rng, rng.choice(SKILLS)).messages()} for _ in range(n)]


def recall_questions(skill: str) -> list[QA]:
    """Every question of a recall skill (facts, tables) in every phrasing: the whole of what there is to know."""
    w = world()
    out = []
    for template in QUESTIONS[skill]:
        if skill == "capital":
            out += [QA(skill, template.format(c=c), w.capital[c]) for c in COUNTRIES]
        elif skill in ("profession", "color"):
            out += [QA(skill, template.format(p=p), getattr(w, skill)[p]) for p in PEOPLE]
        elif skill in TABLE_SKILLS:
            for x in range(DIGIT_MAX):
                for y in range(DIGIT_MAX):
                    a, b, c = _table_pair(skill, x, y)
                    out.append(QA(skill, template.format(a=a, b=b), str(c)))
        else:
            raise ValueError(f"{skill!r} is not a recall skill (expected one of {RECALL_SKILLS})")
    return out


def general_eval_items(seed: int, n: int) -> list[dict]:
    """``n`` evaluation items, balanced over ``SKILLS`` (round robin).

    Each item is ``{"messages": [user], "answer": str, "skill": str}``. Recall skills are dealt from a
    shuffled deck of all their questions, so they repeat only once the deck is used up; word skills use
    held-out words and avoid repeats.
    """
    rng = random.Random(f"eval:{seed}")
    decks: dict[str, list[QA]] = {}
    seen: set[str] = set()
    items = []
    for i in range(n):
        skill = SKILLS[i % len(SKILLS)]
        if skill in RECALL_SKILLS:
            if not decks.get(skill):
                decks[skill] = recall_questions(skill)
                rng.shuffle(decks[skill])
            qa = decks[skill].pop()
        else:
            for _ in range(100):
                qa = _draw(rng, skill, held_out=True)
                if qa.question not in seen:
                    break
            seen.add(qa.question)
        items.append(
            {"messages": [{"role": "user", "content": qa.question}], "answer": qa.answer, "skill": skill}
        )
    return items
