"""Alembic migrations, run programmatically at server start-up (``upgrade(engine)``).

Every schema change is a new file in ``versions/``; ``tests/test_service_db.py`` checks that the models in
``db.py`` equal what the migrations build, so a model change without its migration fails the tests.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

HERE = Path(__file__).resolve().parent


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    command.upgrade(alembic_config(engine), revision)
