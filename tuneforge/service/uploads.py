"""A streaming ``multipart/form-data`` reader: the file part goes straight to disk and stops at the size limit.

Starlette's form parser spools the whole upload before a handler runs; this one writes each chunk as it
arrives, so a 10 GB upload over the limit is refused after the limit, not after 10 GB. The uploaded file name
is returned as text for display; it never becomes a path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fastapi import Request
from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header

from tuneforge.service.errors import APIError

MAX_FIELD_BYTES = 4096  # the non-file fields (purpose) are short


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    bytes: int = 0
    sha256: str = ""


class _Parts:
    """Parser callbacks: route each part's bytes to the file on disk or to a small text field."""

    def __init__(self, out: IO[bytes], limit: int) -> None:
        self.out, self.limit = out, limit
        self.upload = Upload()
        self.hash = hashlib.sha256()
        self.header_field, self.header_value = b"", b""
        self.headers: dict[bytes, bytes] = {}
        self.value = bytearray()
        self.is_file = False
        self.name = ""

    def on_part_begin(self) -> None:
        self.headers, self.value, self.is_file, self.name = {}, bytearray(), False, ""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[self.header_field.lower()] = self.header_value
        self.header_field, self.header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        self.name = options.get(b"name", b"").decode(errors="replace")
        if b"filename" in options and self.name == "file":
            if self.upload.filename is not None:
                raise APIError(400, "send exactly one 'file' part", param="file")
            self.is_file = True
            self.upload.filename = options[b"filename"].decode(errors="replace")[-512:] or "upload"

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self.is_file:
            self.upload.bytes += len(chunk)
            if self.upload.bytes > self.limit:
                raise APIError(413, f"file: larger than this server's upload limit of {self.limit} bytes", param="file")
            self.hash.update(chunk)
            self.out.write(chunk)
        else:
            self.value += chunk
            if len(self.value) > MAX_FIELD_BYTES:
                raise APIError(400, f"{self.name}: field too long", param=self.name or None)

    def on_part_end(self) -> None:
        if not self.is_file and self.name:
            self.upload.fields[self.name] = self.value.decode(errors="replace")


async def receive_upload(request: Request, dest: Path, limit: int) -> Upload:
    """Parse the request body, writing its ``file`` part to `dest`; raises an :class:`APIError` on bad input."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise APIError(400, "expected a multipart/form-data body with 'purpose' and 'file'", param="file")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise APIError(413, f"file: larger than this server's upload limit of {limit} bytes", param="file")
    with dest.open("wb") as out:
        parts = _Parts(out, limit)
        callbacks = {name: getattr(parts, name) for name in dir(_Parts) if name.startswith("on_")}
        parser = MultipartParser(options[b"boundary"], callbacks)  # type: ignore[arg-type]
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    if parts.upload.filename is None:
        raise APIError(400, "file: missing (send the data as a multipart part named 'file')", param="file")
    parts.upload.sha256 = parts.hash.hexdigest()
    return parts.upload
