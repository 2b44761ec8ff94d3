"""The recipe schema: the single source of truth for every option tuneforge has.

A recipe is YAML validated by these pydantic models. Unknown keys are errors that name the field path and
suggest the nearest valid key; ``--set a.b=value`` overrides any field. ``"auto"`` values are resolved
against the hardware by :func:`tuneforge.planner.resolve` (never silently to a slow path).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneforge.data.formats import FORMATS
from tuneforge.errors import RecipeError, suggest
from tuneforge.methods import ADAPTER_KINDS, METHOD_NAMES, METHODS, PROMPT_LEARNING

Method = Literal[METHOD_NAMES]  # the registry's names: one source
AdapterKind = Literal[ADAPTER_KINDS]
RecordFormat = Literal[("auto", *FORMATS)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    path: str = Field(description="Hugging Face model directory, or a hub id when online.")
    tokenizer: str | None = Field(None, description="Tokenizer directory or hub id; defaults to `path`.")
    chat_template: str | None = Field(
        None, description="Built-in template name (`chatml`) or a Jinja string; default: the tokenizer's own."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False


class SourceConfig(_Section):
    path: str = Field(description="JSONL, JSON, Parquet, CSV file or a `datasets` directory.")
    name: str | None = Field(None, description="Name used in reports and metrics; defaults to the file stem.")
    weight: float = Field(1.0, gt=0, description="Relative share of the mixture (normalised over sources).")
    format: RecordFormat = "auto"


class SanitizeConfig(_Section):
    dedup: bool = True
    drop_empty: bool = True
    max_chars: int | None = Field(None, gt=0)


class DataConfig(_Section):
    sources: list[SourceConfig] = Field(min_length=1)
    validation: str | None = Field(None, description="Separate validation file; otherwise split off `val_fraction`.")
    val_fraction: float = Field(0.05, ge=0, lt=1)
    mix_by: Literal["tokens", "examples"] = Field(
        "tokens", description="Weights are shares of supervised tokens (default) or of examples."
    )
    max_length: int = Field(512, gt=8)
    packing: bool = Field(True, description="Pack short examples into full rows, no cross-document attention.")
    on_overlong: Literal["error", "truncate", "drop"] = Field(
        "error", description="Chat examples longer than max_length: refuse (default), cut, or skip. Text is chunked."
    )
    loss_on: Literal["assistant", "all"] = Field("assistant", description="Which tokens chat examples train on.")
    sanitize: SanitizeConfig = SanitizeConfig()
    cache: bool = Field(True, description="Memory-mapped token cache keyed by data, tokenizer, template, length.")
    verify: bool = Field(
        False, description="Re-hash data files on start instead of trusting an unchanged size and mtime (--verify)."
    )
    num_workers: int | None = Field(
        None, gt=0, description="Tokenizer processes for large sources; default: all cores."
    )


class AdapterConfig(_Section):
    kind: AdapterKind = "lora"
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = Field("all-linear", description="`all-linear` or module names.")
    modules_to_save: list[str] = Field(
        [],
        description="LoRA/DoRA: modules trained in full beside the adapter (PEFT's modules_to_save), e.g. "
        "[embed_tokens]; a tied LM head stays tied to the trained embedding.",
    )
    num_virtual_tokens: int = Field(20, gt=0, description="Prompt/P-/prefix tuning.")

    @model_validator(mode="after")
    def _modules_to_save_beside_lora(self) -> AdapterConfig:
        if self.modules_to_save and (self.kind == "full" or self.kind in PROMPT_LEARNING):
            raise ValueError(
                f"modules_to_save trains modules beside a lora, dora or qlora adapter, not with kind {self.kind!r}"
            )
        return self


class TrainConfig(_Section):
    epochs: float | Literal["auto"] = Field(
        1.0,
        description="Passes over the first data source (the mixture follows it); auto: from the dataset's size.",
    )
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    global_batch_size: int = Field(32, gt=0, description="Sequences per optimizer step over all replicas.")
    micro_batch_size: int | Literal["auto"] = "auto"
    lr: float | Literal["auto"] = Field(
        2e-4, description="Peak learning rate; auto: from model width, method, adapter."
    )
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool | Literal["auto"] = Field(False, description="auto: on only when needed to fit.")
    memory_limit: str | None = Field(
        None, description="Memory the run may use (e.g. 16GB); default: what the device has free. `tuneforge plan`."
    )
    eval_every: int | None = Field(None, gt=0, description="Validation loss every N steps (default: 10 times a run).")
    checkpoint_every: int | Literal["auto"] | None = Field(
        None,
        description="Save a resumable checkpoint every N steps; auto: Young's optimal interval from the forecast "
        "checkpoint write time, step time and train.mtbf_hours; null: none.",
    )
    mtbf_hours: float = Field(
        24.0, gt=0, description="Mean time between failures that stop a run (checkpoint_every: auto)."
    )
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(10, gt=0)
    seed: int = 0
    num_threads: int | None = Field(None, gt=0, description="CPU threads; default: all cores.")
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"

    @field_validator("lr", "epochs")
    @classmethod
    def _positive(cls, v: float | str) -> float | str:
        if v != "auto" and float(v) <= 0:
            raise ValueError("must be greater than 0 (or auto)")
        return v

    @field_validator("checkpoint_every")
    @classmethod
    def _positive_steps(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v <= 0:
            raise ValueError("must be greater than 0 (or auto, or null for no checkpoints)")
        return v


class DPOConfig(_Section):
    """Offline preference optimisation (``method: dpo``): DPO and its variants on (chosen, rejected) pairs."""

    loss_type: Literal["sigmoid", "ipo", "hinge", "simpo", "orpo"] = Field(
        "sigmoid", description="sigmoid (DPO), ipo, hinge (SLiC) use a reference model; simpo and orpo do not."
    )
    beta: float = Field(0.1, gt=0, description="Strength of the preference term (ORPO's lambda; SimPO uses ~2).")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Probability a label is flipped (conservative DPO); sigmoid and simpo only."
    )
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin.")
    precompute_ref: bool | None = Field(
        None,
        description="Compute reference log-probs once before training (cached with the token cache). "
        "Default: yes for full fine-tuning, no for adapters (the base with the adapter disabled is the reference).",
    )

    @model_validator(mode="after")
    def _smoothing_fits_loss(self) -> DPOConfig:
        if self.label_smoothing and self.loss_type not in ("sigmoid", "simpo"):
            raise ValueError(f"label_smoothing applies to the sigmoid and simpo losses, not {self.loss_type!r}")
        return self


class RewardConfig(_Section):
    """Reward-model training (``method: reward``): a scalar head trained with the Bradley–Terry loss."""

    center_coeff: float | None = Field(
        None, ge=0, description="Weight of the term that keeps rewards centred on zero (e.g. 0.01); off by default."
    )


class KTOConfig(_Section):
    """Kahneman–Tversky optimisation (``method: kto``) on unpaired examples labelled desirable or not."""

    beta: float = Field(0.1, gt=0, description="Strength of the implicit reward (as DPO's beta).")
    desirable_weight: float = Field(1.0, gt=0, description="Weight of desirable examples' losses (λ_D).")
    undesirable_weight: float = Field(
        1.0,
        gt=0,
        description="Weight of undesirable examples' losses (λ_U); the paper keeps "
        "λ_D·n_D / (λ_U·n_U) between 1 and 4/3.",
    )


class GenerationConfig(_Section):
    """Sampling for online methods (GRPO, PPO) and sequence-level distillation; held-out scoring is greedy."""

    max_new_tokens: int = Field(64, gt=0, description="Completion budget per sample.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (log-probs are of the sampled policy).")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, gt=0)
    stop: list[str] = Field(default_factory=list, description="Extra stop strings (besides the tokenizer's EOS).")
    batch_size: int = Field(64, gt=0, description="Sequences decoded together (bounds the KV-cache memory).")


class GRPOConfig(_Section):
    """RL from verifiable rewards (``method: grpo``): groups of sampled completions scored by graders."""

    graders: str | dict[str, Any] = Field(
        description="Grader config in OpenAI's reinforcement fine-tuning shape: a .json/.yaml file or an inline "
        "mapping (string_check, text_similarity, python, score_model, multi)."
    )
    group_size: int = Field(8, ge=2, description="Completions sampled per prompt (the group).")
    loss_type: Literal["grpo", "bnpo", "dapo", "dr_grpo"] = Field(
        "dapo",
        description="Token averaging: grpo (per sequence), dapo/bnpo (per token over the whole step), "
        "dr_grpo (constant divisor, no length bias).",
    )
    scale_rewards: Literal["std", "none"] = Field(
        "std", description="Divide advantages by the group's std (GRPO) or only centre them (Dr. GRPO)."
    )
    beta: float = Field(0.0, ge=0, description="KL penalty to the reference policy (k3 estimator); 0 = off.")
    clip_eps: float = Field(0.2, gt=0, lt=1)
    clip_eps_high: float | None = Field(None, gt=0, description="DAPO's clip-higher; default: clip_eps.")
    num_iterations: int = Field(
        1,
        gt=0,
        description="Optimizer steps on each batch of completions (> 1: the clipped "
        "ratio to the sampling policy bounds each update).",
    )
    judge_base_url: str | None = Field(None, description="Default OpenAI-compatible endpoint for score_model graders.")
    judge_api_key_env: str | None = Field(None, description="Environment variable holding the judge's API key.")
    eval_prompts: int = Field(64, gt=0, description="Held-out prompts scored (greedy) at each evaluation.")


class PPOConfig(_Section):
    """RLHF with PPO (``method: ppo``): a trained reward model, a value head, KL to the reference and GAE."""

    reward_model: str = Field(description="Directory of a reward model trained with method: reward.")
    kl_coef: float = Field(0.05, ge=0, description="Per-token KL penalty to the reference policy in the reward.")
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    clip_eps: float = Field(0.2, gt=0, lt=1)
    value_clip: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    epochs: int = Field(
        1,
        gt=0,
        description="Optimizer steps on each batch of rollouts (PPO epochs; the clipped "
        "ratio to the rollout policy bounds each update).",
    )
    whiten_rewards: bool = Field(
        False, description="Scale the per-token rewards to unit variance over the step before GAE."
    )
    missing_eos_penalty: float | None = Field(
        None, description="Subtracted from the score of completions that hit the length budget without EOS."
    )
    eval_prompts: int = Field(64, gt=0, description="Held-out prompts scored (greedy) at each evaluation.")


class DistillConfig(_Section):
    """Knowledge distillation (``method: distill``) from a teacher model into the student (``model``)."""

    teacher: str = Field(description="Teacher model directory (or hub id when online).")
    mode: Literal["auto", "logits", "sequence"] = Field(
        "auto",
        description="logits: match the teacher's token distributions (needs the same tokenizer); "
        "sequence: the teacher writes the answers and the student learns them with SFT. auto: logits when the "
        "vocabularies agree.",
    )
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = Field(0.5, gt=0, lt=1, description="JSD interpolation (kind: jsd).")
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Weight of the plain cross-entropy on the data's own "
        "answers; (1 - alpha) goes to the distillation term.",
    )


class TrackingConfig(_Section):
    enabled: bool = True
    uri: str | None = Field(None, description="MLflow tracking URI; default: SQLite under $TUNEFORGE_HOME.")
    experiment: str = "tuneforge"
    run_name: str | None = None
    register_as: str | None = Field(None, description="Register the result under this model name.")
    auto_register: bool = Field(
        True, description="Register every successful run as a model version (named `register_as`, default `name`)."
    )

    @field_validator("register_as")
    @classmethod
    def _model_name_mlflow_accepts(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or "/" in v or ":" in v):
            raise ValueError("must be a non-empty model name without '/' or ':' (MLflow refuses those)")
        return v


class OutputConfig(_Section):
    dir: str | None = Field(None, description="Run directory; default: $TUNEFORGE_HOME/runs/<name>-<time>.")
    merge: bool = Field(False, description="Also save merged full weights (adapters only).")


class EvalConfig(_Section):
    """Evaluate the base and the result on tasks at the end of the run (and the result every N steps)."""

    tasks: list[str] = Field(
        min_length=1, description="Task or suite YAML files (relative to the recipe) or bundled names (`general`)."
    )
    every: int | None = Field(
        None, gt=0, description="Also evaluate the model being trained every N steps (single-process runs)."
    )
    baseline: bool = Field(True, description="Also evaluate the base model, and report deltas with 95% intervals.")
    batch_size: int = Field(32, gt=0, description="Sequences per forward pass.")
    limit: int | None = Field(None, gt=0, description="Only the first N records of each task.")


class Recipe(_Section):
    name: str = "run"
    method: Method = "sft"
    model: ModelConfig
    data: DataConfig
    adapter: AdapterConfig = AdapterConfig()
    train: TrainConfig = TrainConfig()
    dpo: DPOConfig = DPOConfig()
    reward: RewardConfig = RewardConfig()
    kto: KTOConfig = KTOConfig()
    grpo: GRPOConfig | None = None
    ppo: PPOConfig | None = None
    distill: DistillConfig | None = None
    generation: GenerationConfig = GenerationConfig()
    tracking: TrackingConfig = TrackingConfig()
    output: OutputConfig = OutputConfig()
    eval: EvalConfig | None = None
    resilience: dict[str, Any] = Field(
        default_factory=dict,
        description="Elastic, fault-tolerant data parallelism (see tuneforge.distributed.ResilienceConfig): "
        "min_replicas, max_replicas, hot_spares, checkpoint_every, fault_plan, …",
    )

    @field_validator("resilience")
    @classmethod
    def _resilience_is_valid(cls, v: dict[str, Any]) -> dict[str, Any]:
        from tuneforge.distributed.config import ResilienceConfig

        try:
            ResilienceConfig.from_dict(v)
        except RecipeError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("name")
    @classmethod
    def _name_is_path_safe(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\\0") or v.startswith("."):
            raise ValueError("must be a non-empty name without slashes that does not start with '.'")
        return v

    @model_validator(mode="after")
    def _method_fits_recipe(self) -> Recipe:
        spec = METHODS[self.method]
        if spec.section and getattr(self, spec.section) is None:
            example = f"{spec.section}: {{{spec.section_example}}}"
            raise ValueError(f"{spec.section}: method {self.method} needs a '{spec.section}:' section (e.g. {example})")
        if spec.loss_on_all and self.data.loss_on != "all":
            self.data.loss_on = "all"
        if not spec.prompt_learning and self.adapter.kind in PROMPT_LEARNING:
            head = "a value head on the policy's hidden states" if spec.value_head else "a scalar head"
            raise ValueError(
                f"adapter.kind: method {self.method} trains {head}; use lora, dora or full, not {self.adapter.kind}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        """Stable hash of the resolved recipe (for MLflow tags and run identity)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- loading


def load_recipe(source: str | Path | dict[str, Any], overrides: list[str] | dict[str, Any] | None = None) -> Recipe:
    """Read a recipe (path or dict), apply ``key.path=value`` overrides and validate it.

    Relative data/model paths in a recipe file are resolved against the file's directory, so a recipe
    runs the same from any working directory.
    """
    origin = "<recipe>"
    base_dir: Path | None = None
    if isinstance(source, dict):
        raw = json.loads(json.dumps(source))  # deep copy, plain types
    else:
        path = Path(source)
        origin = str(path)
        if not path.is_file():
            raise RecipeError(f"recipe not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise RecipeError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(raw, dict):
            raise RecipeError(f"{path}: a recipe must be a mapping of sections (model, data, train, …)")
        base_dir = path.resolve().parent
    for key, value in _normalise_overrides(overrides).items():
        _set_path(raw, key, value, origin)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, origin)) from None
    if base_dir is not None:
        _resolve_relative_paths(recipe, base_dir)
    return recipe


def _normalise_overrides(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. train.lr=1e-4")
        key, text = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(text) if text.strip() else None
    return out


def _set_path(raw: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    """Set ``a.b.c`` (list items by index: ``data.sources.0.weight``), checking each key against the schema."""
    parts = dotted.split(".")
    node: Any = raw
    model: type[BaseModel] | None = Recipe
    for i, part in enumerate(parts):
        where = ".".join(parts[: i + 1])
        key: str | int
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"--set {dotted}: '{where}' must be an index below {len(node)}")
            key = int(part)
        else:
            if model is not None and part not in model.model_fields:
                raise RecipeError(f"--set {dotted}: unknown field '{where}'{_suggest(part, list(model.model_fields))}")
            key = part
        if i == len(parts) - 1:
            node[key] = value
            return
        if isinstance(node, list):
            node = node[key]  # the item model stays the same
        else:
            model = _field_model(model, part) if model is not None else None
            node = node.setdefault(key, {})


def _field_model(model: type[BaseModel], field: str) -> type[BaseModel] | None:
    """The pydantic model inside a field's annotation (``X``, ``X | None``, ``list[X]``), if any."""
    annotation = model.model_fields[field].annotation
    stack = [annotation]
    while stack:
        a = stack.pop()
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
        stack.extend(getattr(a, "__args__", ()))
    return None


def _resolve_relative_paths(recipe: Recipe, base_dir: Path) -> None:
    def fix(p: str | None) -> str | None:
        if p is None:
            return None
        if p.startswith("$TUNEFORGE_HOME"):  # recipes shipped with tuneforge point into the state directory
            from tuneforge.paths import state_dir

            p = str(state_dir()) + p[len("$TUNEFORGE_HOME") :]
        candidate = Path(p).expanduser()
        if candidate.is_absolute():
            return str(candidate)
        local = base_dir / candidate
        # Keep hub ids ("org/name") as they are when no such local path exists.
        return str(local) if local.exists() or p.startswith(".") else p

    recipe.model.path = fix(recipe.model.path) or recipe.model.path
    recipe.model.tokenizer = fix(recipe.model.tokenizer)
    for source in recipe.data.sources:
        source.path = fix(source.path) or source.path
    recipe.data.validation = fix(recipe.data.validation)
    if recipe.grpo is not None and isinstance(recipe.grpo.graders, str):
        recipe.grpo.graders = fix(recipe.grpo.graders) or recipe.grpo.graders
    if recipe.ppo is not None:
        recipe.ppo.reward_model = fix(recipe.ppo.reward_model) or recipe.ppo.reward_model
    if recipe.distill is not None:
        recipe.distill.teacher = fix(recipe.distill.teacher) or recipe.distill.teacher
    if recipe.eval is not None:  # bundled names stay names: fix() keeps what is not a local path
        recipe.eval.tasks = [fix(t) or t for t in recipe.eval.tasks]
    if recipe.output.dir is not None:
        recipe.output.dir = fix(recipe.output.dir) if not recipe.output.dir.startswith("/") else recipe.output.dir


# --------------------------------------------------------------------------------------------- errors


def _suggest(key: str, options: list[str]) -> str:
    return suggest(key, options, cutoff=0.5, list_all=True)


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        model = _field_model(model, part)
    return model


def format_validation_error(error: ValidationError, origin: str) -> str:
    """Turn pydantic's errors into one line per problem: ``origin: field.path: problem``."""
    lines = []
    for err in error.errors():
        loc = tuple(err["loc"])
        path = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
        if err["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            hint = _suggest(str(loc[-1]), list(parent.model_fields)) if parent else ""
            lines.append(f"{origin}: {path}: unknown field{hint}")
        elif err["type"] == "missing":
            lines.append(f"{origin}: {path}: required field is missing")
        elif err["type"] == "value_error":  # our own validators: the message already says what and where
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"{origin}: {msg}" if not path or msg.startswith(f"{path}.") else f"{origin}: {path}: {msg}")
        else:
            given = err.get("input")
            shown = json.dumps(given, default=str)[:80] if not isinstance(given, dict) else "a mapping"
            lines.append(f"{origin}: {path}: {err['msg']} (got {shown})")
    return "invalid recipe\n" + "\n".join(lines)


def recipe_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML, every default filled in, in schema order."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=False)
