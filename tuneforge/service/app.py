"""The FastAPI app: routes, the error envelope, the database (migrated at start-up) and the scheduler thread.

``create_app(settings)`` is all a test or ``tuneforge server`` needs; the scheduler starts with the app's lifespan
and stops with it, leaving job processes running for the next start to re-attach.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from tuneforge.service import files, graders, inference, jobs, models
from tuneforge.service.db import Database
from tuneforge.service.errors import install_handlers
from tuneforge.service.executors import make_executor
from tuneforge.service.scheduler import Scheduler
from tuneforge.service.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.root.mkdir(parents=True, exist_ok=True)
        db = Database(settings.url)
        db.migrate()
        executor = make_executor(settings.executor, python=settings.python)
        scheduler = Scheduler(db, settings, executor)
        app.state.db, app.state.settings, app.state.scheduler = db, settings, scheduler
        app.state.catalog = inference.make_catalog(db, settings.engine_factory)  # models load on first use
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()
            app.state.catalog.close()
            db.dispose()

    app = FastAPI(title="tuneforge", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    install_handlers(app)
    for module in (files, jobs, graders, models):
        app.include_router(module.router)
    inference.mount(app)  # chat, completions, embeddings, deployments on the same base URL

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
