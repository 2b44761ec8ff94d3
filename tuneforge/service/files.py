"""``/v1/files``: upload (streamed to disk under the file's id), list, retrieve, content, delete.

Stored files are named by their id only (``file-…``), so an uploaded name like ``../../etc/passwd`` is just text
in the ``filename`` field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from tuneforge.service.auth import Caller
from tuneforge.service.db import Database, File, Job, new_id
from tuneforge.service.deps import caller, database, settings
from tuneforge.service.errors import APIError, not_found
from tuneforge.service.settings import Settings
from tuneforge.service.uploads import receive_upload

UPLOAD_PURPOSES = ("fine-tune",)
router = APIRouter()


def file_object(f: File) -> dict[str, Any]:
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")  # what the data readers read, by name


def file_path(settings: Settings, file_id: str, filename: str) -> Path:
    """Where a file is stored: its id, plus the uploaded name's suffix when it is a data format (the readers
    pick the parser by suffix); JSONL otherwise, as OpenAI's files are."""
    suffix = Path(filename).suffix.lower()
    return settings.files_dir / f"{file_id}{suffix if suffix in SUFFIXES else '.jsonl'}"


def get_file(db: Database, who: Caller, file_id: str, param: str | None = None) -> File:
    """The caller's file `file_id`; another project's file is a 404 like a missing one."""
    with db.session() as s:
        f = s.scalar(select(File).where(File.id == file_id, File.project_pk == who.project_pk))
    if f is None:
        raise not_found("file", file_id, param)
    return f


def add_file(s: Session, settings: Settings, project_pk: int, filename: str, purpose: str, content: bytes) -> File:
    """Store a file the service itself made (a job's metrics CSV), in the caller's transaction."""
    import hashlib

    fid = new_id("file")
    path = file_path(settings, fid, filename)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    row = File(
        id=fid,
        project_pk=project_pk,
        filename=filename,
        purpose=purpose,
        bytes=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
    )
    s.add(row)
    return row


@router.post("/v1/files")
async def upload(
    request: Request,
    who: Annotated[Caller, Depends(caller)],
    db: Annotated[Database, Depends(database)],
    cfg: Annotated[Settings, Depends(settings)],
) -> dict[str, Any]:
    fid = new_id("file")
    cfg.files_dir.mkdir(parents=True, exist_ok=True)
    tmp = cfg.files_dir / f".upload-{fid}"
    try:
        up = await receive_upload(request, tmp, cfg.max_upload_bytes)
        purpose = up.fields.get("purpose")
        if purpose not in UPLOAD_PURPOSES:
            raise APIError(
                400, f"purpose: {purpose!r} is not supported here (expected one of {list(UPLOAD_PURPOSES)})", "purpose"
            )
        os.replace(tmp, file_path(cfg, fid, up.filename or ""))
    finally:
        tmp.unlink(missing_ok=True)
    row = File(
        id=fid,
        project_pk=who.project_pk,
        filename=up.filename or "upload",
        purpose=purpose,
        bytes=up.bytes,
        sha256=up.sha256,
    )

    def store() -> None:
        with db.session() as s:
            s.add(row)

    await run_in_threadpool(store)
    return file_object(row)


@router.get("/v1/files")
def list_files(
    who: Annotated[Caller, Depends(caller)],
    db: Annotated[Database, Depends(database)],
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    after: str | None = None,
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
) -> dict[str, Any]:
    q = select(File).where(File.project_pk == who.project_pk)
    if purpose:
        q = q.where(File.purpose == purpose)
    if after:
        cursor = get_file(db, who, after, "after")
        q = q.where(File.pk < cursor.pk if order == "desc" else File.pk > cursor.pk)
    q = q.order_by(File.pk.desc() if order == "desc" else File.pk.asc()).limit(limit + 1)
    with db.session() as s:
        rows = list(s.scalars(q))
    return page([file_object(f) for f in rows[:limit]], len(rows) > limit)


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's cursor page (the client pages on ``after=<last id>`` while ``has_more``)."""
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


@router.get("/v1/files/{file_id}")
def retrieve_file(
    file_id: str, who: Annotated[Caller, Depends(caller)], db: Annotated[Database, Depends(database)]
) -> dict[str, Any]:
    return file_object(get_file(db, who, file_id))


@router.get("/v1/files/{file_id}/content")
def file_content(
    file_id: str,
    who: Annotated[Caller, Depends(caller)],
    db: Annotated[Database, Depends(database)],
    cfg: Annotated[Settings, Depends(settings)],
) -> FileResponse:
    f = get_file(db, who, file_id)
    return FileResponse(file_path(cfg, f.id, f.filename), media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
def delete_file(
    file_id: str,
    who: Annotated[Caller, Depends(caller)],
    db: Annotated[Database, Depends(database)],
    cfg: Annotated[Settings, Depends(settings)],
) -> dict[str, Any]:
    f = get_file(db, who, file_id)
    with db.session() as s:
        busy = s.scalar(
            select(Job.id).where(
                Job.project_pk == who.project_pk,
                Job.status.in_(("validating_files", "queued", "running", "paused")),
                (Job.training_file == f.id) | (Job.validation_file == f.id),
            )
        )
        if busy:
            raise APIError(
                409, f"file {f.id} is in use by job {busy}; cancel it first", param="file_id", code="conflict"
            )
        s.delete(s.get(File, f.pk))
    file_path(cfg, f.id, f.filename).unlink(missing_ok=True)
    return {"id": f.id, "object": "file", "deleted": True}
