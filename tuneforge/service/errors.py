"""OpenAI's error envelope, ``{"error": {"message", "type", "param", "code"}}``, for every failure.

Handlers turn request-validation errors into 400s naming the field, tuneforge's own user errors into 400s, and
anything unexpected into a 500 whose body says nothing about the code (the traceback goes to the server log).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tuneforge.errors import TuneforgeError

log = logging.getLogger("tuneforge.service")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error"}


class APIError(Exception):
    """An error the client can act on, with the HTTP status and the field (``param``) it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def not_found(kind: str, ident: str, param: str | None = None) -> APIError:
    """404 for a missing id — and for another project's, which must look exactly the same."""
    return APIError(404, f"No such {kind}: '{ident}'", param=param, code="not_found")


def envelope(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param, "code": code}
    if status >= 500:
        body["type"] = "server_error"
    return JSONResponse({"error": body}, status_code=status)


def _field(loc: tuple[Any, ...]) -> str:
    """``("body", "method", "dpo", "hyperparameters", "beta")`` → ``method.dpo.hyperparameters.beta``."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError) -> JSONResponse:
        return envelope(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        param = _field(tuple(first.get("loc", ())))
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg"))
        return envelope(400, message, param or None, "invalid_value")

    @app.exception_handler(TuneforgeError)
    async def _user(_: Request, e: TuneforgeError) -> JSONResponse:
        return envelope(400, str(e), None, "invalid_value")

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        code = "not_found" if e.status_code == 404 else None
        return envelope(e.status_code, str(e.detail), None, code)

    @app.exception_handler(Exception)
    async def _bug(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return envelope(500, "The server had an error while processing your request.", None, "server_error")
