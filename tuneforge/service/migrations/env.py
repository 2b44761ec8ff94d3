"""Alembic environment: the engine comes from ``upgrade(engine)`` (``config.attributes``), never a config file."""

from __future__ import annotations

from alembic import context

from tuneforge.service.db import Base

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
