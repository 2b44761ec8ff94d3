"""Reward graders in the JSON shapes of OpenAI's reinforcement fine-tuning graders.

``load_grader(config)`` validates a grader config (a dict, or a JSON/YAML file) and returns a
:class:`Grader`. Every grader scores ``(sample, item)`` pairs — ``sample`` is the completion
(``{"output_text": …}`` or just the text), ``item`` the dataset row — one at a time (``grade``) or in a
batch (``grade_batch``, what GRPO calls for a group of completions). Nothing a grader meets at run time
(a failing template, a crashing user function, a judge that is down) stops a run: that pair scores 0
and its :class:`GradeResult` carries the error, which is also logged. Config mistakes, on the other
hand, fail at load time with the field path: ``grader.json: graders.exact.operation: …``.

Types: ``string_check``, ``text_similarity``, ``python`` (sandboxed), ``score_model`` (a judge, see
:mod:`tuneforge.rewards.judge`) and ``multi`` (sub-graders combined by a safe arithmetic formula).
"""

from __future__ import annotations

import ast
import json
import logging
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from tuneforge.errors import RecipeError, suggest
from tuneforge.rewards import embeddings, similarity, templates
from tuneforge.rewards.base import Grader, GradeResult
from tuneforge.rewards.judge import build_score_model
from tuneforge.rewards.sandbox import Limits, run_graders

log = logging.getLogger(__name__)


GRADER_TYPES = ("string_check", "text_similarity", "python", "score_model", "multi")
OPENAI_ONLY_TYPES = {"label_model": "use score_model with a prompt that answers with a number", "endpoint": ""}


def _each(
    fn: Callable[[dict[str, Any], dict[str, Any]], float], samples: list[dict[str, Any]], items: list[dict[str, Any]]
) -> list[GradeResult]:
    """Apply a per-pair scorer; a template that does not fit this pair scores 0 with its error."""
    out = []
    for sample, item in zip(samples, items):
        try:
            out.append(GradeResult(float(fn(sample, item))))
        except templates.TemplateError as e:
            out.append(GradeResult(0.0, str(e)))
    return out


# --------------------------------------------------------------------------------------------- types


@dataclass
class StringCheckGrader(Grader):
    """1.0 when the rendered ``input`` relates to ``reference`` by ``operation``, else 0.0.

    ``eq``/``ne``: exact (in)equality; ``like``: ``reference`` is a substring of ``input``;
    ``ilike``: the same, ignoring case.
    """

    type: ClassVar[str] = "string_check"
    OPERATIONS: ClassVar[tuple[str, ...]] = ("eq", "ne", "like", "ilike")
    name: str
    input: str
    reference: str
    operation: str

    def check(self, sample: dict[str, Any], item: dict[str, Any]) -> bool:
        text = templates.render(self.input, sample, item)
        ref = templates.render(self.reference, sample, item)
        if self.operation == "eq":
            return text == ref
        if self.operation == "ne":
            return text != ref
        if self.operation == "like":
            return ref in text
        return ref.casefold() in text.casefold()

    def _evaluate_batch(self, samples: list[dict[str, Any]], items: list[dict[str, Any]]) -> list[GradeResult]:
        return _each(self.check, samples, items)


@dataclass
class TextSimilarityGrader(Grader):
    """The chosen metric between the rendered ``input`` and ``reference``, in [0, 1].

    ``cosine`` embeds the whole batch at once with ``embedder`` (each distinct text once); an embedder that
    fails (an endpoint that is down) scores the batch 0 with the error.
    """

    type: ClassVar[str] = "text_similarity"
    name: str
    input: str
    reference: str
    evaluation_metric: str
    pass_threshold: float | None = None
    embedder: embeddings.Embedder | None = field(default=None, repr=False)
    fn: Callable[[str, str], float] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.evaluation_metric != "cosine":
            self.fn = similarity.metric(self.evaluation_metric)
        elif self.embedder is None:
            self.embedder = embeddings.default_embedder()

    def texts(self, sample: dict[str, Any], item: dict[str, Any]) -> tuple[str, str]:
        return templates.render(self.input, sample, item), templates.render(self.reference, sample, item)

    def score(self, sample: dict[str, Any], item: dict[str, Any]) -> float:
        return self._evaluate_batch([sample], [item])[0].score

    def _evaluate_batch(self, samples: list[dict[str, Any]], items: list[dict[str, Any]]) -> list[GradeResult]:
        fn = self.fn
        if fn is not None:
            return _each(lambda sample, item: fn(*self.texts(sample, item)), samples, items)
        embedder = self.embedder or embeddings.default_embedder()
        results: list[GradeResult | None] = []
        pairs: list[tuple[str, str]] = []
        for sample, item in zip(samples, items):
            try:
                pairs.append(self.texts(sample, item))
                results.append(None)
            except templates.TemplateError as e:
                results.append(GradeResult(0.0, str(e)))
        try:
            scores = iter(embeddings.cosine_scores(embedder, [o for o, _ in pairs], [r for _, r in pairs]))
        except Exception as e:  # an endpoint that is down, a reply of the wrong shape: this batch scores 0
            error = f"embedding failed: {type(e).__name__}: {e}"
            return [r or GradeResult(0.0, error) for r in results]
        return [r or GradeResult(next(scores)) for r in results]


@dataclass
class PythonGrader(Grader):
    """``grade(sample, item) -> float`` from ``source``, run in the sandbox (one child per batch)."""

    type: ClassVar[str] = "python"
    name: str
    source: str
    limits: Limits = field(default_factory=Limits)
    image_tag: str | None = None  # OpenAI's runtime image; tuneforge runs the local interpreter
    pass_threshold: float | None = None

    def _evaluate_batch(self, samples: list[dict[str, Any]], items: list[dict[str, Any]]) -> list[GradeResult]:
        outcomes = run_graders(self.source, list(zip(samples, items)), self.limits)
        return [
            GradeResult(o.score if o.score is not None else 0.0, o.error, {"output": o.output} if o.output else {})
            for o in outcomes
        ]


_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
# name: (function, fewest arguments, most arguments)
_FUNCTIONS: dict[str, tuple[Callable[..., float], int, int]] = {
    "min": (min, 1, 64),
    "max": (max, 1, 64),
    "abs": (abs, 1, 1),
}


def parse_formula(text: str, names: Sequence[str], where: str) -> ast.expr:
    """Parse ``calculate_output`` and check it uses only numbers, grader names, + - * / ** and min/max/abs."""
    if not isinstance(text, str) or not text.strip():
        raise RecipeError(f'{where}: expected a formula such as "0.5 * a + 0.5 * b"')
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise RecipeError(f"{where}: not a valid formula at column {e.offset}: {text!r}") from None

    def check(node: ast.AST) -> None:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return
        if isinstance(node, ast.Name):
            if node.id not in names:
                hint = suggest(node.id, list(names), cutoff=0.5)
                raise RecipeError(f"{where}: unknown name {node.id!r}{hint} (graders: {', '.join(names)})")
            return
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            check(node.left)
            check(node.right)
            return
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            check(node.operand)
            return
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
            _, lo, hi = _FUNCTIONS[node.func.id]
            if node.keywords or not lo <= len(node.args) <= hi or any(isinstance(a, ast.Starred) for a in node.args):
                raise RecipeError(f"{where}: {node.func.id}() takes {lo}{'' if lo == hi else '+'} plain argument(s)")
            for arg in node.args:
                check(arg)
            return
        shown = ast.get_source_segment(text.strip(), node) or type(node).__name__
        raise RecipeError(f"{where}: {shown!r} is not allowed; use numbers, grader names, + - * / ** and min, max, abs")

    check(tree.body)
    return tree.body


def evaluate_formula(node: ast.expr, values: dict[str, float]) -> float:
    """Evaluate a checked formula in floats (so ``**`` overflows instead of building huge integers)."""
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(values[node.id])
    if isinstance(node, ast.BinOp):
        result = _BINARY[type(node.op)](evaluate_formula(node.left, values), evaluate_formula(node.right, values))
        if not isinstance(result, float):  # a negative number to a fractional power is complex
            raise ValueError(f"the formula's value {result!r} is not a real number")
        return result
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](evaluate_formula(node.operand, values))
    if isinstance(node, ast.Call):
        fn = _FUNCTIONS[node.func.id][0]  # type: ignore[union-attr]
        return float(fn(*(evaluate_formula(a, values) for a in node.args)))
    raise ValueError(f"unexpected formula node {type(node).__name__}")  # parse_formula rules this out


@dataclass
class MultiGrader(Grader):
    """Several graders combined by ``calculate_output`` (e.g. ``"0.7 * correct + 0.3 * style"``).

    A sub-grader that fails counts as 0 in the formula and its error is reported with the result.
    """

    type: ClassVar[str] = "multi"
    name: str
    graders: dict[str, Grader]
    calculate_output: str
    formula: ast.expr = field(repr=False, default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.formula is None:
            self.formula = parse_formula(self.calculate_output, list(self.graders), "calculate_output")

    def _evaluate_batch(self, samples: list[dict[str, Any]], items: list[dict[str, Any]]) -> list[GradeResult]:
        per_grader = {name: g.evaluate_batch(samples, items) for name, g in self.graders.items()}
        results = []
        for i in range(len(samples)):
            values = {name: per_grader[name][i].score for name in self.graders}
            errors = [f"{name}: {r[i].error}" for name, r in per_grader.items() if r[i].error is not None]
            details: dict[str, Any] = {"sub_scores": values}
            sub_details = {name: r[i].details for name, r in per_grader.items() if r[i].details}
            if sub_details:
                details["sub_details"] = sub_details
            try:
                score = evaluate_formula(self.formula, values)
                if not math.isfinite(score):
                    raise ValueError(f"the formula's value is {score}")
            except (ArithmeticError, ValueError) as e:
                errors.append(f"calculate_output: {type(e).__name__}: {e}")
                score = 0.0
            results.append(GradeResult(score, "; ".join(errors) or None, details))
        return results


# --------------------------------------------------------------------------------------------- loading

_COMMON = {"type": str, "name": str}
_FIELDS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # type: (required fields, optional fields)
    "string_check": ({"input": str, "reference": str, "operation": str}, {}),
    "text_similarity": (
        {"input": str, "reference": str, "evaluation_metric": str},
        {"pass_threshold": float, **embeddings.FIELDS},  # the embedding fields are for the cosine metric
    ),
    "python": ({"source": str}, {"image_tag": str, "pass_threshold": float, "limits": dict}),
    "score_model": (
        {"model": str, "input": list},
        {
            "range": list,
            "sampling_params": dict,
            "pass_threshold": float,
            "base_url": str,
            "api_key": str,
            "api_key_env": str,
            "timeout": float,
            "max_retries": int,
            "max_concurrency": int,
        },
    ),
    "multi": ({"graders": dict, "calculate_output": str}, {}),
}
_LIMIT_FIELDS = {f.name: f.type for f in fields(Limits)}


def _suggest(key: str, options: Sequence[str]) -> str:
    return suggest(key, list(options), cutoff=0.5, list_all=True)


def _type_ok(value: Any, kind: Any) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


_KIND_NAMES = {
    str: "a string",
    float: "a number",
    int: "an integer",
    list: "a list",
    dict: "a mapping",
    bool: "true or false",
}


class _Loader:
    """Builds graders from raw configs, naming ``origin: field.path`` in every error."""

    def __init__(self, origin: str, base_url: str | None, api_key: str | None) -> None:
        self.origin, self.base_url, self.api_key = origin, base_url, api_key

    def error(self, path: str, problem: str) -> RecipeError:
        return RecipeError(f"{self.origin}: {path or '<grader>'}: {problem}")

    def build(self, raw: Any, path: str, default_name: str) -> Grader:
        if not isinstance(raw, dict):
            raise self.error(path, f"expected a grader mapping with a 'type', got {type(raw).__name__}")

        def at(key: str) -> str:
            return f"{path}.{key}" if path else key

        kind = raw.get("type")
        if kind not in _FIELDS:
            if kind is None:
                raise self.error(at("type"), f"required field is missing (one of: {', '.join(GRADER_TYPES)})")
            if kind in OPENAI_ONLY_TYPES:
                hint = f"; {OPENAI_ONLY_TYPES[kind]}" if OPENAI_ONLY_TYPES[kind] else ""
                raise self.error(at("type"), f"OpenAI's {kind!r} grader is not supported by tuneforge{hint}")
            raise self.error(at("type"), f"unknown grader type {kind!r}{_suggest(str(kind), GRADER_TYPES)}")
        required, optional = _FIELDS[kind]
        allowed = {**_COMMON, **required, **optional}
        for key in raw:
            if key not in allowed:
                raise self.error(at(key), f"unknown field for a {kind} grader{_suggest(str(key), list(allowed))}")
        for key in required:
            if key not in raw:
                raise self.error(at(key), "required field is missing")
        for key, value in raw.items():
            if not _type_ok(value, allowed[key]):
                shown = json.dumps(value, default=str)[:80]
                raise self.error(at(key), f"expected {_KIND_NAMES[allowed[key]]}, got {shown}")
        name = raw.get("name") or default_name
        for key in ("input", "reference"):
            if isinstance(raw.get(key), str):
                self.template(raw[key], at(key))
        if kind == "string_check":
            op = raw["operation"]
            if op not in StringCheckGrader.OPERATIONS:
                hint = _suggest(op, StringCheckGrader.OPERATIONS)
                raise self.error(at("operation"), f"unknown operation {op!r}{hint}")
            return StringCheckGrader(name, raw["input"], raw["reference"], raw["operation"])
        if kind == "text_similarity":
            return self.text_similarity(raw, name, at)
        if kind == "python":
            source = self.source(raw["source"], at("source"))
            limits = self.limits(raw.get("limits", {}), at("limits"))
            return PythonGrader(name, source, limits, raw.get("image_tag"), raw.get("pass_threshold"))
        if kind == "score_model":
            for i, message in enumerate(raw["input"]):
                self.message(message, f"{at('input')}[{i}]")
            return build_score_model(raw, name, at, self.error, base_url=self.base_url, api_key=self.api_key)
        if not raw["graders"]:
            raise self.error(at("graders"), "expected at least one grader")
        subs = {}
        for key, sub in raw["graders"].items():
            if not str(key).isidentifier():
                raise self.error(
                    f"{at('graders')}.{key}",
                    "grader names must be identifiers (letters, digits, _) to appear in calculate_output",
                )
            subs[str(key)] = self.build(sub, f"{at('graders')}.{key}", str(key))
        formula = parse_formula(raw["calculate_output"], list(subs), f"{self.origin}: {at('calculate_output')}")
        return MultiGrader(name, subs, raw["calculate_output"], formula)

    def text_similarity(self, raw: dict[str, Any], name: str, at: Callable[[str], str]) -> TextSimilarityGrader:
        metric = raw["evaluation_metric"]
        embedder = None
        if metric == "cosine":
            embedder = embeddings.build_embedder(raw, at, self.error)
        else:
            similarity.metric(metric, f"{self.origin}: {at('evaluation_metric')}")
            for key in embeddings.FIELDS:
                if key in raw:
                    raise self.error(at(key), f"only used by evaluation_metric 'cosine', not {metric!r}")
        return TextSimilarityGrader(
            name, raw["input"], raw["reference"], metric, raw.get("pass_threshold"), embedder=embedder
        )

    def template(self, text: str, path: str) -> None:
        try:
            templates.check_template(text)
        except templates.TemplateError as e:
            raise self.error(path, str(e)) from None

    def message(self, message: Any, path: str) -> None:
        if not isinstance(message, dict) or "content" not in message:
            raise self.error(path, 'expected a chat message {"role": …, "content": …}')
        role = message.get("role", "user")
        if role not in ("system", "developer", "user", "assistant"):
            raise self.error(f"{path}.role", f"unknown role {role!r} (expected system, developer, user or assistant)")
        content = message["content"]
        parts = [content] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise self.error(f"{path}.content", "expected a string or a list of text parts")
        for j, part in enumerate(parts):
            if isinstance(content, str):
                text = part
            else:
                text = part.get("text") if isinstance(part, dict) else None
            if not isinstance(text, str):
                raise self.error(f"{path}.content[{j}]", 'expected a text part {"type": "input_text", "text": …}')
            self.template(text, f"{path}.content" if isinstance(content, str) else f"{path}.content[{j}].text")

    def source(self, source: str, path: str) -> str:
        """Compile (never run) the source in this process to report syntax errors at load time."""
        try:
            tree = ast.parse(source, filename="<grader>")
        except SyntaxError as e:
            raise self.error(path, f"line {e.lineno}: {e.msg}") from None
        if not any(isinstance(n, ast.FunctionDef) and n.name == "grade" for n in tree.body):
            raise self.error(path, "must define a top-level function grade(sample, item) -> float")
        return source

    def limits(self, raw: dict[str, Any], path: str) -> Limits:
        for key, value in raw.items():
            if key not in _LIMIT_FIELDS:
                raise self.error(f"{path}.{key}", f"unknown limit{_suggest(str(key), list(_LIMIT_FIELDS))}")
            want = bool if key == "site_packages" else (float if key in ("cpu_seconds", "wall_seconds") else int)
            if not _type_ok(value, want) or (want is not bool and value <= 0):
                expected = "true or false" if want is bool else "a positive number"
                raise self.error(f"{path}.{key}", f"expected {expected}, got {value!r}")
        return Limits(**raw)


def _read_config(path: Path) -> Any:
    if not path.is_file():
        raise RecipeError(f"grader config not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise RecipeError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecipeError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None


def load_grader(
    config: dict[str, Any] | str | Path,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    origin: str | None = None,
) -> Grader:
    """Validate a grader config (a dict, or a ``.json``/``.yaml`` file) and build the grader.

    ``base_url``/``api_key`` are the recipe's defaults for ``score_model`` judges; a judge's own
    ``base_url``/``api_key``/``api_key_env`` fields win. A config wrapped as ``{"grader": {…}}`` (the
    shape of a fine-tuning job's method section) is unwrapped.
    """
    if isinstance(config, (str, Path)):
        path = Path(config)
        raw = _read_config(path)
        origin = origin or str(path)
    else:
        raw = config
        origin = origin or "grader"
    if isinstance(raw, dict) and "type" not in raw and isinstance(raw.get("grader"), dict):
        raw = raw["grader"]
    default_name = str(raw.get("type", "grader")) if isinstance(raw, dict) else "grader"
    return _Loader(origin, base_url, api_key).build(raw, "", default_name)
