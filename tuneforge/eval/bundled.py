"""The task suites that ship with tuneforge, addressed by name (``--tasks general``), and how their data is made.

``general`` measures what the embedded demo base knows — its invented world's facts, the small addition table and
letter counting (see :mod:`tuneforge.demo.world`) — so a fine-tune can show it kept them:

* ``general-skills`` — the demo's own general-skills questions, answered greedily, exact match per skill;
* ``general-facts`` — the same facts as four-way multiple choice by log-likelihood (no generation needed);
* ``general-text`` — perplexity on held-out documents of the pre-training distribution.

The JSONL files are generated, deterministically, from the world's generators; ``python -m tuneforge.eval.bundled``
writes them again and a test checks that the shipped files are exactly what it writes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

SUITES_DIR = Path(__file__).with_name("suites")

# The demo evaluates general skills on items 0..N of this stream (general_eval_items(4, N)), so shipping the first
# 300 covers its full size; its quick size reads a prefix (limit).
SKILLS_SEED, SKILLS_ITEMS = 4, 300
FACTS_SEED = "general-facts"
TEXT_SEED, TEXT_DOCS = 4000, 60


def bundled_names() -> list[str]:
    """Every bundled task and suite name."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def bundled_path(name: str) -> Path | None:
    """The YAML file of a bundled task or suite, or None."""
    path = SUITES_DIR / f"{name}.yaml"
    return path if "/" not in name and path.is_file() else None


def general_records() -> dict[str, list[dict[str, Any]]]:
    """The records of the ``general`` suite's tasks, by file stem."""
    from tuneforge.demo import world

    skills = world.general_eval_items(SKILLS_SEED, SKILLS_ITEMS)
    rng = random.Random(FACTS_SEED)
    pools = {"capital": world.CAPITALS, "profession": world.PROFESSIONS, "color": world.COLORS}
    facts = []
    for skill in world.FACT_SKILLS:
        for qa in world.recall_questions(skill):
            choices = [qa.answer, *rng.sample([x for x in pools[skill] if x != qa.answer], 3)]
            rng.shuffle(choices)
            facts.append(
                {"question": qa.question, "choices": choices, "answer": choices.index(qa.answer), "skill": skill}
            )
    text = [{"text": doc} for doc in world.general_corpus(TEXT_SEED, TEXT_DOCS)]
    return {"general-skills": skills, "general-facts": facts, "general-text": text}


def write_general(out_dir: Path = SUITES_DIR) -> list[Path]:
    """Write the ``general`` suite's JSONL files into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, records in general_records().items():
        path = out_dir / f"{stem}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_general():
        print(p)
