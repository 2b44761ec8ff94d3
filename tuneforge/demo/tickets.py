"""Generated support tickets for the demo's domain task: classify a ticket into a 3-level taxonomy.

120 leaves, ``type/area/topic`` (5 ticket types × 6 product areas × 4 topics), e.g. ``cancel/billing/refunds``
— the "ticket type, then category" shape of many help-desk taxonomies. Two findings from fitting it to a
~2 M-parameter model and about a minute of CPU fine-tuning (about 600 steps of 16 tickets) shaped it:

* Factors, not 120 unrelated issues. A ticket's type comes from how it is phrased ("please cancel…") and
  its area/topic from what it names ("the return label"), so a model learns 5 types and 24 topics, each
  seen hundreds of times. A hand-written taxonomy of 120 specific issues (3 phrases each) reached only
  0.03-0.19 macro-F1 in the same budget.
* Type first. With the type as the last path segment, domain-only fine-tuning often learned area and
  topic but left the type at chance for the whole run; as the first segment it was learned in both runs
  tried (domain-only macro-F1 0.46 and 0.95).

A ticket is a few sentences from templates: the *signal* sentence is a type frame around a noun phrase of
the topic ("the return label does not work"); a context sentence names the topic again — or, 10 % of the
time, a different topic, as customers misfile; a closing ask often restates the type ("Please fix this.");
the rest is noise shared by every class (greetings, order numbers, small talk, sign-offs).

Held-out design: a fixed hash of (leaf, frame, noun) sends each signal combination to training or
evaluation, so evaluation tickets pair known frames and nouns in ways never trained for that leaf: the
model must have learned type and topic, not memorised sentences. Every leaf has pairs on both sides.

The same tickets feed the other methods: preference pairs whose rejected answer is a near miss (wrong type, a
sibling topic, or the topic a misfiled ticket wrongly names) for DPO and reward models, and prompt-only records
with the SFT answer as ``label`` for online RL. Both draw training-side signal pairs only.
"""

from __future__ import annotations

import json
import random
import zlib
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

TICKET_SYSTEM_PROMPT = "Classify the support ticket. Answer with its category."

# area -> topic -> noun phrases that name the topic (lower case, unique across the taxonomy).
TOPIC_NOUNS: dict[str, dict[str, tuple[str, ...]]] = {
    "billing": {
        "refunds": ("my refund", "the refund request", "the money back for my order"),
        "invoices": ("my invoice", "the invoice pdf", "the billing statement"),
        "payments": ("my card payment", "the checkout payment", "the bank transfer"),
        "subscription": ("my subscription", "the premium plan", "the monthly membership"),
    },
    "account": {
        "login": ("my login", "the password reset", "the sign in page"),
        "profile": ("my profile", "my email address", "my display name"),
        "access": ("team access", "the admin role", "the invite for my colleague"),
        "closure": ("my account deletion", "the data export", "my old account"),
    },
    "shipping": {
        "delivery": ("my parcel", "the delivery", "the courier"),
        "returns": ("my return", "the return label", "the exchange"),
        "international": ("the customs papers", "the import duties", "my overseas order"),
        "pickup": ("the pickup point", "the parcel locker", "the store collection"),
    },
    "technical": {
        "app": ("the mobile app", "the app update", "the push notifications"),
        "integrations": ("the api key", "the webhook", "the slack integration"),
        "data": ("the csv import", "my backup", "the data sync"),
        "devices": ("the android version", "the iphone app", "the desktop client"),
    },
    "product": {
        "features": ("the dark mode", "the search feature", "the report builder"),
        "pricing": ("the discount code", "the student price", "the enterprise quote"),
        "feedback": ("the survey", "the help docs", "the new design"),
        "availability": ("the preorder", "the waitlist", "the sold out item"),
    },
    "security": {
        "fraud": ("a phishing email", "a charge i do not recognise", "a fake seller"),
        "privacy": ("my personal data", "the cookie settings", "the marketing emails"),
        "compliance": ("the soc report", "the audit log", "the data residency"),
        "incidents": ("a suspicious login", "a leaked password", "a security vulnerability"),
    },
}

# ticket type -> sentence frames around a topic noun phrase {n}.
TYPE_FRAMES: dict[str, tuple[str, ...]] = {
    "status": (
        "what is the status of {n}",
        "any update on {n}",
        "i am still waiting on {n}",
        "{n} is still pending",
        "nothing has happened with {n} for days",
        "how long will {n} take",
    ),
    "error": (
        "{n} shows an error",
        "{n} does not work",
        "{n} fails every time",
        "something is broken with {n}",
        "{n} stopped working",
        "i get a strange message from {n}",
    ),
    "change": (
        "i need to change {n}",
        "please update {n}",
        "{n} has the wrong details",
        "can you edit {n}",
        "i want to modify {n}",
        "{n} needs a correction",
    ),
    "cancel": (
        "please cancel {n}",
        "i want to stop {n}",
        "remove {n} please",
        "i no longer want {n}",
        "call off {n} for me",
        "get rid of {n}",
    ),
    "question": (
        "how does {n} work",
        "i have a question about {n}",
        "where do i find {n}",
        "can you explain {n}",
        "what are the rules for {n}",
        "i do not understand {n}",
    ),
}

# ticket type -> a closing request that restates it, as customers do ("Please cancel it.").
TYPE_ASKS: dict[str, tuple[str, ...]] = {
    "status": ("When will this be done?", "Please tell me where this stands.", "I need an update soon."),
    "error": ("Please fix this.", "It is broken.", "Nothing I try helps."),
    "change": ("Please correct it.", "It needs to be changed.", "Can you make the edit?"),
    "cancel": ("Please cancel it.", "I want it gone.", "Stop it right away."),
    "question": ("Please explain.", "I just want to understand.", "Where can I read more?"),
}

# The taxonomy: type -> area -> topics (the leaves).
TAXONOMY: dict[str, dict[str, tuple[str, ...]]] = {
    kind: {area: tuple(topics) for area, topics in TOPIC_NOUNS.items()} for kind in TYPE_FRAMES
}

_SIGNAL_PREFIXES = ("", "", "Urgent: ", "Again, ", "Please help: ", "As of today, ")
_TOPIC_FRAMES = ("This is about {t}.", "I am writing about {t}.", "Topic: {t}.", "Regarding {t}.", "It concerns {t}.")
_GREETINGS = ("Hi,", "Hello,", "Hey team,", "Good morning,", "Dear support,", "Hi there,")
_SIGNOFFS = ("Thanks.", "Thank you!", "Regards, {name}.", "Please help.", "Cheers, {name}.", "Best, {name}.")
_NAMES = ("Anna", "Ben", "Chen", "Dara", "Eli", "Femi", "Greta", "Hugo", "Ines", "Jonas", "Kai", "Lena")
_NOISE = (
    "My order number is {n}.",
    "Account id {n}.",
    "I have been a customer for {k} years.",
    "This is urgent.",
    "I already tried restarting.",
    "I wrote to you last week too.",
    "The weather here is terrible today.",
    "My colleague has the same plan.",
    "I use it every day.",
    "Please reply by email.",
    "Ticket ref {n}.",
    "I am on the {k} o'clock shift.",
    "Sorry for my english.",
    "Your chat was closed.",
)

MISFILED_TOPIC_RATE = 0.10


@lru_cache(maxsize=1)
def _leaves() -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """(label, type, topic nouns) for every leaf, in taxonomy order."""
    return tuple(
        (f"{kind}/{area}/{topic}", kind, TOPIC_NOUNS[area][topic])
        for kind, areas in TAXONOMY.items()
        for area, topics in areas.items()
        for topic in topics
    )


def leaf_labels() -> list[str]:
    """All leaf labels ``type/area/topic``, in taxonomy order."""
    return [label for label, _, _ in _leaves()]


def _pair_held_out(label: str, frame: int, noun: int) -> bool:
    return zlib.crc32(f"{label}|{frame}|{noun}".encode()) % 5 == 0


@lru_cache(maxsize=1)
def _signal_pairs() -> tuple[dict[str, list[tuple[int, int]]], dict[str, list[tuple[int, int]]]]:
    """Per leaf, the (frame, noun) pairs for training and for evaluation; both sides non-empty."""
    train: dict[str, list[tuple[int, int]]] = {}
    held: dict[str, list[tuple[int, int]]] = {}
    for label, kind, nouns in _leaves():
        pairs = [(f, n) for f in range(len(TYPE_FRAMES[kind])) for n in range(len(nouns))]
        held[label] = [pair for pair in pairs if _pair_held_out(label, *pair)] or pairs[:1]
        train[label] = [pair for pair in pairs if pair not in held[label]]
    return train, held


def _capitalise(s: str) -> str:
    return s[:1].upper() + s[1:]


class Ticket(NamedTuple):
    """A generated ticket: its text, its label, and the leaf of a wrong topic the text names (if it names one)."""

    text: str
    label: str
    misnamed: str | None


def _ticket(rng: random.Random, leaf: int, held_out: bool) -> Ticket:
    """One ticket; the random draws are fixed, so a seed always gives the same ticket."""
    leaves = _leaves()
    label, kind, nouns = leaves[leaf]
    train_pairs, held_pairs = _signal_pairs()
    frame, noun = rng.choice(held_pairs[label] if held_out else train_pairs[label])
    signal = _capitalise(rng.choice(_SIGNAL_PREFIXES) + TYPE_FRAMES[kind][frame].format(n=nouns[noun])) + "."

    named = leaf
    if rng.random() < MISFILED_TOPIC_RATE:  # the customer names the wrong topic; the signal decides
        named = rng.randrange(len(leaves))
        nouns = leaves[named][2]
    topic = rng.choice(_TOPIC_FRAMES).format(t=rng.choice(nouns))

    misnamed = None
    body = [signal]
    if rng.random() < 0.8:
        body.insert(rng.randint(0, 1), topic)
        if nouns != leaves[leaf][2]:  # same type as the ticket, the topic it wrongly names
            misnamed = "/".join([kind, *leaves[named][0].split("/")[1:]])
    if rng.random() < 0.7:
        body.append(rng.choice(TYPE_ASKS[kind]))
    for _ in range(rng.choice((0, 0, 1))):
        noise = rng.choice(_NOISE).format(n=rng.randrange(10000, 99999), k=rng.randint(2, 9))
        body.insert(rng.randint(0, len(body)), noise)
    if rng.random() < 0.4:
        body.insert(0, rng.choice(_GREETINGS))
    if rng.random() < 0.3:
        body.append(rng.choice(_SIGNOFFS).format(name=rng.choice(_NAMES)))
    return Ticket(" ".join(body), label, misnamed)


def _balanced_leaves(rng: random.Random, n: int) -> list[int]:
    """``n`` leaf indices: every leaf once per round, each round in a fresh random order.

    Balanced, yet with no fixed period: a repeating order would put the same leaves in the same batches
    every epoch and leave a model biased towards whichever leaves it saw last.
    """
    out: list[int] = []
    while len(out) < n:
        round_ = list(range(len(_leaves())))
        rng.shuffle(round_)
        out += round_
    return out[:n]


def _record(text: str, label: str, system_prompt: str | None, with_answer: bool) -> dict:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": text})
    if with_answer:
        return {"messages": [*messages, {"role": "assistant", "content": label}]}
    return {"messages": messages, "answer": label, "skill": "tickets"}


def ticket_examples(seed: int, n: int, system_prompt: str | None = None) -> list[dict]:
    """``n`` training chat records (system?, user = ticket, assistant = leaf label).

    Leaves are dealt in rounds (every leaf once per round, fresh order each round), so every leaf appears
    once ``n >= 120`` and classes stay balanced.
    """
    rng = random.Random(f"tickets:{seed}")
    return [
        _record(*_ticket(rng, leaf, held_out=False)[:2], system_prompt, with_answer=True)
        for leaf in _balanced_leaves(rng, n)
    ]


def ticket_eval_items(seed: int, n: int, system_prompt: str | None = None) -> list[dict]:
    """``n`` evaluation items ``{"messages", "answer", "skill": "tickets"}``, balanced over leaves.

    Signal sentences come from held-out (frame, phrase) pairs, so no evaluation ticket equals a training one.
    """
    rng = random.Random(f"ticket-eval:{seed}")
    return [
        _record(*_ticket(rng, leaf, held_out=True)[:2], system_prompt, with_answer=False)
        for leaf in _balanced_leaves(rng, n)
    ]


def ticket_prompts(seed: int, n: int, system_prompt: str | None = None) -> list[dict]:
    """``n`` prompt-only records for online RL (GRPO, PPO): ``{"messages": [system?, user], "label"}``.

    They are the training tickets of ``ticket_examples(seed, n)`` with the assistant turn moved to ``label``, so a
    grader comparing a sampled answer with ``label`` rewards exactly what supervised fine-tuning teaches. Training
    signal combinations only: none of them is an evaluation ticket.
    """
    return [
        {"messages": r["messages"][:-1], "label": r["messages"][-1]["content"]}
        for r in ticket_examples(seed, n, system_prompt)
    ]


def hard_negative(rng: random.Random, ticket: Ticket) -> str:
    """A wrong label a half-trained classifier would plausibly give ``ticket``.

    The topic the text wrongly names when it names one; otherwise, evenly, the right area and topic with a wrong
    type (how the ticket is phrased is the hard part to learn) or a sibling leaf (same type and area, another
    topic). One wrong part next to right ones teaches a preference model what decides the label; a random label
    would be told apart by anything.
    """
    if ticket.misnamed is not None:
        return ticket.misnamed
    kind, area, topic = ticket.label.split("/")
    if rng.random() < 0.5:
        kind = rng.choice([k for k in TAXONOMY if k != kind])
    else:
        topic = rng.choice([t for t in TAXONOMY[kind][area] if t != topic])
    return f"{kind}/{area}/{topic}"


def ticket_preferences(seed: int, n: int, system_prompt: str | None = None) -> list[dict]:
    """``n`` preference pairs ``{"prompt": [system?, user], "chosen": label, "rejected": hard negative}``.

    Training tickets balanced over leaves, as :func:`ticket_examples` makes them; both answers are in the SFT
    answer format (a bare leaf label), so DPO and reward models compare labels, not formats.
    """
    rng = random.Random(f"ticket-pairs:{seed}")
    pairs = []
    for leaf in _balanced_leaves(rng, n):
        ticket = _ticket(rng, leaf, held_out=False)
        prompt = _record(ticket.text, ticket.label, system_prompt, with_answer=False)["messages"]
        pairs.append({"prompt": prompt, "chosen": ticket.label, "rejected": hard_negative(rng, ticket)})
    return pairs


def write_jsonl(records: list[dict], path: Path) -> Path:
    """Write records one JSON object per line (UTF-8), creating parent folders; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
