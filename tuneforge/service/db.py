"""The service's state: projects, API keys, files, jobs, events and checkpoints (SQLAlchemy 2.x).

The same models run on the embedded SQLite file and on PostgreSQL; the schema is created and upgraded by the
Alembic migrations in ``migrations/`` (never ``create_all``), so an upgrade keeps every job. Each table has an
integer primary key for ordering and, where the API shows one, a public string id (``file-…``, ``ftjob-…``).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import JSON, Engine, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


def new_id(prefix: str) -> str:
    """A public id like OpenAI's (``ftjob-`` + 24 url-safe characters); never derived from user input."""
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


class Base(DeclarativeBase):
    type_annotation_map: ClassVar = {dict[str, Any]: JSON, list[Any]: JSON}


class Project(Base):
    __tablename__ = "projects"
    pk: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now)


class ApiKey(Base):
    __tablename__ = "api_keys"
    pk: Mapped[int] = mapped_column(primary_key=True)
    project_pk: Mapped[int] = mapped_column(ForeignKey("projects.pk"), index=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the key; the key itself is never kept
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings to tell keys apart
    created_at: Mapped[int] = mapped_column(Integer, default=now)


class File(Base):
    __tablename__ = "files"
    pk: Mapped[int] = mapped_column(primary_key=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    project_pk: Mapped[int] = mapped_column(ForeignKey("projects.pk"), index=True)
    filename: Mapped[str] = mapped_column(String(512))  # as uploaded; display only, never a path
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[int] = mapped_column(Integer, default=now)


class Job(Base):
    __tablename__ = "jobs"
    pk: Mapped[int] = mapped_column(primary_key=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    project_pk: Mapped[int] = mapped_column(ForeignKey("projects.pk"), index=True)
    status: Mapped[str] = mapped_column(String(24), index=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)  # the create body as validated (what the user asked)
    model: Mapped[str] = mapped_column(String(512))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40), nullable=True)
    method: Mapped[str] = mapped_column(String(16))  # tuneforge method (registry name)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # resolved values, shown
    job_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    seed: Mapped[int] = mapped_column(Integer)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    replicas_min: Mapped[int] = mapped_column(Integer, default=1)
    replicas_max: Mapped[int] = mapped_column(Integer, default=1)
    elastic: Mapped[bool] = mapped_column(default=False)
    replicas: Mapped[int] = mapped_column(Integer, default=0)  # slots the scheduler gives it now (0: none)
    recipe: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    run_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    handle: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # the executor's, to re-attach
    requested: Mapped[str | None] = mapped_column(String(16), nullable=True)  # cancel | pause, until honoured
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_step: Mapped[int] = mapped_column(Integer, default=0)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512), nullable=True)
    output_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    result_files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    trained_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    started_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Event(Base):
    """One ``fine_tuning.job.event``; ``key`` names what it reports (``metrics:12``), so writing it twice is a no-op."""

    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("job_pk", "key", name="uq_events_job_key"),)
    pk: Mapped[int] = mapped_column(primary_key=True)
    job_pk: Mapped[int] = mapped_column(ForeignKey("jobs.pk"), index=True)
    key: Mapped[str] = mapped_column(String(128))
    level: Mapped[str] = mapped_column(String(8))
    type: Mapped[str] = mapped_column(String(8))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_pk", "step", name="uq_checkpoints_job_step"),)
    pk: Mapped[int] = mapped_column(primary_key=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_pk: Mapped[int] = mapped_column(ForeignKey("jobs.pk"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    path: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(600))
    created_at: Mapped[int] = mapped_column(Integer, default=now)


def default_database_url() -> str:
    from tuneforge.paths import state_dir

    return f"sqlite:///{state_dir() / 'service.db'}"


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL and a busy timeout so the API and the scheduler thread share it."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")  # psycopg 3, not the psycopg2 default
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


class Database:
    """The engine and a session factory; ``with db.session() as s:`` commits on success, rolls back otherwise."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        from tuneforge.service.migrations import upgrade

        upgrade(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

    def dispose(self) -> None:
        self.engine.dispose()


def insert_ignore(session: Session, table: type[Base], /, **values: Any) -> bool:
    """INSERT unless a unique key already holds the row (events and checkpoints are written idempotently)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    result = session.execute(insert(table).values(**values).on_conflict_do_nothing())
    return bool(result.rowcount)
