"""Request bodies in OpenAI's shapes (``openai.types.fine_tuning.job_create_params``), plus ``tuneforge``.

Validation errors name the field path (``method.dpo.hyperparameters.beta``) through the app's error handler.
Unknown fields are refused rather than ignored, so a typo never silently trains with a default.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Auto = Literal["auto"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SupervisedHyperparameters(_Body):
    n_epochs: Auto | int = Field("auto", description="Passes over the training file.")
    batch_size: Auto | int = "auto"
    learning_rate_multiplier: Auto | float = "auto"

    @field_validator("*")
    @classmethod
    def _positive(cls, v: Any) -> Any:
        """Every numeric hyperparameter (here and in the subclasses) is ``auto`` or positive."""
        if isinstance(v, (int, float)) and v <= 0:
            raise ValueError("must be 'auto' or greater than 0")
        return v


class DpoHyperparameters(SupervisedHyperparameters):
    beta: Auto | float = "auto"


class ReinforcementHyperparameters(SupervisedHyperparameters):
    compute_multiplier: Auto | float = "auto"
    eval_interval: Auto | int = "auto"
    eval_samples: Auto | int = "auto"
    reasoning_effort: Literal["default", "low", "medium", "high"] = "default"


class SupervisedMethod(_Body):
    hyperparameters: SupervisedHyperparameters | None = None


class DpoMethod(_Body):
    hyperparameters: DpoHyperparameters | None = None


class ReinforcementMethod(_Body):
    grader: dict[str, Any]
    hyperparameters: ReinforcementHyperparameters | None = None
    response_format: dict[str, Any] | None = None


class Method(_Body):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: ReinforcementMethod | None = None


class MixtureSource(_Body):
    file: str = Field(description="id of an uploaded file of general data")
    weight: float = Field(gt=0)


class Adapter(_Body):
    kind: str = "auto"
    r: int | None = Field(None, gt=0)
    alpha: float | None = Field(None, gt=0)


class Extension(_Body):
    """What OpenAI has no field for: any registry method, the adapter, a data mixture, replicas, priority."""

    method: str | None = Field(None, description="a tuneforge method (`tuneforge methods`); overrides method.type")
    section: dict[str, Any] | None = Field(None, description="that method's recipe section (kto:, distill:, …)")
    adapter: Adapter | None = None
    mixture: list[MixtureSource] = Field(default_factory=list)
    training_weight: float = Field(1.0, gt=0, description="the training file's weight in the mixture")
    replicas: str | None = Field(None, description="elastic replicas MIN:MAX")
    priority: int = 0
    overrides: dict[str, Any] = Field(default_factory=dict, description="recipe `--set` overrides (train.*, …)")


class JobCreate(_Body):
    model: str = Field(min_length=1, max_length=512)
    training_file: str
    validation_file: str | None = None
    hyperparameters: SupervisedHyperparameters | None = None  # deprecated by OpenAI in favour of method
    method: Method | None = None
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = None
    tuneforge: Extension | None = None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v is not None and (":" in v or "/" in v):
            raise ValueError("may not contain ':' or '/' (it becomes part of the model name ft:BASE:PROJECT:SUFFIX:ID)")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > 16:
            raise ValueError("at most 16 key-value pairs")
        for key, value in v.items():
            if len(key) > 64:
                raise ValueError(f"key {key[:20]!r}…: keys are at most 64 characters")
            if len(value) > 512:
                raise ValueError(f"value of {key!r}: values are at most 512 characters")
        return v

    @field_validator("integrations")
    @classmethod
    def _integrations(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if v:
            raise ValueError("integrations (wandb) are not supported; jobs log to MLflow (tracking.uri)")
        return v


class GraderRun(_Body):
    grader: dict[str, Any]
    model_sample: str
    item: Any = None


class GraderValidate(_Body):
    grader: dict[str, Any]
