"""FastAPI dependencies: the database, the settings and the authenticated caller, from the app's state."""

from __future__ import annotations

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from tuneforge.service.auth import Caller, authenticate
from tuneforge.service.db import Database
from tuneforge.service.settings import Settings


def database(request: Request) -> Database:
    return request.app.state.db


def settings(request: Request) -> Settings:
    return request.app.state.settings


async def caller(request: Request) -> Caller:
    return await run_in_threadpool(authenticate, request.app.state.db, request)
