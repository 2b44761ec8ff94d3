"""An OpenAI fine-tuning job request → a tuneforge recipe (a plain dict for :func:`tuneforge.config.load_recipe`).

OpenAI's three method types map onto registry methods (``supervised`` → ``sft``, ``dpo`` → ``dpo``,
``reinforcement`` → ``grpo`` with the job's grader); the ``tuneforge`` extension names any other registry method.
Each OpenAI hyperparameter lands on one recipe key, declared in :data:`OPENAI_METHODS`; ``"auto"`` values are
resolved by :func:`resolve_auto` from the data size, the model size and the hardware, and the job shows the
values chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.errors import RecipeError, suggest
from tuneforge.methods import METHODS, MethodSpec
from tuneforge.service.errors import APIError
from tuneforge.service.schemas import JobCreate


@dataclass(frozen=True)
class OpenAIMethod:
    """One of OpenAI's method types: the registry method it runs and where its hyperparameters go."""

    registry_name: str
    keys: dict[str, str] = field(default_factory=dict)  # hyperparameter → recipe key (beyond the common three)


OPENAI_METHODS = {
    "supervised": OpenAIMethod("sft"),
    "dpo": OpenAIMethod("dpo", {"beta": "dpo.beta"}),
    "reinforcement": OpenAIMethod("grpo", {"eval_interval": "train.eval_every", "eval_samples": "grpo.eval_prompts"}),
}
assert {m.registry_name for m in OPENAI_METHODS.values()} <= set(METHODS)

# Extension overrides may tune training, never point the job at paths of the server (model, data, output).
OVERRIDABLE = ("train.", "adapter.", "dpo.", "kto.", "reward.", "generation.", "grpo.", "ppo.", "distill.")
NOT_OVERRIDABLE = ("grpo.graders", "ppo.reward_model", "distill.teacher", "train.device")
GROUP_SIZE = 8  # completions per prompt at compute_multiplier 1


@dataclass
class JobPlan:
    """What a request asks for, checked: the method, its hyperparameters (still with ``auto``), scheduling."""

    spec: MethodSpec
    openai_type: str
    hyperparameters: dict[str, Any]
    grader: dict[str, Any] | None
    priority: int
    replicas: tuple[int, int]
    elastic: bool


def plan_request(body: JobCreate) -> JobPlan:
    """Check a create request beyond its shape; every error is a 400 naming the field."""
    ext = body.tuneforge
    openai_type = body.method.type if body.method else "supervised"
    section = getattr(body.method, openai_type, None) if body.method else None
    hyper_model = getattr(section, "hyperparameters", None) or body.hyperparameters
    hyper = hyper_model.model_dump() if hyper_model is not None else {}
    if hyper.get("reasoning_effort", "default") != "default":
        raise APIError(
            400,
            "method.reinforcement.hyperparameters.reasoning_effort: open models here have no reasoning-effort "
            "control; use 'default' (or set generation.max_new_tokens through tuneforge.overrides)",
            param="method.reinforcement.hyperparameters.reasoning_effort",
        )
    grader = None
    if openai_type == "reinforcement":
        if section is None:
            raise APIError(400, "method.reinforcement: a reinforcement job needs a grader", "method.reinforcement")
        grader = section.grader
        check_grader(grader, "method.reinforcement.grader")
    name = OPENAI_METHODS[openai_type].registry_name
    if ext and ext.method:
        name = ext.method
        if METHODS.get(name) is None:
            raise APIError(
                400,
                f"tuneforge.method: unknown method {name!r}{suggest(name, list(METHODS), list_all=True)}",
                "tuneforge.method",
            )
    spec = METHODS[name]
    lo, hi = 1, 1
    if ext and ext.replicas:
        from tuneforge.distributed import parse_replicas

        try:
            lo, hi = parse_replicas(ext.replicas)
        except Exception as e:
            raise APIError(400, f"tuneforge.replicas: {e}", "tuneforge.replicas") from None
        if hi > 1 and not spec.elastic:
            raise APIError(400, f"tuneforge.replicas: method {spec.name} trains in one process", "tuneforge.replicas")
    for key in ext.overrides if ext else ():
        if not key.startswith(OVERRIDABLE) or key.startswith(NOT_OVERRIDABLE):
            raise APIError(
                400,
                f"tuneforge.overrides: {key!r} cannot be set through the API (allowed: {', '.join(OVERRIDABLE)}*)",
                "tuneforge.overrides",
            )
    return JobPlan(spec, openai_type, hyper, grader, ext.priority if ext else 0, (lo, hi), hi > 1)


def check_grader(grader: dict[str, Any], param: str) -> None:
    from tuneforge.rewards.graders import load_grader

    try:
        load_grader(grader, origin=param)
    except RecipeError as e:
        raise APIError(400, str(e), param) from None


def model_parameters(model_path: str) -> int | None:
    """Parameters of a local safetensors model, from the file headers (no weights read); None if unknown."""
    path = Path(model_path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                total += math.prod(st.get_slice(key).get_shape())
    return total


def resolve_auto(
    hyper: dict[str, Any], *, n_examples: int, parameters: int | None, gpu: bool, adapter: str
) -> dict[str, Any]:
    """Concrete values for every ``auto`` hyperparameter (pure: same inputs, same plan).

    * ``batch_size``: about 1/32 of the examples as a power of two, 1 … 16 on CPU (64 on a GPU) — small data
      gets more, smaller steps.
    * ``n_epochs``: enough passes to see ~1000 examples, 1 … 5 (small sets need several, big ones one).
    * ``learning_rate_multiplier``: 1 × the base rate for the adapter — 2e-4 for LoRA/DoRA, 2e-5 for full
      fine-tuning of a model over 100 M parameters, 1e-3 for a tiny one.
    """
    out = dict(hyper)
    cap = 64 if gpu else 16
    if out.get("batch_size", "auto") == "auto":
        out["batch_size"] = int(min(cap, max(1, 2 ** round(math.log2(max(1.0, n_examples / 32))))))
    if out.get("n_epochs", "auto") == "auto":
        out["n_epochs"] = int(min(5, max(1, math.ceil(1000 / max(1, n_examples)))))
    if out.get("learning_rate_multiplier", "auto") == "auto":
        out["learning_rate_multiplier"] = 1.0
    if out.get("beta") == "auto":
        out["beta"] = 0.1
    for key in ("compute_multiplier",):
        if out.get(key) == "auto":
            out[key] = 1.0
    for key in ("eval_interval", "eval_samples"):
        if out.get(key) == "auto":
            out.pop(key)  # the recipe's own default
    out.pop("reasoning_effort", None)
    out["adapter"] = adapter
    return out


def base_lr(adapter: str, parameters: int | None) -> float:
    if adapter != "full":
        return 2e-4
    return 1e-3 if parameters is not None and parameters < 100_000_000 else 2e-5


def pick_adapter(requested: str | None, parameters: int | None) -> str:
    """``auto``: full fine-tuning for a model under 100 M parameters (an adapter saves nothing there), else LoRA."""
    if requested and requested != "auto":
        return requested
    return "full" if parameters is not None and parameters < 100_000_000 else "lora"


def build_recipe(
    body: JobCreate,
    plan: JobPlan,
    *,
    job_id: str,
    model_path: str,
    files: dict[str, str],
    n_examples: int,
    run_dir: Path,
    seed: int,
    tracking: dict[str, Any],
    gpu: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The recipe for a job and the hyperparameters it shows; ``files`` maps file ids to their stored paths."""
    ext = body.tuneforge
    parameters = model_parameters(model_path)
    adapter = pick_adapter(ext.adapter.kind if ext and ext.adapter else None, parameters)
    hyper = resolve_auto(plan.hyperparameters, n_examples=n_examples, parameters=parameters, gpu=gpu, adapter=adapter)
    sources = [{"path": files[body.training_file], "name": "train", "weight": ext.training_weight if ext else 1.0}]
    for i, mix in enumerate(ext.mixture if ext else []):
        sources.append({"path": files[mix.file], "name": f"mix{i}", "weight": mix.weight})
    batch = int(hyper["batch_size"])
    n_train = n_examples if body.validation_file else max(1, int(n_examples * 0.95))
    steps_per_epoch = max(1, n_train // batch)
    total = max(1, int(steps_per_epoch * float(hyper["n_epochs"])))
    recipe: dict[str, Any] = {
        "name": job_id,
        "method": plan.spec.name,
        "model": {"path": model_path},
        "data": {
            "sources": sources,
            "validation": files[body.validation_file] if body.validation_file else None,
            "val_fraction": 0.0 if body.validation_file else 0.05,
            "on_overlong": "truncate",
            "packing": False,  # batch_size counts examples, as OpenAI's does
        },
        "adapter": {"kind": adapter},
        "train": {
            "epochs": float(hyper["n_epochs"]),
            "global_batch_size": batch,
            "lr": base_lr(adapter, parameters) * float(hyper["learning_rate_multiplier"]),
            "seed": seed,
            # a checkpoint per epoch, and at least four a run, so pause / restart lose little
            "checkpoint_every": max(1, min(steps_per_epoch, total // 4)),
            # every step's row reaches metrics.jsonl before the next checkpoint, so a stopped and resumed job's
            # events have no gap (the loop writes its rows every log_every steps)
            "log_every": 1,
            "keep_checkpoints": 3,
        },
        "tracking": tracking,
        "output": {"dir": str(run_dir)},
    }
    if ext and ext.adapter:
        recipe["adapter"].update({k: v for k, v in (("r", ext.adapter.r), ("alpha", ext.adapter.alpha)) if v})
    for key, recipe_key in OPENAI_METHODS[plan.openai_type].keys.items():
        if key in hyper:
            _put(recipe, recipe_key, hyper[key])
    if plan.grader is not None:
        group = max(2, round(GROUP_SIZE * float(hyper.get("compute_multiplier", 1.0))))
        recipe.setdefault("grpo", {}).update(graders=plan.grader, group_size=group)
    if plan.spec.section and ext and ext.section:
        recipe.setdefault(plan.spec.section, {}).update(ext.section)
    if plan.elastic:
        recipe["train"]["num_threads"] = 1  # one slot, one core per replica
        recipe["resilience"] = {"min_replicas": plan.replicas[0], "max_replicas": plan.replicas[1]}
    for key, value in (ext.overrides if ext else {}).items():
        _put(recipe, key, value)
    return recipe, hyper


def _put(recipe: dict[str, Any], dotted: str, value: Any) -> None:
    *head, last = dotted.split(".")
    node = recipe
    for part in head:
        node = node.setdefault(part, {})
    node[last] = value


def check_recipe(recipe: dict[str, Any]) -> None:
    """The recipe schema's verdict, as a 400 on the extension (the only way a request reaches recipe fields)."""
    from tuneforge.config import load_recipe

    try:
        load_recipe(recipe)
    except RecipeError as e:
        raise APIError(400, f"tuneforge: {e}", "tuneforge") from None
