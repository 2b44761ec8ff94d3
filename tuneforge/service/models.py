"""``GET /v1/models``: base models, the caller's fine-tuned models and their checkpoints, with lineage.

``parent`` is what a model was trained from (a checkpoint's parent is its job's model), ``root`` the base model.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from sqlalchemy import select

from tuneforge.errors import TuneforgeError, suggest
from tuneforge.service.auth import Caller
from tuneforge.service.base_models import registered, resolve_base
from tuneforge.service.db import Checkpoint, Database, Job
from tuneforge.service.deps import caller, database
from tuneforge.service.errors import not_found

router = APIRouter(prefix="/v1")


def _model(mid: str, created: int, owner: str, parent: str | None, root: str) -> dict[str, Any]:
    return {"id": mid, "object": "model", "created": created, "owned_by": owner, "parent": parent, "root": root}


def project_models(db: Database, who: Caller) -> list[dict[str, Any]]:
    out = [_model(name, 0, "tuneforge", None, name) for name in sorted(registered())]
    with db.session() as s:
        jobs = list(s.scalars(select(Job).where(Job.project_pk == who.project_pk).order_by(Job.pk)))
        roots: dict[str, str] = {}  # a job may continue an earlier job's model: its root is that one's root
        for job in jobs:
            root = roots.get(job.model, job.model)
            if job.fine_tuned_model:
                roots[job.fine_tuned_model] = root
                out.append(_model(job.fine_tuned_model, job.finished_at or 0, who.project, job.model, root))
            ckpts = s.scalars(select(Checkpoint).where(Checkpoint.job_pk == job.pk).order_by(Checkpoint.step))
            for c in ckpts:
                roots[c.model] = root
                parent = job.fine_tuned_model or job.model
                out.append(_model(c.model, c.created_at, who.project, parent, root))
    return out


def check_fine_tuned(db: Database, who: Caller, model: str) -> None:
    """Raise unless ``model`` is one of ``who``'s project's fine-tuned models or checkpoints (``ft:…``): another
    project's names do not exist for it."""
    mine = {m["id"] for m in project_models(db, who) if m["owned_by"] == who.project}
    if model not in mine:
        raise TuneforgeError(
            f"model: no fine-tuned model {model!r} in project {who.project}{suggest(model, sorted(mine))}"
        )


def start_model(db: Database, who: Caller, model: str) -> str:
    """What a job of ``who`` trains from: a base (:func:`resolve_base`), or one of the project's own fine-tuned
    models or checkpoints (``ft:…``), merged into its base once (so any method and adapter trains on it)."""
    if not model.startswith("ft:"):
        return resolve_base(model)
    check_fine_tuned(db, who, model)
    from tuneforge.models.refs import training_start

    try:
        return training_start(model)[0]
    except TuneforgeError as e:  # e.g. its files were deleted since
        raise TuneforgeError(f"model: {e}") from None


def visible_models(request: Request, db: Database, who: Caller) -> list[dict[str, Any]]:
    """The project's models, then those the inference routes serve beyond them (deployments), one list."""
    out = project_models(db, who)
    known = {m["id"] for m in out}
    catalog = getattr(request.app.state, "catalog", None)
    return out + [m.card() for m in (catalog.list(who.project) if catalog else []) if m.id not in known]


@router.get("/models")
def list_models(
    request: Request, who: Annotated[Caller, Depends(caller)], db: Annotated[Database, Depends(database)]
) -> dict[str, Any]:
    return {"object": "list", "data": visible_models(request, db, who)}


@router.get("/models/{model:path}")
def retrieve_model(
    model: str,
    request: Request,
    who: Annotated[Caller, Depends(caller)],
    db: Annotated[Database, Depends(database)],
) -> dict[str, Any]:
    for m in visible_models(request, db, who):
        if m["id"] == model:
            return m
    raise not_found("model", model, "model")
