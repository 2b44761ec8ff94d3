"""Generated support tickets for the demo's domain task: classify a ticket into a 3-level taxonomy.

120 leaves (6 areas × 4 topics × 5 issues), labels like ``billing/refunds/double-charge``. A ticket is a
few sentences built from templates: one sentence carries a leaf-specific phrase (the signal), one names
the topic (shared by the five sibling leaves, and 15 % of the time a *wrong* topic, as customers misfile),
and the rest is noise shared by every class (greetings, order numbers, small talk, sign-offs). So a model
must find the one phrase that matters; a bag of topic words is not enough.

Held-out design: the signal sentence is a (frame, phrase) pair, and a fixed hash of (leaf, frame, phrase)
assigns each pair to training or evaluation. Evaluation tickets therefore contain each leaf's known
phrases in sentence frames never seen with that phrase in training: the model must recognise the phrase,
not memorise sentences. Every leaf has pairs on both sides.
"""

from __future__ import annotations

import json
import random
import zlib
from functools import lru_cache
from pathlib import Path

TICKET_SYSTEM_PROMPT = "Classify the support ticket. Answer with its category."

# area -> topic -> (topic phrases, {issue: leaf phrases}). Phrases are lower-case clauses or noun phrases.
TAXONOMY: dict[str, dict[str, tuple[tuple[str, ...], dict[str, tuple[str, ...]]]]] = {
    "billing": {
        "refunds": (("my refund", "a refund request", "getting my money back"), {
            "double-charge": ("i was charged twice for one order", "the same payment appears two times", "my card shows a duplicate charge"),
            "partial-refund": ("only part of the amount came back", "the refund was smaller than the price", "i got back half of what i paid"),
            "refund-delay": ("the refund has not arrived after three weeks", "you promised the money days ago", "the refund is still pending"),
            "refund-denied": ("my refund request was rejected", "you refused to refund me", "the refund was declined without reason"),
            "refund-method": ("i want the refund on a different card", "can the refund go to my bank account", "please refund to paypal instead"),
        }),
        "invoices": (("an invoice", "my invoices", "the billing documents"), {
            "missing-invoice": ("i never received an invoice", "there is no invoice in my account", "the invoice email did not come"),
            "wrong-address": ("the invoice shows my old street", "the billing address on the invoice is wrong", "the invoice has the wrong postcode"),
            "vat-number": ("my vat number is missing", "please add our tax id", "the vat id on the invoice is incorrect"),
            "invoice-copy": ("i need a copy of last year's invoice", "please resend the pdf invoice", "can i download old invoices"),
            "currency": ("the invoice is in dollars not euros", "i was billed in the wrong currency", "the exchange rate on the invoice looks odd"),
        }),
        "payments": (("a payment", "paying for my order", "the checkout"), {
            "card-declined": ("my card keeps getting declined", "the payment fails with my visa", "the card is rejected at checkout"),
            "paypal": ("paypal does not show up as an option", "the paypal payment did not go through", "i cannot link my paypal wallet"),
            "bank-transfer": ("i paid by bank transfer but nothing happened", "where do i send the wire transfer", "the bank transfer reference is missing"),
            "expired-card": ("my card expired last month", "how do i replace my expired card", "the saved card is out of date"),
            "payment-pending": ("the payment has been pending for hours", "the charge is stuck in processing", "my order says awaiting payment"),
        }),
        "subscription": (("my subscription", "my plan", "the monthly membership"), {
            "upgrade": ("i want to move to the premium plan", "how do i upgrade my plan", "we need more seats on a bigger plan"),
            "downgrade": ("i want a cheaper plan", "please move me to the basic tier", "how do i downgrade"),
            "cancel": ("i want to cancel my subscription", "please stop my membership", "end my plan at the end of the month"),
            "renewal": ("it renewed automatically without warning", "i did not expect the yearly renewal", "please turn off auto renewal"),
            "trial-end": ("my free trial ended early", "i was charged right after the trial", "can you extend my trial"),
        }),
    },
    "account": {
        "login": (("logging in", "signing in", "the login page"), {
            "forgot-password": ("i forgot my password", "the password reset email never arrives", "i need to reset my password"),
            "locked-out": ("my account is locked after too many attempts", "it says the account is temporarily blocked", "i am locked out"),
            "two-factor": ("i lost the phone with my authenticator app", "the two factor code is always invalid", "the sms code never arrives"),
            "sso": ("single sign on with our company google fails", "the saml login loops forever", "our okta sign in stopped working"),
            "session-expired": ("i get logged out every few minutes", "my session keeps expiring", "it signs me out while typing"),
        }),
        "profile": (("my profile", "my personal details", "the account settings"), {
            "change-email": ("i want to change my email address", "please update my login email", "my email changed and i need to switch"),
            "change-name": ("my name is spelled wrong", "i got married and want my new surname", "please change the display name"),
            "avatar": ("my profile picture will not upload", "the avatar image looks blurry", "how do i remove my photo"),
            "phone-number": ("i need to update my phone number", "my mobile number is outdated", "the phone field will not save"),
            "language": ("the site is in german but i want english", "how do i change the language", "the app shows the wrong language"),
        }),
        "access": (("team access", "our workspace members", "user roles"), {
            "add-user": ("how do i invite a new colleague", "i want to add a user to our team", "the invite link for a new member fails"),
            "remove-user": ("please remove a former employee", "how do i delete a team member", "someone who left still has access"),
            "permissions": ("my colleague cannot edit the files", "i need admin rights", "the viewer role is too limited"),
            "ownership-transfer": ("please transfer the workspace to my manager", "the owner left the company", "make me the new account owner"),
            "guest-access": ("can an outside partner get temporary access", "guest users cannot open the link", "how do i share with an external client"),
        }),
        "closure": (("closing my account", "my account status", "leaving the service"), {
            "delete-account": ("please delete my account permanently", "i want all my data erased and the account closed", "how do i remove my account"),
            "data-export": ("i want to download all my data first", "give me an export of everything i stored", "how do i get an archive of my files"),
            "reactivate": ("i closed my account by mistake", "please reopen my old account", "can i restore my deactivated account"),
            "merge-accounts": ("i have two accounts and want one", "please combine my work and personal accounts", "merge my duplicate profiles"),
            "inactive-account": ("you warned that my account is inactive", "will my unused account be closed", "i got a dormant account notice"),
        }),
    },
    "shipping": {
        "delivery": (("my delivery", "the parcel", "the shipment"), {
            "late": ("the package is a week late", "the delivery date passed yesterday", "my order still has not arrived"),
            "lost-package": ("tracking says delivered but nothing is here", "the parcel is lost", "the courier cannot find my package"),
            "wrong-address": ("i entered the wrong delivery address", "please change the shipping address", "it is going to my old flat"),
            "signature": ("nobody was home to sign", "can it be left without a signature", "the driver needs a signature i cannot give"),
            "tracking": ("the tracking number does not work", "tracking has not updated in days", "i never got a tracking link"),
        }),
        "returns": (("a return", "sending something back", "the returns process"), {
            "return-label": ("i need a return label", "the return label will not print", "where is the prepaid return slip"),
            "return-status": ("you received my return but nothing happened", "what is the status of my return", "the return is not showing as received"),
            "exchange": ("i want a different size instead", "can i swap it for another color", "please exchange the item"),
            "damaged-item": ("the item arrived broken", "the box was crushed and the contents cracked", "the product was damaged in transit"),
            "wrong-item": ("i received the wrong product", "this is not what i ordered", "you sent someone else's item"),
        }),
        "international": (("shipping abroad", "an international order", "delivery to another country"), {
            "customs": ("the parcel is stuck at customs", "customs wants paperwork from me", "the customs declaration is missing"),
            "duties": ("i had to pay import duties", "why are there extra import fees", "the courier asked for tax on arrival"),
            "restricted-country": ("you do not ship to my country", "my country is not in the list", "delivery to my region is blocked"),
            "address-format": ("the form rejects my foreign postcode", "my address does not fit your fields", "there is no field for my province"),
            "shipping-cost": ("the shipping fee abroad is too high", "why does overseas delivery cost so much", "the postage quote looks wrong"),
        }),
        "pickup": (("a pickup point", "collecting my order", "click and collect"), {
            "store-pickup": ("my store pickup order is not ready", "the shop says they never got my order", "when can i collect in store"),
            "locker": ("the parcel locker will not open", "the locker code was rejected", "my package went to a locker i cannot reach"),
            "reschedule": ("i need a different pickup day", "can i move the collection time", "please reschedule the pickup"),
            "pickup-code": ("i never got the pickup code", "the collection code is missing", "the shop wants a code i do not have"),
            "missed-pickup": ("i missed the pickup deadline", "my order was sent back from the pickup point", "the collection window closed"),
        }),
    },
    "technical": {
        "app": (("the app", "the mobile app", "your application"), {
            "crash": ("the app crashes on start", "it closes as soon as i open it", "the app freezes and quits"),
            "slow": ("everything loads very slowly", "the app takes a minute to open", "pages lag badly"),
            "update-failed": ("the latest update will not install", "the update gets stuck at half", "installing the new version fails"),
            "notifications": ("i get no push notifications", "notifications arrive hours late", "i cannot turn off the alerts"),
            "offline-mode": ("offline mode does not save my work", "nothing works without internet", "my offline changes vanished"),
        }),
        "integrations": (("an integration", "connecting other tools", "our connected apps"), {
            "api-key": ("my api key is rejected", "i need a new api token", "the api returns unauthorized"),
            "webhook": ("the webhook never fires", "our webhook endpoint gets no events", "webhook deliveries fail"),
            "slack": ("the slack integration stopped posting", "messages do not reach our slack channel", "i cannot connect slack"),
            "calendar-sync": ("events do not sync to my calendar", "the google calendar link broke", "meetings show up twice in outlook"),
            "rate-limit": ("we hit the rate limit constantly", "the api says too many requests", "our requests are throttled"),
        }),
        "data": (("my data", "the stored records", "our files"), {
            "sync-conflict": ("two devices show different versions", "edits overwrite each other", "i see a sync conflict warning"),
            "missing-data": ("some of my records disappeared", "last week's entries are gone", "half my notes are missing"),
            "import-failed": ("the csv import fails", "importing my spreadsheet gives an error", "the upload of old data stops"),
            "export-format": ("the export is not in excel format", "i need the export as json", "the exported file is unreadable"),
            "backup-restore": ("i need to restore yesterday's backup", "can you roll back my data", "the restore from backup failed"),
        }),
        "devices": (("my device", "the platform i use", "my setup"), {
            "android": ("it does not work on my android phone", "the android version is broken", "my samsung shows a blank screen"),
            "ios": ("it fails on my iphone", "the ios app is broken after the update", "my ipad cannot open it"),
            "desktop": ("the windows program will not start", "the mac desktop app is blank", "the desktop client shows an error"),
            "browser": ("the website breaks in firefox", "buttons do not work in safari", "chrome shows a blank page"),
            "smartwatch": ("the watch app does not sync", "my smartwatch shows no data", "the wearable lost its connection"),
        }),
    },
    "product": {
        "features": (("a feature", "the product", "your tool"), {
            "feature-request": ("please add a way to tag items", "i would love a kanban view", "could you build bulk editing"),
            "dark-mode": ("i want a dark theme", "the screen is too bright at night", "please add dark mode"),
            "search": ("search does not find my items", "the search results are wrong", "i cannot search by date"),
            "reports": ("the monthly report shows wrong totals", "i need a custom report", "the chart in the report is empty"),
            "templates": ("where are the templates", "i cannot save my own template", "the template gallery is empty"),
        }),
        "pricing": (("the price", "your pricing", "the cost"), {
            "discount": ("is there a discount code", "my coupon did not apply", "the promo code is invalid"),
            "student-plan": ("do you have a student price", "i am a student and need a cheaper plan", "my student discount expired"),
            "nonprofit": ("we are a charity", "do you offer nonprofit pricing", "our ngo needs a reduced rate"),
            "price-increase": ("why did the price go up", "my bill is higher than last month", "the new prices are too expensive"),
            "enterprise-quote": ("we need a quote for five hundred users", "please send an enterprise offer", "we want volume pricing"),
        }),
        "feedback": (("some feedback", "my experience", "your service"), {
            "bug-report": ("i found a bug in the editor", "the save button does nothing", "there is an error when i sort"),
            "praise": ("i love the new design", "great job on the last release", "your team has been wonderful"),
            "complaint": ("i am very unhappy with the service", "this is the worst support i have had", "i am disappointed with the quality"),
            "survey": ("the survey link is broken", "i want to answer your questionnaire", "you keep sending me surveys"),
            "documentation": ("the help docs are outdated", "the guide skips a step", "i cannot find the manual"),
        }),
        "availability": (("an item in your shop", "a product i want", "the catalogue"), {
            "out-of-stock": ("it has been out of stock for weeks", "when will it be back in stock", "the item shows sold out"),
            "preorder": ("can i preorder the new model", "my preorder has no ship date", "i want to cancel my preorder"),
            "discontinued": ("is this product discontinued", "you stopped selling my favorite model", "the item vanished from the shop"),
            "region-launch": ("when will it launch in my country", "it is only sold in the us", "is it coming to europe"),
            "waitlist": ("please add me to the waitlist", "i joined the waitlist but heard nothing", "how long is the waiting list"),
        }),
    },
    "security": {
        "fraud": (("possible fraud", "something suspicious", "a scam"), {
            "phishing": ("i got an email pretending to be you", "a fake login page asked for my password", "someone sent me a phishing link"),
            "unknown-charge": ("there is a charge i do not recognise", "i did not make this purchase", "an order i never placed was billed"),
            "account-takeover": ("someone changed my password and email", "a stranger took over my account", "i lost control of my account"),
            "fake-seller": ("a seller sent me a counterfeit", "the seller is a fake shop", "the merchant never sends anything"),
            "scam-call": ("someone called claiming to be your support", "a caller asked for my card details", "i got a call from a fake agent"),
        }),
        "privacy": (("my privacy", "my personal data", "data protection"), {
            "gdpr-request": ("i want to see all data you hold on me", "this is a subject access request", "send me my gdpr data"),
            "cookies": ("the cookie banner keeps coming back", "i want to refuse all cookies", "you set cookies without consent"),
            "data-sharing": ("do you sell my data to partners", "who do you share my data with", "i do not want my data shared"),
            "marketing-optout": ("stop sending me newsletters", "unsubscribe me from marketing", "i keep getting promo emails"),
            "location-data": ("why does the app track my location", "turn off location tracking", "you store my gps history"),
        }),
        "compliance": (("compliance", "a security review", "our auditors"), {
            "soc2": ("we need your soc report", "is the service soc certified", "send the latest soc audit"),
            "hipaa": ("we store health data and need hipaa", "will you sign a business associate agreement", "is it safe for patient records"),
            "audit-log": ("we need an audit log of admin actions", "the audit trail is missing entries", "how long are audit logs kept"),
            "data-residency": ("our data must stay in the eu", "which region hosts our data", "can we choose the data center"),
            "pen-test": ("we want to run a penetration test", "may we scan your api for weaknesses", "our security team plans a pen test"),
        }),
        "incidents": (("a security incident", "a security problem", "an attack"), {
            "data-breach": ("my data appeared in a breach", "was your database leaked", "i read about your breach in the news"),
            "suspicious-login": ("i got an alert about a login from abroad", "someone signed in from an unknown device", "there is a login i did not do"),
            "malware": ("the download contained a virus", "my antivirus flags your file", "the installer looks like malware"),
            "vulnerability": ("i found a security hole in your site", "i want to report a vulnerability", "there is an injection flaw in the form"),
            "leaked-password": ("my password was exposed in a leak", "a site says my password is compromised", "my credentials were posted online"),
        }),
    },
}

# Signal frames: each carries one leaf phrase. (frame, phrase) pairs are split between train and eval.
_SIGNAL_FRAMES = (
    "{P}.",
    "The problem is that {p}.",
    "It seems {p}.",
    "Since yesterday {p}.",
    "Please check this, {p}.",
    "Not sure why but {p}.",
    "Urgent: {p}.",
    "Quick question, {p}.",
    "I noticed that {p}.",
    "Again {p}.",
    "Can you help? {p}.",
    "As of this morning {p}.",
)
_TOPIC_FRAMES = ("This is about {t}.", "I am writing about {t}.", "Topic: {t}.", "Regarding {t}.", "About {t}:")
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

MISFILED_TOPIC_RATE = 0.15


@lru_cache(maxsize=1)
def _leaves() -> tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]:
    """(label, topic phrases, leaf phrases) for every leaf, in taxonomy order."""
    out = []
    for area, topics in TAXONOMY.items():
        for topic, (topic_phrases, issues) in topics.items():
            for issue, phrases in issues.items():
                out.append((f"{area}/{topic}/{issue}", topic_phrases, phrases))
    return tuple(out)


def leaf_labels() -> list[str]:
    """All leaf labels ``area/topic/issue``, in taxonomy order."""
    return [label for label, _, _ in _leaves()]


def _pair_held_out(label: str, frame: int, phrase: int) -> bool:
    return zlib.crc32(f"{label}|{frame}|{phrase}".encode()) % 5 == 0


@lru_cache(maxsize=1)
def _signal_pairs() -> tuple[dict[str, list[tuple[int, int]]], dict[str, list[tuple[int, int]]]]:
    """Per leaf, the (frame, phrase) pairs for training and for evaluation; both sides non-empty."""
    train: dict[str, list[tuple[int, int]]] = {}
    held: dict[str, list[tuple[int, int]]] = {}
    for label, _, phrases in _leaves():
        pairs = [(f, p) for f in range(len(_SIGNAL_FRAMES)) for p in range(len(phrases))]
        held[label] = [pair for pair in pairs if _pair_held_out(label, *pair)] or pairs[:1]
        train[label] = [pair for pair in pairs if pair not in held[label]]
    return train, held


def _capitalise(s: str) -> str:
    return s[:1].upper() + s[1:]


def _ticket(rng: random.Random, leaf: int, held_out: bool) -> tuple[str, str]:
    """One ticket text and its label."""
    leaves = _leaves()
    label, topic_phrases, phrases = leaves[leaf]
    train_pairs, held_pairs = _signal_pairs()
    frame, phrase = rng.choice(held_pairs[label] if held_out else train_pairs[label])
    p = phrases[phrase]
    signal = _SIGNAL_FRAMES[frame].format(p=p, P=_capitalise(p))

    if rng.random() < MISFILED_TOPIC_RATE:  # the customer names the wrong topic; the phrase decides
        topic_phrases = leaves[rng.randrange(len(leaves))][1]
    topic = rng.choice(_TOPIC_FRAMES).format(t=rng.choice(topic_phrases))

    body = [signal]
    if rng.random() < 0.8:
        body.insert(rng.randint(0, 1), topic)
    for _ in range(rng.choice((0, 0, 1))):
        noise = rng.choice(_NOISE).format(n=rng.randrange(10000, 99999), k=rng.randint(2, 9))
        body.insert(rng.randint(0, len(body)), noise)
    if rng.random() < 0.4:
        body.insert(0, rng.choice(_GREETINGS))
    if rng.random() < 0.3:
        body.append(rng.choice(_SIGNOFFS).format(name=rng.choice(_NAMES)))
    return " ".join(body), label


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
        _record(*_ticket(rng, leaf, held_out=False), system_prompt, with_answer=True)
        for leaf in _balanced_leaves(rng, n)
    ]


def ticket_eval_items(seed: int, n: int, system_prompt: str | None = None) -> list[dict]:
    """``n`` evaluation items ``{"messages", "answer", "skill": "tickets"}``, balanced over leaves.

    Signal sentences come from held-out (frame, phrase) pairs, so no evaluation ticket equals a training one.
    """
    rng = random.Random(f"ticket-eval:{seed}")
    return [
        _record(*_ticket(rng, leaf, held_out=True), system_prompt, with_answer=False)
        for leaf in _balanced_leaves(rng, n)
    ]


def write_jsonl(records: list[dict], path: Path) -> Path:
    """Write records one JSON object per line (UTF-8), creating parent folders; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
