"""``/v1/fine_tuning/jobs``: create, list, retrieve, cancel, pause, resume, events, checkpoints.

The API only records intentions (a new job, a cancel, a pause); the scheduler thread acts on them. A state
change that makes no sense for the job's status (cancelling a finished job) is a 409.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import select

from tuneforge.errors import TuneforgeError
from tuneforge.service import mapping
from tuneforge.service.auth import Caller
from tuneforge.service.base_models import resolve_base
from tuneforge.service.db import Checkpoint, Database, Event, Job, new_id
from tuneforge.service.deps import caller, database
from tuneforge.service.errors import APIError, not_found
from tuneforge.service.files import get_file, page
from tuneforge.service.models import check_fine_tuned
from tuneforge.service.scheduler import add_event
from tuneforge.service.schemas import JobCreate

router = APIRouter(prefix="/v1/fine_tuning")
TERMINAL = ("succeeded", "failed", "cancelled")


def job_object(job: Job, project: str) -> dict[str, Any]:
    """A ``fine_tuning.job``; ``hyperparameters`` and ``method`` show the values chosen for ``auto``."""
    hyper = {
        k: v
        for k, v in (job.hyperparameters or {}).items()
        if k in ("n_epochs", "batch_size", "learning_rate_multiplier")
    } or {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    request = job.request
    method = request.get("method") or {"type": "supervised", "supervised": {}}
    kind = method["type"]
    section = dict(method.get(kind) or {})
    chosen = {k: v for k, v in (job.hyperparameters or {}).items() if k != "adapter"}
    section["hyperparameters"] = (
        {**(section.get("hyperparameters") or {}), **chosen} if chosen else section.get("hyperparameters")
    )
    extension = {
        "method": job.method,
        "priority": job.priority,
        "replicas": f"{job.replicas_min}:{job.replicas_max}",
        "current_replicas": job.replicas,
        "adapter": (job.hyperparameters or {}).get("adapter"),
        "total_steps": job.total_steps,
        "last_step": job.last_step,
        "output_dir": job.output_dir,
    }
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": job.created_at,
        "error": job.error,
        "fine_tuned_model": job.fine_tuned_model,
        "finished_at": job.finished_at,
        "hyperparameters": hyper,
        "model": job.model,
        "organization_id": project,
        "result_files": list(job.result_files or []),
        "seed": job.seed,
        "status": job.status,
        "trained_tokens": job.trained_tokens,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "estimated_finish": None,
        "integrations": [],
        "metadata": job.job_metadata,
        "method": {"type": kind, kind: section},
        "suffix": job.suffix,
        "tuneforge": extension,
    }


def get_job(db: Database, who: Caller, job_id: str) -> Job:
    with db.session() as s:
        job = s.scalar(select(Job).where(Job.id == job_id, Job.project_pk == who.project_pk))
    if job is None:
        raise not_found("job", job_id, "fine_tuning_job_id")
    return job


@router.post("/jobs")
def create_job(
    body: JobCreate,
    request: Request,
    who: Annotated[Caller, Depends(caller)],
    db: Annotated[Database, Depends(database)],
) -> dict[str, Any]:
    plan = mapping.plan_request(body)
    get_file(db, who, body.training_file, "training_file")
    if body.validation_file:
        get_file(db, who, body.validation_file, "validation_file")
    for i, mix in enumerate(body.tuneforge.mixture if body.tuneforge else []):
        get_file(db, who, mix.file, f"tuneforge.mixture[{i}].file")
    try:
        if body.model.startswith("ft:"):  # continuing one of the project's fine-tuned models, as OpenAI allows
            check_fine_tuned(db, who, body.model)
        else:
            resolve_base(body.model)
    except TuneforgeError as e:
        raise APIError(400, str(e), "model", "model_not_found") from None
    job = Job(
        id=new_id("ftjob"),
        project_pk=who.project_pk,
        status="validating_files",
        request=body.model_dump(mode="json", exclude_none=True),
        model=body.model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        method=plan.spec.name,
        hyperparameters={},
        job_metadata=body.metadata,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        suffix=body.suffix,
        priority=plan.priority,
        replicas_min=plan.replicas[0],
        replicas_max=plan.replicas[1],
        elastic=plan.elastic,
        replicas=0,
        result_files=[],
        attempts=0,
        last_step=0,
    )
    with db.session() as s:
        s.add(job)
        s.flush()
        add_event(s, job, "created", f"Created fine-tuning job: {job.id}")
    request.app.state.scheduler.wake()
    return job_object(job, who.project)


@router.get("/jobs")
def list_jobs(
    request: Request,
    who: Annotated[Caller, Depends(caller)],
    db: Annotated[Database, Depends(database)],
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    wanted = {
        k[len("metadata[") : -1]: v
        for k, v in request.query_params.items()
        if k.startswith("metadata[") and k.endswith("]")
    }
    q = select(Job).where(Job.project_pk == who.project_pk)
    if after:
        q = q.where(Job.pk < get_job(db, who, after).pk)
    q = q.order_by(Job.pk.desc())
    out: list[dict[str, Any]] = []
    more = False
    with db.session() as s:
        for job in s.scalars(q):  # metadata is JSON: filtered here, the same on SQLite and PostgreSQL
            if wanted and any((job.job_metadata or {}).get(k) != v for k, v in wanted.items()):
                continue
            if len(out) == limit:
                more = True
                break
            out.append(job_object(job, who.project))
    return page(out, more)


@router.get("/jobs/{fine_tuning_job_id}")
def retrieve_job(
    fine_tuning_job_id: str, who: Annotated[Caller, Depends(caller)], db: Annotated[Database, Depends(database)]
) -> dict[str, Any]:
    return job_object(get_job(db, who, fine_tuning_job_id), who.project)


def _transition(db: Database, who: Caller, job_id: str, action: str) -> Job:
    """Cancel, pause or resume under a row lock, so the scheduler never races the change."""
    with db.session() as s:
        job = s.scalar(select(Job).where(Job.id == job_id, Job.project_pk == who.project_pk).with_for_update())
        if job is None:
            raise not_found("job", job_id, "fine_tuning_job_id")
        allowed = {
            "cancel": ("validating_files", "queued", "running", "paused"),
            "pause": ("queued", "running"),
            "resume": ("paused",),
        }[action]
        if job.status not in allowed:
            raise APIError(
                409, f"cannot {action} a job that is {job.status} (only {', '.join(allowed)})", code="invalid_state"
            )
        was_running = job.status == "running"
        if action == "cancel":
            job.status, job.finished_at = "cancelled", int(__import__("time").time())
            add_event(s, job, "cancelled", "Fine-tuning job cancelled")
        elif action == "pause":
            job.status = "paused"
            add_event(s, job, f"paused:{job.attempts}", "Fine-tuning job paused")
        else:
            job.status = "queued"
            add_event(s, job, f"resumed:{job.attempts}", "Fine-tuning job resumed")
        if was_running:
            job.requested = "stop"
    return job


@router.post("/jobs/{fine_tuning_job_id}/cancel")
def cancel_job(
    fine_tuning_job_id: str,
    request: Request,
    who: Annotated[Caller, Depends(caller)],
    db: Annotated[Database, Depends(database)],
) -> dict[str, Any]:
    job = _transition(db, who, fine_tuning_job_id, "cancel")
    request.app.state.scheduler.wake()
    return job_object(job, who.project)


@router.post("/jobs/{fine_tuning_job_id}/pause")
def pause_job(
    fine_tuning_job_id: str,
    request: Request,
    who: Annotated[Caller, Depends(caller)],
    db: Annotated[Database, Depends(database)],
) -> dict[str, Any]:
    job = _transition(db, who, fine_tuning_job_id, "pause")
    request.app.state.scheduler.wake()
    return job_object(job, who.project)


@router.post("/jobs/{fine_tuning_job_id}/resume")
def resume_job(
    fine_tuning_job_id: str,
    request: Request,
    who: Annotated[Caller, Depends(caller)],
    db: Annotated[Database, Depends(database)],
) -> dict[str, Any]:
    job = _transition(db, who, fine_tuning_job_id, "resume")
    request.app.state.scheduler.wake()
    return job_object(job, who.project)


def event_object(e: Event) -> dict[str, Any]:
    return {
        "id": f"ftevent-{e.pk}",
        "object": "fine_tuning.job.event",
        "created_at": e.created_at,
        "level": e.level,
        "message": e.message,
        "type": e.type,
        "data": e.data,
    }


@router.get("/jobs/{fine_tuning_job_id}/events")
def list_events(
    fine_tuning_job_id: str,
    who: Annotated[Caller, Depends(caller)],
    db: Annotated[Database, Depends(database)],
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> dict[str, Any]:
    """Newest first, like OpenAI's; ``after`` is the id of the last event of the previous page."""
    job = get_job(db, who, fine_tuning_job_id)
    q = select(Event).where(Event.job_pk == job.pk)
    if after:
        try:
            q = q.where(Event.pk < int(after.removeprefix("ftevent-")))
        except ValueError:
            raise APIError(400, f"after: {after!r} is not an event id", "after") from None
    with db.session() as s:
        rows = list(s.scalars(q.order_by(Event.pk.desc()).limit(limit + 1)))
    return page([event_object(e) for e in rows[:limit]], len(rows) > limit)


@router.get("/jobs/{fine_tuning_job_id}/checkpoints")
def list_checkpoints(
    fine_tuning_job_id: str,
    who: Annotated[Caller, Depends(caller)],
    db: Annotated[Database, Depends(database)],
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> dict[str, Any]:
    job = get_job(db, who, fine_tuning_job_id)
    q = select(Checkpoint).where(Checkpoint.job_pk == job.pk)
    with db.session() as s:
        if after:
            cursor = s.scalar(select(Checkpoint).where(Checkpoint.id == after, Checkpoint.job_pk == job.pk))
            if cursor is None:
                raise not_found("checkpoint", after, "after")
            q = q.where(Checkpoint.step < cursor.step)
        rows = list(s.scalars(q.order_by(Checkpoint.step.desc()).limit(limit + 1)))
    data = [
        {
            "id": c.id,
            "object": "fine_tuning.job.checkpoint",
            "created_at": c.created_at,
            "fine_tuned_model_checkpoint": c.model,
            "fine_tuning_job_id": job.id,
            "metrics": c.metrics,
            "step_number": c.step,
        }
        for c in rows[:limit]
    ]
    return page(data, len(rows) > limit)
