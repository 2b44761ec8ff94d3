"""API keys: ``tuneforge keys create --project NAME`` makes one; each request names its project by its key.

Keys are 256 random bits, so a plain SHA-256 digest is enough to store them (a slow password hash protects
guessable secrets; these are not) and lets a request find its key with one indexed lookup. The key itself is
shown once and never stored.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from fastapi import Request
from sqlalchemy import select

from tuneforge.errors import TuneforgeError
from tuneforge.service.db import ApiKey, Database, Project
from tuneforge.service.errors import APIError

KEY_PREFIX = "tfk-"


@dataclass(frozen=True)
class Caller:
    """Who is asking: the project a valid key belongs to."""

    project_pk: int
    project: str


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(db: Database, project: str) -> str:
    """A new key for `project` (created if new); returns the key, which is not stored anywhere."""
    if not project or len(project) > 64 or not all(c.isalnum() or c in "-_" for c in project):
        raise TuneforgeError(f"--project {project!r}: use 1–64 letters, digits, '-' or '_'")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with db.session() as s:
        row = s.scalar(select(Project).where(Project.name == project))
        if row is None:
            row = Project(name=project)
            s.add(row)
            s.flush()
        s.add(ApiKey(project_pk=row.pk, digest=digest(key), prefix=key[:10]))
    return key


def authenticate(db: Database, request: Request) -> Caller:
    """The caller of `request`, or a 401 for a missing, malformed or unknown key."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(
            401,
            "Missing API key: send 'Authorization: Bearer KEY' (create one with `tuneforge keys create --project NAME`)",
            code="missing_api_key",
        )
    wanted = digest(key.strip())
    with db.session() as s:
        row = s.execute(
            select(ApiKey.digest, Project.pk, Project.name)
            .join(Project, Project.pk == ApiKey.project_pk)
            .where(ApiKey.digest == wanted)
        ).first()
    if row is None or not hmac.compare_digest(row[0], wanted):
        raise APIError(401, "Incorrect API key provided", code="invalid_api_key")
    return Caller(project_pk=row[1], project=row[2])
