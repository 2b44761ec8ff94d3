"""Chat, completions and embeddings inside ``tuneforge server``: one base URL for jobs and inference.

The routes are :mod:`tuneforge.serve.app`'s, with the service's API keys as their auth. Every model a project
sees in ``GET /v1/models`` — registered base models, its fine-tuned models and their checkpoints — answers on
its first request: the catalog finds where its files are in the database, loads its base once (all fine-tunes
of one base share it and its batches) and keeps it. A fine-tuned model stays visible to its own project only;
a model deployed at run time (``tuneforge deploy --server …``) belongs to the project whose key deployed it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from sqlalchemy import select

from tuneforge.errors import TuneforgeError
from tuneforge.serve.app import Auth, inference_router, install_handlers
from tuneforge.serve.catalog import Catalog, Spec
from tuneforge.service.auth import Caller
from tuneforge.service.base_models import resolve_base
from tuneforge.service.db import Checkpoint, Database, Job, Project
from tuneforge.service.deps import caller
from tuneforge.service.models import project_models

MAX_BATCH_SIZE = 32


def files_of(db: Database, who: Caller, name: str) -> str | None:
    """Where the model `name` that `who` may use is: a registered base, a job's result or a checkpoint."""
    with db.session() as s:
        path = s.scalar(
            select(Job.output_dir).where(Job.fine_tuned_model == name, Job.project_pk == who.project_pk)
        ) or s.scalar(
            select(Checkpoint.path)
            .join(Job, Job.pk == Checkpoint.job_pk)
            .where(Checkpoint.model == name, Job.project_pk == who.project_pk)
        )
    if path:
        return path
    try:
        return resolve_base(name)
    except TuneforgeError:
        return None


def finder(db: Database) -> Callable[[str, str | None], Spec | None]:
    """The catalog's way to the project's models, by name, with their lineage."""

    def find(name: str, project: str | None) -> Spec | None:
        if project is None:
            return None
        with db.session() as s:
            pk = s.scalar(select(Project.pk).where(Project.name == project))
        if pk is None:
            return None
        who = Caller(pk, project)
        listed = next((m for m in project_models(db, who) if m["id"] == name), None)
        path = files_of(db, who, name) if listed is not None else None
        if path is None:
            return None
        owner = project if name.startswith("ft:") else None  # base models are everyone's
        return Spec(path, name, parent=listed["parent"], root=listed["root"], owner=owner)

    return find


def make_catalog(db: Database, engine_factory: Callable[[Any], Any] | None = None) -> Catalog:
    """``engine_factory``: base path → engine (``tuneforge server``'s engine flags); default: tuneforge's engine."""
    from tuneforge.serve.engine import Engine

    factory = engine_factory or (lambda base: Engine(base, max_batch_size=MAX_BATCH_SIZE))
    # serve_bases=False: a fine-tune's base is served under its registered name, not a folder's
    return Catalog(factory, finder=finder(db), serve_bases=False)


async def _project(request: Request) -> str | None:
    return (await caller(request)).project


def mount(app: FastAPI) -> None:
    """The inference routes on the service's app (its own ``GET /v1/models`` lists served models too)."""
    install_handlers(app, generic=False)
    app.include_router(inference_router(Auth(caller=_project, admin=_project), models_route=False))
