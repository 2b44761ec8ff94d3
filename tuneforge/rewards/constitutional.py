"""Constitutional AI's critique-and-revise step, turned into DPO preference pairs (RLAIF).

As in Bai et al. (2022), the model answers a prompt, is asked to critique its answer against a principle,
then to revise the answer in the light of that critique — all within one conversation (answer, critique
request, critique, revision request, revision). With ``k`` principles the loop runs ``k`` times, each round
starting from the prompt and the latest revision, so the context stays one round long however large ``k``
is. The final revision is preferred over the first answer: one OpenAI-DPO record per prompt, ready for
``method: dpo``.

The model is any :class:`~tuneforge.rewards.judge.Judge` — an OpenAI-compatible endpoint or a local Hugging
Face directory — so the same credentials and backends serve ``score_model`` graders and this step. One
failing prompt is counted and logged, never fatal; finished pairs are appended to ``OUT.partial`` as they
arrive, so an interrupted run resumes where it stopped, and the output file is replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tuneforge.data.formats import check_record
from tuneforge.data.readers import read_records
from tuneforge.errors import DataError, DataIssue, RecipeError, TuneforgeError, suggest
from tuneforge.files import atomic_path
from tuneforge.rewards.judge import Judge, LocalJudge, OpenAIJudge

log = logging.getLogger(__name__)

DEFAULT_PRINCIPLES = Path(__file__).resolve().parent / "constitution.yaml"  # shipped with the package
PRINCIPLE_KEYS = ("name", "critique_request", "revision_request")
# A dead endpoint or a wrong model name fails every call; stop after this many failures with no success.
ABORT_AFTER_FAILURES = 8

_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL | re.IGNORECASE)
# Models prompted to revise often echo a label before the text (the paper's own format is "Revision: …").
_REVISION_LABEL = re.compile(
    r"^\s*\**(?:revision|revised (?:response|answer)|rewritten (?:response|answer))\**\s*:\s*\**\s*", re.IGNORECASE
)


# ------------------------------------------------------------------------------------------- principles


@dataclass(frozen=True)
class Principle:
    """One rule of the constitution: how to ask for a critique against it, and for a revision after."""

    name: str
    critique_request: str
    revision_request: str


def load_principles(path: str | Path | None = None) -> list[Principle]:
    """Principles from a YAML or JSON file (default: the shipped ``tuneforge/rewards/constitution.yaml``)."""
    p = Path(path).expanduser() if path is not None else DEFAULT_PRINCIPLES
    if not p.is_file():
        hint = (
            ""
            if path is not None
            else " (the default ships as tuneforge/rewards/constitution.yaml; pass --principles FILE)"
        )
        raise RecipeError(f"principles file not found: {p}{hint}")
    text = p.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise RecipeError(f"{p}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise RecipeError(f"{p}{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    return parse_principles(raw, str(p))


def parse_principles(raw: Any, source: str = "principles") -> list[Principle]:
    """Check a decoded constitution — ``{"principles": [...]}`` or a bare list — naming every bad field."""
    problems: list[str] = []

    def bad(where: str, problem: str, expected: str) -> None:
        problems.append(f"{source}: {where}: {problem} (expected {expected})")

    items: Any = raw
    prefix = ""
    if isinstance(raw, dict):
        prefix = "principles"
        for key in raw:
            if key != "principles":
                bad(str(key), "unknown key", "only 'principles'" + _did_you_mean(str(key), ["principles"]))
        if "principles" not in raw:
            bad("principles", "missing", "a list of principles")
        items = raw.get("principles", [])
    if not isinstance(items, list) or not items:
        if not (isinstance(raw, dict) and "principles" not in raw):
            got = "is empty" if items in ([], None) else f"is {_kind(items)}"
            bad(prefix or "(top level)", got, "a non-empty list of {name, critique_request, revision_request}")
        items = []
    out: list[Principle] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        where = f"{prefix}[{i}]"
        if not isinstance(item, dict):
            bad(where, f"is {_kind(item)}", "a mapping with " + ", ".join(PRINCIPLE_KEYS))
            continue
        for key in item:
            if key not in PRINCIPLE_KEYS:
                hint = _did_you_mean(str(key), list(PRINCIPLE_KEYS))
                bad(f"{where}.{key}", "unknown key", "one of " + ", ".join(PRINCIPLE_KEYS) + hint)
        ok = True
        for key in PRINCIPLE_KEYS:
            value = item.get(key)
            if key not in item:
                bad(f"{where}.{key}", "missing", "a non-empty string")
                ok = False
            elif not isinstance(value, str) or not value.strip():
                got = "is empty" if isinstance(value, str) else f"is {_kind(value)}"
                bad(f"{where}.{key}", got, "a non-empty string")
                ok = False
        if not ok:
            continue
        name = item["name"].strip()
        if name in seen:
            bad(f"{where}.name", f"duplicate name {name!r} (also {prefix}[{seen[name]}])", "unique names")
            continue
        seen[name] = i
        out.append(Principle(name, item["critique_request"].strip(), item["revision_request"].strip()))
    if problems:
        raise RecipeError("\n".join(problems))
    return out


def choose_principles(principles: Sequence[Principle], k: int | None, seed: int, key: str) -> list[Principle]:
    """The principles one prompt is revised against: all in order (``k=None``) or ``k`` drawn with a seed.

    The draw depends on the seed and the prompt's content, not its position, so a resumed or reordered
    run gives each prompt the same principles.
    """
    if k is None:
        return list(principles)
    return random.Random(prompt_seed(seed, key)).sample(list(principles), k)


def prompt_seed(seed: int, key: str) -> int:
    """A stable 31-bit seed per (run seed, prompt) — Python's ``hash`` of a str changes between processes."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


# ----------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    """A prompt to answer: the conversation so far (ending with a user or tool turn) and where it came from."""

    line: int
    messages: list[dict[str, Any]]
    tools: list[Any] | None = None

    @property
    def input(self) -> dict[str, Any]:
        """The ``input`` of the DPO record this prompt becomes."""
        return {"messages": self.messages, **({"tools": self.tools} if self.tools is not None else {})}

    @property
    def key(self) -> str:
        """Identity for resuming: two prompts with the same input are the same work."""
        return input_key(self.input)


def input_key(inp: dict[str, Any]) -> str:
    return json.dumps(inp, sort_keys=True, ensure_ascii=False)


def read_prompts(path: str | Path) -> list[Prompt]:
    """Every prompt of a data file; any bad record raises a ``DataError`` listing all of them.

    Accepted records: ``prompt`` format (``{"messages": [... user]}``, extra keys ignored), a chat whose
    final assistant turn is dropped, or ``{"prompt": "...", "completion"?: "..."}`` whose prompt is used.
    """
    prompts: list[Prompt] = []
    issues: list[DataIssue] = []
    n = 0
    name = str(path)
    for rec in read_records(path):
        n += 1
        name = rec.path
        if rec.error is not None:
            issues.append(DataIssue(rec.path, rec.line, "", rec.error))
            continue
        prompt, problems = _prompt_from_record(rec.value, rec.line)
        issues.extend(DataIssue(rec.path, rec.line, f, p, e) for f, p, e in problems)
        if prompt is not None:
            prompts.append(prompt)
    if n == 0:
        issues.append(DataIssue(name, 0, "", "holds no records", "at least one prompt"))
    if issues:
        bad_lines = len({i.line for i in issues})
        raise DataError(issues, f"{name}: {bad_lines} of {n} prompt record(s) are bad; nothing was generated")
    return prompts


def _prompt_from_record(value: Any, line: int) -> tuple[Prompt | None, list[tuple[str, str, str]]]:
    if not isinstance(value, dict):
        return None, [("", f"record is {_kind(value)}", "a JSON object")]
    if "messages" in value:
        msgs = value["messages"]
        last = msgs[-1] if isinstance(msgs, list) and msgs else None
        if isinstance(last, dict) and last.get("role") == "assistant":
            problems = check_record(value, "messages", allow_extra="*")
            if not problems and (len(msgs) < 2 or msgs[-2].get("role") not in ("user", "tool")):
                problems = [
                    (
                        f"messages[{len(msgs) - 1}]",
                        "dropping the final assistant answer leaves no user turn before it",
                        "a chat ending with a user message, optionally followed by one answer",
                    )
                ]
            context = msgs[:-1]
        else:
            problems = check_record(value, "prompt", allow_extra="*")
            context = msgs
        if problems:
            return None, problems
        # ``weight`` belongs to SFT chats; DPO inputs reject it and the answering model never needs it.
        messages = [{k: v for k, v in m.items() if k != "weight"} for m in context]
        return Prompt(line, messages, value.get("tools")), []
    if "prompt" in value:
        problems = check_record(value, "prompt_completion", allow_extra="*") if "completion" in value else []
        text = value["prompt"]
        if "completion" not in value and (not isinstance(text, str) or not text.strip()):
            got = f"is {_kind(text)}" if not isinstance(text, str) else "is empty"
            problems = [("prompt", got, "a non-empty string")]
        if problems:
            return None, problems
        return Prompt(line, [{"role": "user", "content": text}]), []
    keys = ", ".join(map(str, value)) or "none"
    return None, [
        (
            "",
            f"no prompt in the record (keys: {keys})",
            'a "messages" array ending with a user message, or a "prompt" string',
        )
    ]


# ------------------------------------------------------------------------------------------------ backend


def build_model_client(
    model: str,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    api_key_env: str | None = None,
    timeout: float = 120.0,
    max_retries: int = 2,
) -> Judge:
    """The model that answers, critiques and revises: a local HF directory, or an OpenAI-compatible endpoint.

    A directory is used locally unless ``base_url`` is given (an explicit endpoint wins over a same-named
    folder). Credentials, first found wins: ``api_key``, the variable ``api_key_env`` names, ``$OPENAI_API_KEY``;
    a self-hosted ``base_url`` may go keyless, as in :func:`tuneforge.rewards.judge.build_score_model`.
    """
    local = os.path.expanduser(model)
    if base_url is None and os.path.isdir(local):
        from tuneforge.models.loading import load_tokenizer

        if not load_tokenizer(local).chat_template:  # fail once here, not once per prompt
            raise TuneforgeError(
                f"--model {model}: the tokenizer has no chat template, so it cannot hold a "
                "conversation (add one to tokenizer_config.json)"
            )
        return LocalJudge(local)
    key = api_key
    if key is None and api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise TuneforgeError(f"--api-key-env: the environment variable {api_key_env} is not set")
    key = key or os.environ.get("OPENAI_API_KEY")
    if not key:
        if not (base_url or os.environ.get("OPENAI_BASE_URL")):
            raise TuneforgeError(
                f"--model {model!r} is not a local model directory and no endpoint is configured: pass --base-url "
                "(any OpenAI-compatible server) or an API key (--api-key-env VAR, or $OPENAI_API_KEY)"
            )
        key = "unused"  # self-hosted servers usually ignore the key, but the client insists on one
    return OpenAIJudge(model, base_url, key, timeout, max_retries)


# ---------------------------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class Settings:
    """How pairs are made; each field is one CLI flag."""

    revisions: int | None = 1  # principles per prompt; None: every principle, in the file's order
    seed: int = 0
    temperature: float = 0.7
    max_tokens: int = 512
    concurrency: int = 8

    def check(self, n_principles: int) -> None:
        """Reject settings that cannot work, naming the flag, before any model call."""
        if self.revisions is not None and not 1 <= self.revisions <= n_principles:
            raise TuneforgeError(
                f"--revisions: {self.revisions} is not between 1 and the {n_principles} "
                "principle(s) in the constitution (or 'all')"
            )
        if self.max_tokens < 1:
            raise TuneforgeError(f"--max-tokens: must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise TuneforgeError(f"--temperature: must be 0 or more, got {self.temperature}")
        if self.concurrency < 1:
            raise TuneforgeError(f"--concurrency: must be at least 1, got {self.concurrency}")

    def params(self, seed: int) -> dict[str, Any]:
        """Sampling parameters in the judge's vocabulary (OpenAI's score_model ``sampling_params``)."""
        return {"temperature": self.temperature, "max_completions_tokens": self.max_tokens, "seed": seed}


@dataclass
class Outcome:
    """What happened to one prompt: the pair, or why there is none; ``steps`` keep every critique."""

    prompt: Prompt
    principles: list[str]
    original: str | None = None
    revised: str | None = None
    steps: list[dict[str, str]] = field(default_factory=list)
    skipped: str | None = None
    error: str | None = None

    @property
    def pair(self) -> dict[str, Any] | None:
        """The OpenAI-DPO record (revised preferred over original), or ``None`` when skipped."""
        if self.skipped is not None or self.revised is None or self.original is None:
            return None
        return {
            "input": self.prompt.input,
            "preferred_output": [{"role": "assistant", "content": self.revised}],
            "non_preferred_output": [{"role": "assistant", "content": self.original}],
        }

    def inspection(self) -> dict[str, Any]:
        """The whole exchange, for the ``--critiques`` side file (DPO records allow no extra keys)."""
        return {
            "line": self.prompt.line,
            "input": self.prompt.input,
            "principles": self.principles,
            "original": self.original,
            "steps": self.steps,
            "revised": self.revised,
            "skipped": self.skipped,
            "error": self.error,
        }


def clean_reply(text: str, *, revision: bool = False) -> str:
    """A reply without reasoning blocks and surrounding space; a revision also loses a "Revision:" label."""
    text = _THINK.sub("", text).strip()
    return _REVISION_LABEL.sub("", text, count=1).strip() if revision else text


def critique_and_revise(
    judge: Judge, prompt: Prompt, principles: Sequence[Principle], params: dict[str, Any]
) -> Outcome:
    """Answer ``prompt``, then critique and revise the answer once per principle; never raises for a call."""
    out = Outcome(prompt, [p.name for p in principles])
    stage = "answer"
    try:
        original = clean_reply(judge.reply(list(prompt.messages), params))
        out.original = original
        if not original:
            return _skip(out, "empty_answer", "the model's answer was empty")
        current = original
        for p in principles:
            stage = f"critique ({p.name})"
            talk = [
                *prompt.messages,
                {"role": "assistant", "content": current},
                {"role": "user", "content": p.critique_request},
            ]
            critique = clean_reply(judge.reply(talk, params))
            if not critique:
                out.steps.append({"principle": p.name, "critique": critique, "revision": ""})
                return _skip(out, "empty_critique", f"the critique against {p.name!r} was empty")
            stage = f"revision ({p.name})"
            talk += [{"role": "assistant", "content": critique}, {"role": "user", "content": p.revision_request}]
            revision = clean_reply(judge.reply(talk, params), revision=True)
            out.steps.append({"principle": p.name, "critique": critique, "revision": revision})
            if not revision:
                return _skip(out, "empty_revision", f"the revision after {p.name!r} was empty")
            current = revision
    except Exception as e:  # network, HTTP status, model errors: this prompt is lost, the run goes on
        return _skip(out, "call_failed", f"the {stage} call failed: {type(e).__name__}: {e}")
    if current == original:
        return _skip(out, "unchanged", "the revision is identical to the original answer")
    out.revised = current
    problems = check_record(out.pair, "preference")
    if problems:  # cannot happen for non-empty strings, but a bad record must never reach the output
        out.revised = None
        return _skip(out, "invalid_pair", "; ".join(f"{f}: {p}" for f, p, _ in problems))
    return out


def _skip(out: Outcome, reason: str, error: str) -> Outcome:
    out.skipped, out.error = reason, error
    return out


def generate(
    prompts: Sequence[Prompt], judge: Judge, principles: Sequence[Principle], settings: Settings
) -> Iterator[Outcome]:
    """Outcomes as they finish; endpoint calls run on a bounded thread pool, a local model on one thread."""

    def one(prompt: Prompt) -> Outcome:
        seed = prompt_seed(settings.seed, prompt.key)
        chosen = choose_principles(principles, settings.revisions, settings.seed, prompt.key)
        return critique_and_revise(judge, prompt, chosen, settings.params(seed))

    workers = 1 if isinstance(judge, LocalJudge) else max(1, min(settings.concurrency, len(prompts)))
    if workers == 1:
        yield from map(one, prompts)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="constitutional")
    try:
        futures = [pool.submit(one, p) for p in prompts]
        for future in as_completed(futures):
            yield future.result()
    finally:  # on an abort or Ctrl-C, drop the queued prompts instead of waiting for all of them
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Summary:
    """What a run did, for the CLI's report and for callers that check it."""

    out: Path
    prompts: int
    written: int = 0  # pairs made by this run (including ones recovered from an interrupted run)
    resumed: int = 0  # prompts skipped because the output already held their pair
    skipped: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)  # the first few problems, "FILE:LINE: what happened"

    def render(self) -> str:
        total = self.written + self.resumed
        head = f"wrote {self.written} pair(s) to {self.out}" if total else f"no pairs made; {self.out} not written"
        if self.resumed:
            head += f" ({self.resumed} prompt(s) already done there, {total} pair(s) in all)"
        lines = [f"{head} in {self.seconds:.1f} s"]
        if self.skipped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
            lines.append(f"skipped {sum(self.skipped.values())} of {self.prompts} prompt(s): {reasons}")
        return "\n".join(lines)


def run_constitutional(
    prompts: str | Path | Sequence[Prompt],
    out: str | Path,
    judge: Judge,
    principles: Sequence[Principle] | None = None,
    settings: Settings = Settings(),
    *,
    critiques: str | Path | None = None,
    overwrite: bool = False,
    source: str | None = None,
) -> Summary:
    """Make one (revised, original) DPO pair per prompt and write them to ``out``, atomically.

    Prompts whose input already has a pair in ``out`` (or in an interrupted run's ``out.partial``) are
    not redone unless ``overwrite``. ``critiques``, when given, receives every exchange of this run,
    skipped ones included, as JSON lines.
    """
    started = time.monotonic()
    principles = list(principles) if principles is not None else load_principles()
    settings.check(len(principles))
    if isinstance(prompts, (str, Path)):
        source = source or str(prompts)
        prompts = read_prompts(prompts)
    source = source or "prompts"
    out = Path(out)
    if out.suffix.lower() not in (".jsonl", ".ndjson"):
        raise TuneforgeError(f"--out {out}: pairs are written as JSON lines; give the file a .jsonl name")
    partial = out.with_name(out.name + ".partial")
    if overwrite:
        partial.unlink(missing_ok=True)
    existing = [] if overwrite else _read_existing(out)
    recovered = [] if overwrite else _read_partial(partial)
    earlier = {input_key(r["input"]) for r in existing}
    done = earlier | {input_key(r["input"]) for _, r in recovered}
    todo = [p for p in prompts if p.key not in done]
    summary = Summary(out, len(prompts), written=len(recovered), resumed=sum(p.key in earlier for p in prompts))

    made: list[tuple[int, dict[str, Any]]] = list(recovered)
    exchanges: list[tuple[int, dict[str, Any]]] = []
    progress = _PartialLog(partial)
    try:
        with closing(generate(todo, judge, principles, settings)) as outcomes:
            for outcome in outcomes:
                exchanges.append((outcome.prompt.line, outcome.inspection()))
                pair = outcome.pair
                if pair is not None:
                    made.append((outcome.prompt.line, pair))
                    summary.written += 1
                    progress.add(outcome.prompt.line, pair)
                    continue
                reason = outcome.skipped or "invalid_pair"
                summary.skipped[reason] += 1
                message = f"{source}:{outcome.prompt.line}: skipped ({reason}): {outcome.error}"
                log.warning(message)
                if len(summary.errors) < 20:
                    summary.errors.append(message)
                if not made and summary.skipped["call_failed"] >= ABORT_AFTER_FAILURES:
                    raise TuneforgeError(
                        f"the model failed on {ABORT_AFTER_FAILURES} prompts before any succeeded, so "
                        f"the run stopped (nothing written); last problem: {outcome.error}"
                    )
    finally:
        progress.close()

    if made:
        records = existing + [r for _, r in sorted(made, key=lambda lr: lr[0])]
        _write_atomic(out, (json.dumps(r, ensure_ascii=False) for r in records))
    partial.unlink(missing_ok=True)
    if critiques is not None:
        ordered = sorted(exchanges, key=lambda le: le[0])
        _write_atomic(Path(critiques), (json.dumps(e, ensure_ascii=False) for _, e in ordered))
    summary.seconds = time.monotonic() - started
    return summary


class _PartialLog:
    """Finished pairs, one JSON line each, appended as they arrive; opened only once there is one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None

    def add(self, line: int, record: dict[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps({"line": line, "record": record}, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


# -------------------------------------------------------------------------------------------------- files


def _read_existing(out: Path) -> list[dict[str, Any]]:
    """The pairs an earlier run wrote; anything else in the file is the user's and must not be clobbered."""
    if not out.exists():
        return []
    records = []
    for rec in read_records(out):
        problems = [("", rec.error, "")] if rec.error else check_record(rec.value, "preference")
        if not problems and "input" not in rec.value:
            problems = [("", "a prompt/chosen/rejected pair", "the OpenAI DPO records this command writes")]
        if problems:
            field_, problem, _ = problems[0]
            where = f"{field_}: " if field_ else ""
            raise TuneforgeError(
                f"{out}:{rec.line}: {where}{problem} — the output file holds something other than "
                "pairs from this command; choose another --out, or pass --overwrite to replace it"
            )
        records.append(rec.value)
    return records


def _read_partial(partial: Path) -> list[tuple[int, dict[str, Any]]]:
    """Pairs an interrupted run finished; a torn last line (the crash itself) is ignored."""
    if not partial.exists():
        return []
    out = []
    for raw in partial.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(raw)
            line, record = int(entry["line"]), entry["record"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(record, dict) and not check_record(record, "preference") and "input" in record:
            out.append((line, record))
    return out


def _write_atomic(path: Path, lines: Iterator[str]) -> None:
    """Write a JSONL file next to its destination, then rename: readers never see half of it."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")


def _did_you_mean(got: str, valid: list[str]) -> str:
    return suggest(got, valid)


def _kind(value: Any) -> str:
    """JSON's name for a value's type, since users think in their file's terms."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"
