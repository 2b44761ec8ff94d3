"""A small generated world and the "general skills" a tiny model can learn from it.

The demo pre-trains a ~0.8 M parameter model from scratch in under two CPU minutes (800 steps of 8 × 256
tokens), so its general skills must be learnable from about a million tokens. Tried at that budget (then a
2 M-parameter Llama, ~0.9 M tokens, ~440 steps of 8 × 256 tokens): recall of invented facts and counting
over spelled-out words are learned; skills that need copying from the prompt (first letter, reverse,
uppercase, the larger of two numbers) and two-digit arithmetic stayed near zero, so they are not in the suite.

What ``general_eval_items`` asks, and why:

* Facts (``capital``, ``profession``, ``color``): the *trained* facts in the *trained* phrasings. The
  world is closed — nobody can know the capital of Arvonia without having read it — so the skill is
  recall, and recall is exactly what catastrophic forgetting destroys. Held-out phrasings would measure
  paraphrase generalisation, which a model this small does not show after two minutes, not retention.
* Tables (``add``, ``sub``): the whole of a small addition table (operands 0-5) and the same table read
  backwards, drilled in table documents and recalled like a times table. Held-out operand pairs would
  measure generalisation that this budget does not buy (it measured about 5 %).
* Word skills (``length``, ``vowels``): words that never occur in training (``is_held_out``), written
  spelled out (``t a m``) because a BPE tokenizer merges letters into opaque tokens; spelled out, counting
  is a rule over letter tokens that transfers to unseen words.

The split is a fixed hash of the content, independent of any seed, so no seed can leak an evaluation word
into training.

The corpus also holds "everyday" English that no skill asks about, written around the vocabulary of ordinary
life (orders, refunds, passwords, apps). A real base model knows those words before it meets a support
ticket; without them every ticket word was an embedding the tiny base had never trained, and fine-tuning
spent its minute learning words instead of the task. The task itself (category paths) never appears.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

Render = Callable[[list[dict]], str]

# The world is the same for every seed: training and evaluation must talk about the same facts.
WORLD_SEED = 20240611

COUNTRIES = (
    "Arvonia",
    "Belmora",
    "Calvaro",
    "Dravia",
    "Elunor",
    "Feyland",
    "Gorvia",
    "Halvir",
    "Istrel",
    "Kelmar",
    "Lunaris",
    "Morvane",
)
CAPITALS = ("Abrak", "Bexil", "Corvo", "Dunmar", "Eskel", "Fario", "Grent", "Holm", "Ivra", "Kesto", "Lodan", "Mirel")
PEOPLE = ("Brin", "Cato", "Dena", "Elko", "Fira", "Gus", "Hale", "Ivo", "Juno", "Kira", "Lark", "Milo")
PROFESSIONS = ("baker", "pilot", "farmer", "doctor", "painter", "singer", "teacher", "sailor")
COLORS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple")

FACT_SKILLS = ("capital", "profession", "color")
TABLE_SKILLS = ("add", "sub")
WORD_SKILLS = ("length", "vowels")
SKILLS = FACT_SKILLS + TABLE_SKILLS + WORD_SKILLS
RECALL_SKILLS = FACT_SKILLS + TABLE_SKILLS  # evaluated on trained items; WORD_SKILLS on held-out words

DIGIT_MAX = 6  # table operands 0-5: sums of one or two digits, subtraction as the table read backwards

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


# Everyday English for the "everyday" documents: no skill is asked about it, but a pre-trained model knows
# the words of ordinary life (orders, refunds, passwords, apps…) before it meets any task that uses them.
# Without it, every word of a support ticket would be an embedding the base never trained.
_EVERYDAY_NOUNS = (
    "refund",
    "invoice",
    "payment",
    "card",
    "bank transfer",
    "subscription",
    "plan",
    "membership",
    "login",
    "password",
    "profile",
    "email address",
    "display name",
    "team",
    "admin role",
    "colleague",
    "account",
    "data",
    "export",
    "parcel",
    "delivery",
    "courier",
    "return label",
    "exchange",
    "customs papers",
    "import duties",
    "order",
    "pickup point",
    "parcel locker",
    "store",
    "mobile app",
    "app update",
    "push notifications",
    "api key",
    "webhook",
    "slack channel",
    "csv file",
    "backup",
    "android phone",
    "iphone",
    "desktop client",
    "dark mode",
    "search box",
    "report builder",
    "discount code",
    "student price",
    "enterprise quote",
    "survey",
    "help docs",
    "new design",
    "preorder",
    "waitlist",
    "sold out item",
    "phishing email",
    "fake seller",
    "cookie settings",
    "marketing emails",
    "soc report",
    "audit log",
    "data residency",
    "suspicious login",
    "leaked password",
    "security vulnerability",
    "personal data",
    "billing statement",
    "invoice pdf",
    "checkout",
    "premium plan",
    "monthly fee",
    "sign in page",
    "password reset",
    "old account",
    "overseas order",
    "store collection",
    "data sync",
    "version",
    "feature",
    "message",
    "ticket",
    "chat",
    "customer",
    "support team",
    "weather",
    "shift",
    "money",
    "number",
    "page",
)
_EVERYDAY_TOPICS = (
    "billing",
    "account",
    "shipping",
    "technical",
    "product",
    "security",
    "refunds",
    "invoices",
    "payments",
    "access",
    "closure",
    "returns",
    "international",
    "pickup",
    "integrations",
    "devices",
    "features",
    "pricing",
    "feedback",
    "availability",
    "fraud",
    "privacy",
    "compliance",
    "incidents",
    "status",
    "error",
    "change",
    "cancel",
    "question",
)
_EVERYDAY_SENTENCES = (
    "{p} checked the {n} {t}.",
    "{p} changed the {n} {t}.",
    "{p} updated my {n}.",
    "{p} cancelled the {n}.",
    "{p} wanted to stop the {n}.",
    "{p} removed the {n} {t}.",
    "{p} can explain the {n}.",
    "{p} fixed the {n} {t}.",
    "Where did {p} find the {n}?",
    "{p} sent the {n} to {x}.",
    "{p} read about the {n} and the {m}.",
    "{p} is still waiting for the {n}.",
    "The {n} does not work for {p}.",
    "The {n} shows a strange message.",
    "The {n} is broken, so {p} tried again.",
    "How long will the {n} take?",
    "I need to edit the {n}.",
    "I have a question about the {n}.",
    "I do not understand the {n}.",
    "Please tell me the rules for the {n}.",
    "Nothing has happened with the {n} since last week.",
    "Can you modify the {n}?",
    "My {n} needs a correction.",
    "{p} has the wrong details on the {n}.",
    "{p} no longer wants the {m}, but likes the {n}.",
    "{p} wrote a note on {o}.",
    "{p} works on {o} and {o2}.",
    "Good morning, {p}. Thank you for the {n}.",
    "Hello {p}, sorry for the wait.",
    "Hi there, this is urgent.",
    "Dear {p}, any update on the {n}?",
    "Thanks, {p}. Cheers!",
    "Regards, {p}. Best wishes.",
    "{p} said: please help me with the {n}.",
    "Hey team, {p} already tried restarting it.",
    "{p} has been a customer for years.",
    "{p} uses the {n} every day.",
    "Please reply by email, {p}.",
    "{p} got rid of the {n}.",
    "{p} called off the {n}.",
    "What is the status of the {n}?",
    "When will the {n} be done?",
    "It is gone now.",
    "Stop it right away.",
    "Where can I read more?",
    "I just want to understand.",
    "Can you make the edit soon?",
    "It needs to be changed.",
    "Nothing I try helps.",
    "Something is wrong with the {n}.",
    "Your chat was closed, {p}.",
    "I am writing about the {n} too.",
    "It concerns an old {n}.",
    "Regarding the {n}: it fails, then it stopped working.",
    "{p} will call back later.",
    "The charge on the card is correct.",
    "At nine o'clock {p} started the shift.",
    "{p} asked for the deletion of the {n}.",
    "{p} speaks english.",
    "Please fix it, then get some rest.",
    "Here is my id and the ref number.",
    "The integration is pending.",
    "{p} sent an invite to a colleague.",
    "I do not recognise the {n}.",
    "{p} wants to remove the {n} from the same topic.",
    "{p} made a request.",
    "That is where it stands.",
    "The weather is terrible.",
    "{p} likes to use the {n}.",
)


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


def _everyday_doc(rng: random.Random) -> str:
    def sentence() -> str:
        return rng.choice(_EVERYDAY_SENTENCES).format(
            p=rng.choice(PEOPLE),
            x=rng.choice(CAPITALS),
            n=rng.choice(_EVERYDAY_NOUNS),
            m=rng.choice(_EVERYDAY_NOUNS),
            o=rng.choice(_EVERYDAY_TOPICS),
            o2=rng.choice(_EVERYDAY_TOPICS),
            t=rng.choice(("today", "yesterday", "last week", "this morning", "again", "on time", "for days")),
        )

    return " ".join(sentence() for _ in range(rng.randint(6, 10)))


def _table_doc(rng: random.Random) -> str:
    """Two rows of the addition or subtraction table in order: the drill that makes the tables stick."""
    rows = []
    for skill, y in rng.sample([(s, y) for s in TABLE_SKILLS for y in range(DIGIT_MAX)], 2):
        sign = "+" if skill == "add" else "-"
        entries = (_table_pair(skill, x, y) for x in range(DIGIT_MAX))
        rows.append(" ".join(f"{a} {sign} {b} = {c}." for a, b, c in entries))
    return "\n".join(rows)


def _chat_doc(rng: random.Random, render: Render) -> str:
    return "\n".join(render(_draw(rng, rng.choice(SKILLS)).messages()) for _ in range(rng.randint(4, 7)))


def _exercise_doc(rng: random.Random) -> str:
    return "\n".join(
        f"Q: {qa.question} A: {qa.answer}" for qa in (_draw(rng, rng.choice(SKILLS)) for _ in range(rng.randint(6, 10)))
    )


# Document mix of the pre-training corpus: (kind, cumulative probability).
CORPUS_MIX = (("prose", 0.25), ("table", 0.45), ("everyday", 0.55), ("chat", 0.85), ("exercise", 1.0))


def general_corpus(seed: int, n_docs: int, render: Render | None = None) -> list[str]:
    """Raw text documents for continued pre-training: fact prose, table drills, everyday English, Q/A sheets
    and chat transcripts.

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
        elif kind == "everyday":
            docs.append(_everyday_doc(rng))
        elif kind == "chat":
            docs.append(_chat_doc(rng, render))
        else:
            docs.append(_exercise_doc(rng))
    return docs


# Words of a help centre's page paths: the everyday topics and a few more everyday nouns.
_PAGE_WORDS = (*_EVERYDAY_TOPICS, "subscription", "login", "profile", "delivery", "app", "data")


def page_indexes(seed: int, n_docs: int) -> list[str]:
    """Help centre page indexes for pre-training: one path of one or two everyday words per line (``shipping/returns``).

    Real base models have read paths and URLs everywhere, so ``/`` and words at the start of a line or after a
    slash are tokens they can write. Without such text those tokens were never a training target, and the ticket
    labels (``type/area/topic``) were made of embeddings only full fine-tuning trains: LoRA, which leaves the
    (tied) embedding and LM head alone, could not learn to write them. Two words at most, so no path is a label.
    """
    rng = random.Random(f"pages:{seed}")
    docs = []
    for _ in range(n_docs):
        paths = ("/".join(rng.sample(_PAGE_WORDS, rng.randint(1, 2))) for _ in range(rng.randint(8, 16)))
        docs.append("\n".join(["Help centre pages:", *paths]))
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
        items.append({"messages": [{"role": "user", "content": qa.question}], "answer": qa.answer, "skill": skill})
    return items
