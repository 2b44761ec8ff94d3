"""``/v1/fine_tuning/alpha/graders/run`` and ``/validate`` on tuneforge's grader engine (python graders run in its
sandbox, never in the server)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from tuneforge.service.auth import Caller
from tuneforge.service.deps import caller
from tuneforge.service.errors import APIError
from tuneforge.service.mapping import check_grader
from tuneforge.service.schemas import GraderRun, GraderValidate

router = APIRouter(prefix="/v1/fine_tuning/alpha/graders")


@router.post("/validate")
def validate(body: GraderValidate, who: Annotated[Caller, Depends(caller)]) -> dict[str, Any]:
    check_grader(body.grader, "grader")
    return {"grader": body.grader}


@router.post("/run")
def run(body: GraderRun, who: Annotated[Caller, Depends(caller)]) -> dict[str, Any]:
    import json

    from tuneforge.rewards.graders import load_grader

    check_grader(body.grader, "grader")
    grader = load_grader(body.grader, origin="grader")
    if body.item is not None and not isinstance(body.item, dict):
        raise APIError(400, f"item: expected a JSON object, got {type(body.item).__name__}", "item")
    sample: dict[str, Any] = {"output_text": body.model_sample}
    try:
        sample["output_json"] = json.loads(body.model_sample)
    except ValueError:
        pass
    t0 = time.perf_counter()
    result = grader.evaluate(sample, body.item or {})
    error = result.error or ""
    kind = str(body.grader.get("type", "grader"))
    errors = {
        "formula_parse_error": False,
        "invalid_variable_error": False,
        "model_grader_parse_error": False,
        "model_grader_refusal_error": False,
        "model_grader_server_error": False,
        "model_grader_server_error_details": None,
        "other_error": bool(error) and kind not in ("python",),
        "python_grader_runtime_error": bool(error) and kind == "python",
        "python_grader_runtime_error_details": error or None if kind == "python" else None,
        "python_grader_server_error": False,
        "python_grader_server_error_type": None,
        "sample_parse_error": False,
        "truncated_observation_error": False,
        "unresponsive_reward_error": False,
    }
    return {
        "reward": result.score,
        "metadata": {
            "errors": errors,
            "execution_time": time.perf_counter() - t0,
            "name": str(body.grader.get("name", kind)),
            "sampled_model_name": None,
            "scores": {k: v for k, v in result.details.items() if isinstance(v, (int, float))},
            "token_usage": None,
            "type": kind,
        },
        "model_grader_token_usage_per_model": {},
        "sub_rewards": {k: v for k, v in result.details.items() if isinstance(v, (int, float))},
    }
