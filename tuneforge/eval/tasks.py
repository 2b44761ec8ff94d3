"""Evaluation tasks: a YAML file over local JSONL records, every mistake reported as ``FILE:LINE: field: problem``.

.. code-block:: yaml

    name: capitals                 # default: the file's stem
    type: multiple_choice          # multiple_choice | generation | perplexity
    data: capitals.jsonl           # one record per line, relative to this file
    prompt: "What is the capital of {{item.country}}?"   # default: the record's messages, or its prompt

Three types:

* ``multiple_choice`` — ``log p(choice | prompt)`` of each of the record's ``choices``; ``acc`` picks the most
  likely, ``acc_norm`` the most likely per character (lm-evaluation-harness's definitions). ``answer`` is the
  gold choice's index or text.
* ``generation`` — a greedy answer, scored by ``metrics``: ``exact_match``, ``regex``, ``macro_f1``, ``rouge_1``
  / ``rouge_2`` / ``rouge_l``, ``bleu``, or ``grader`` — any grader config of :mod:`tuneforge.rewards.graders`, so
  the grader a reinforcement job trains on is also its evaluation. The reference is the record's ``answer``, or
  the last assistant message of a chat record (a held-out SFT file is an evaluation set as it is).
* ``perplexity`` — held-out ``text``, every token scored (lm-evaluation-harness's rolling windows).

Prompts are rendered with the model's own chat template — the training one — unless ``chat: false``.
``fields`` renames the record keys (``fields: {choices: options, answer: label}``); templates use the graders'
``{{item.key}}`` syntax. A *suite* file lists tasks instead (``suite: general`` + ``tasks: [...]``); the bundled
ones are addressed by name (``--tasks general``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from tuneforge.errors import DataError, DataIssue, suggest
from tuneforge.eval.validation import TaskError, read_yaml, validate
from tuneforge.rewards import templates

TASK_TYPES = ("multiple_choice", "generation", "perplexity")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Fields(_Strict):
    """Which record keys hold what (rename them to read a data set as it is)."""

    messages: str = "messages"
    prompt: str = "prompt"
    choices: str = "choices"
    answer: str = "answer"
    text: str = "text"
    id: str = "id"


def _checked_template(v: str | None) -> str | None:
    if v is not None:
        try:
            templates.check_template(v)
        except templates.TemplateError as e:
            raise ValueError(str(e)) from None
    return v


class _Task(_Strict):
    name: str | None = Field(None, description="Name in reports; default: the file's stem.")
    description: str = ""
    data: str = Field(description="JSONL file, relative to the task file.")
    limit: int | None = Field(None, gt=0, description="Use only the first N records.")
    group_by: str | None = Field(None, description="Record key: metrics are also reported per value (e.g. skill).")
    fields: Fields = Fields()


class _Prompted(_Task):
    chat: bool = Field(True, description="Render the prompt with the model's chat template (the training one).")
    system: str | None = Field(None, description="System prompt for records that have no messages of their own.")
    prompt: str | None = Field(None, description="Prompt template, e.g. '{{item.question}}'.")

    @field_validator("prompt", "system")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        return _checked_template(v)


class MultipleChoiceTask(_Prompted):
    type: Literal["multiple_choice"]
    target_delimiter: str | None = Field(
        None, description="Written between prompt and choice; default '' after a chat prompt, ' ' after plain text."
    )
    metrics: list[Literal["acc", "acc_norm"]] = Field(default_factory=lambda: ["acc", "acc_norm"], min_length=1)

    def delimiter(self) -> str:
        if self.target_delimiter is not None:
            return self.target_delimiter
        return "" if self.chat else " "


class ExactMatch(_Strict):
    type: Literal["exact_match"]
    name: str | None = None
    lowercase: bool = False


class Regex(_Strict):
    type: Literal["regex"]
    name: str | None = None
    pattern: str = Field(description="re.search pattern; with a group, group 1 is compared to the reference.")
    lowercase: bool = False

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
        return v


class MacroF1(_Strict):
    type: Literal["macro_f1"]
    name: str | None = None
    labels: list[str] | str | None = Field(None, description="The label set, or a file with one label per line.")


class Rouge(_Strict):
    type: Literal["rouge_1", "rouge_2", "rouge_l"]
    name: str | None = None


class Bleu(_Strict):
    type: Literal["bleu"]
    name: str | None = None


class GraderMetric(_Strict):
    type: Literal["grader"]
    name: str | None = None
    grader: dict[str, Any] | str = Field(description="A grader config (OpenAI's shape) or a .json/.yaml file.")


def _shorthand(v: Any) -> Any:
    return {"type": v} if isinstance(v, str) else v


Metric = Annotated[
    ExactMatch | Regex | MacroF1 | Rouge | Bleu | GraderMetric, Field(discriminator="type"), BeforeValidator(_shorthand)
]
METRIC_TYPES = ("exact_match", "regex", "macro_f1", "rouge_1", "rouge_2", "rouge_l", "bleu", "grader")
# What a union's tag is called in messages: under ``metrics`` a metric, elsewhere a task type.
KINDS = {"metrics": ("metric", METRIC_TYPES), "": ("task type", TASK_TYPES)}


class GenerationTask(_Prompted):
    type: Literal["generation"]
    reference: str | None = Field(None, description="Reference template; default: the answer, or last assistant turn.")
    max_new_tokens: int = Field(32, gt=0)
    metrics: list[Metric] = Field(default_factory=lambda: [ExactMatch(type="exact_match")], min_length=1)

    @field_validator("reference")
    @classmethod
    def _reference_template(cls, v: str | None) -> str | None:
        return _checked_template(v)


class PerplexityTask(_Task):
    type: Literal["perplexity"]
    text: str | None = Field(None, description="Text template; default: the record's text.")
    metrics: list[Literal["perplexity", "bits_per_byte"]] = Field(
        default_factory=lambda: ["perplexity", "bits_per_byte"], min_length=1
    )


TaskConfig = Annotated[MultipleChoiceTask | GenerationTask | PerplexityTask, Field(discriminator="type")]


class _Document(BaseModel):
    task: TaskConfig


class SuiteConfig(_Strict):
    suite: str
    description: str = ""
    tasks: list[str] = Field(min_length=1, description="Task files (relative to the suite file) or bundled names.")


# ------------------------------------------------------------------------------------------ loaded tasks


@dataclass
class Task:
    """A validated task and its records (``lines``: each record's line in the data file, for messages)."""

    config: MultipleChoiceTask | GenerationTask | PerplexityTask
    name: str
    items: list[dict[str, Any]]
    lines: list[int]
    data_path: Path | None = None
    spec: str = ""  # how it was named (file or bundled name), recorded in reports
    base_dir: Path = field(default_factory=Path.cwd)  # where the task file is: relative paths in it start here
    fingerprint: str = field(default="", init=False)

    def __post_init__(self) -> None:
        config = self.config.model_dump(mode="json", exclude={"description"})  # what decides the scores
        blob = json.dumps({"config": config, "items": self.items}, sort_keys=True)
        self.fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def type(self) -> str:
        return self.config.type

    def item_id(self, i: int) -> str:
        value = self.items[i].get(self.config.fields.id)
        return str(value) if value is not None else str(i)

    def messages(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        """The conversation the model answers (without the reference answer), for chat prompts."""
        c, f = self.config, self.config.fields
        assert isinstance(c, (MultipleChoiceTask, GenerationTask))
        if c.prompt is not None or f.messages not in item:
            head = [{"role": "system", "content": templates.render(c.system, {}, item)}] if c.system else []
            return [*head, {"role": "user", "content": self.prompt_text(item)}]
        messages = list(item[f.messages])
        return messages[:-1] if messages and messages[-1].get("role") == "assistant" else messages

    def prompt_text(self, item: dict[str, Any]) -> str:
        c, f = self.config, self.config.fields
        assert isinstance(c, (MultipleChoiceTask, GenerationTask))
        if c.prompt is not None:
            return templates.render(c.prompt, {}, item)
        if f.prompt in item:
            return templates.to_text(item[f.prompt])
        raise KeyError(f"no {f.prompt!r} key and no prompt template")

    def reference(self, item: dict[str, Any]) -> str:
        c, f = self.config, self.config.fields
        assert isinstance(c, GenerationTask)
        if c.reference is not None:
            return templates.render(c.reference, {}, item)
        if f.answer in item:
            return templates.to_text(item[f.answer])
        messages = item.get(f.messages) or []
        if messages and messages[-1].get("role") == "assistant":
            return str(messages[-1].get("content", ""))
        raise KeyError(f"no {f.answer!r} key, no reference template and no final assistant message")

    def choices(self, item: dict[str, Any]) -> list[str]:
        return [str(c) for c in item[self.config.fields.choices]]

    def gold(self, item: dict[str, Any]) -> int:
        answer, choices = item[self.config.fields.answer], self.choices(item)
        return answer if isinstance(answer, int) else choices.index(str(answer))

    def text(self, item: dict[str, Any]) -> str:
        c = self.config
        assert isinstance(c, PerplexityTask)
        return templates.render(c.text, {}, item) if c.text is not None else str(item[c.fields.text])

    def group(self, item: dict[str, Any]) -> str | None:
        key = self.config.group_by
        return None if key is None else templates.to_text(item[key])


# ------------------------------------------------------------------------------------------ loading


def load_tasks(
    specs: Sequence[str | dict[str, Any]], *, base_dir: Path | None = None, limit: int | None = None
) -> list[Task]:
    """Tasks from files, bundled names or inline configs; a suite expands to its tasks. Names must be unique."""
    out: list[Task] = []
    for spec in specs:
        if isinstance(spec, dict):
            out.append(task_from_config(spec, base_dir=base_dir or Path.cwd(), limit=limit))
            continue
        path = Path(spec).expanduser()
        if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
            path = base_dir / path
        if not path.exists():
            path = _bundled(spec)
        raw, origin = read_yaml(path)
        if isinstance(raw, dict) and "suite" in raw:
            suite = validate(SuiteConfig, raw, origin, path, kinds=KINDS)
            for t in suite.tasks:
                out += load_tasks([t], base_dir=path.parent, limit=limit)
            continue
        out.append(task_from_config(raw, base_dir=path.parent, origin=origin, yaml_path=path, spec=spec, limit=limit))
    seen: set[str] = set()
    for t in out:
        if t.name in seen:
            raise TaskError(f"two tasks are named {t.name!r}; give one of them another `name:` in its task file")
        seen.add(t.name)
    return out


def _bundled(name: str) -> Path:
    from tuneforge.eval.bundled import bundled_names, bundled_path

    path = bundled_path(name)
    if path is not None:
        return path
    if "/" in name or name.endswith((".yaml", ".yml")):
        raise TaskError(f"task file not found: {name} (expected a task or suite YAML file, or a bundled name)")
    names = bundled_names()
    hint = suggest(name, names, cutoff=0.5) or f" (bundled: {', '.join(names)})"
    raise TaskError(f"unknown task {name!r}{hint}; give a task YAML file or a bundled name")


def task_from_config(
    raw: Any,
    *,
    base_dir: Path,
    origin: str = "<task>",
    yaml_path: Path | None = None,
    spec: str = "",
    limit: int | None = None,
) -> Task:
    """Validate one task config (a mapping, as in a task file) and read its records."""
    if not isinstance(raw, dict):
        raise TaskError(f"{origin}: a task file must be a mapping with a 'type' ({', '.join(TASK_TYPES)})")
    config = validate(_Document, {"task": raw}, origin, yaml_path, strip=1, kinds=KINDS).task
    data = Path(config.data).expanduser()
    data = data if data.is_absolute() else base_dir / data
    name = config.name or (yaml_path.stem if yaml_path else data.stem)
    limits = [x for x in (config.limit, limit) if x is not None]
    items, lines = _read_jsonl(data, min(limits) if limits else None)
    task = Task(config, name, items, lines, data, spec or (str(yaml_path) if yaml_path else ""), base_dir)
    _check_items(task)
    return task


def _read_jsonl(path: Path, limit: int | None) -> tuple[list[dict[str, Any]], list[int]]:
    if not path.is_file():
        raise TaskError(f"task data not found: {path} (expected a JSONL file, relative to the task file)")
    items, lines, issues = [], [], []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                issues.append(DataIssue(str(path), n, "", f"not valid JSON: {e.msg} at column {e.colno}"))
                continue
            if not isinstance(record, dict):
                issues.append(DataIssue(str(path), n, "", "expected a JSON object per line"))
                continue
            items.append(record)
            lines.append(n)
    if issues:
        raise DataError(issues, f"{path}: {len(issues)} bad record(s)")
    if not items:
        raise TaskError(f"{path}: no records (expected one JSON object per line)")
    return items, lines


def _check_items(task: Task) -> None:
    """Every record can be prompted and scored; all problems are reported together, by file and line."""
    issues: list[DataIssue] = []
    c, f = task.config, task.config.fields
    for item, line in zip(task.items, task.lines):

        def bad(key: str, problem: str, expected: str = "", line: int = line) -> None:
            issues.append(DataIssue(str(task.data_path), line, key, problem, expected))

        try:
            if isinstance(c, PerplexityTask):
                if not task.text(item).strip():
                    bad(f.text, "empty text", "text to score")
            else:
                if c.chat:
                    _check_messages(task.messages(item))
                else:
                    task.prompt_text(item)
                if isinstance(c, GenerationTask):
                    task.reference(item)
            if c.group_by is not None and c.group_by not in item:
                bad(c.group_by, "missing (group_by names it)")
        except (KeyError, ValueError) as e:
            bad("", str(e).strip("'\""), "a prompt: messages, a prompt field or a prompt template")
        except templates.TemplateError as e:
            bad("", str(e))
        if isinstance(c, MultipleChoiceTask):
            choices = item.get(f.choices)
            if (
                not isinstance(choices, list)
                or len(choices) < 2
                or not all(isinstance(x, (str, int, float)) for x in choices)
            ):
                bad(f.choices, "expected a list of at least two choices (strings)")
                continue
            answer = item.get(f.answer)
            if isinstance(answer, bool) or not (
                (isinstance(answer, int) and 0 <= answer < len(choices))
                or (isinstance(answer, str) and answer in map(str, choices))
            ):
                bad(
                    f.answer,
                    f"{json.dumps(answer)[:40]} is not a choice",
                    f"an index below {len(choices)} or one of the choices",
                )
    if issues:
        raise DataError(issues, f"task {task.name}: {len(issues)} bad record(s)")


def _check_messages(messages: list[dict[str, Any]]) -> None:
    if not messages:
        raise ValueError("no messages to prompt with")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError("messages must be objects with a role and content")
