"""The OpenAI-compatible inference routes: chat and text completions (streamed or whole), embeddings, models,
and adapters loaded and unloaded at run time.

``create_app(catalog)`` is ``tuneforge serve``; :func:`inference_router` is the same routes for any app —
``tuneforge server`` mounts them next to the jobs API, with its API keys as the :class:`Auth`. Prompts are
rendered as training rendered them (:mod:`tuneforge.serve.prompts`).

A request is validated before anything runs, so a bad one is a 400 / 404 error object naming the field; a
client that goes away — mid-stream or while waiting for a whole answer — cancels its generations at once.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from tuneforge.errors import TuneforgeError
from tuneforge.serve import completions as cmpl
from tuneforge.serve.catalog import Catalog, NameTaken, Served, Spec
from tuneforge.serve.openai_schemas import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DeploymentRequest,
    EmbeddingRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
    model_not_found,
    param_of,
    parse_body,
)
from tuneforge.serve.prompts import chat_prompt_ids, sampling, text_prompt_ids

log = logging.getLogger("tuneforge.serve")

Caller = Callable[[Request], Awaitable[str | None]]  # the caller's owner name (a project), None when anonymous
LOOPBACK = ("127.0.0.1", "::1", "localhost")
MAX_CHOICES = 256  # generations one request may start


@dataclass(frozen=True)
class Auth:
    """Who may call: ``caller`` for inference and listing, ``admin`` for loading and unloading models."""

    caller: Caller
    admin: Caller


def key_auth(api_key: str | None) -> Auth:
    """``tuneforge serve``'s: one optional key. Without one, anyone reaching the port may generate, and only
    clients on this machine may load or unload models."""

    async def caller(request: Request) -> str | None:
        if api_key is None:
            return None
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "Missing API key: send 'Authorization: Bearer KEY'", code="missing_api_key")
        if not hmac.compare_digest(key.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")
        return None

    async def admin(request: Request) -> str | None:
        if api_key is None and (request.client is None or request.client.host not in LOOPBACK):
            raise APIError(
                403,
                "Loading and unloading models is allowed from this machine only unless the server has an API key "
                "(tuneforge serve --api-key-env VAR)",
                code="forbidden",
            )
        return await caller(request)

    return Auth(caller, admin)


# ------------------------------------------------------------------------------------------------ helpers


def catalog_of(request: Request) -> Catalog:
    return request.app.state.catalog


async def lookup(request: Request, name: str, owner: str | None) -> Served:
    """The served model `name` (loaded on first use when the catalog can find it), or a 404 naming it."""
    catalog = catalog_of(request)
    try:
        return await run_in_threadpool(catalog.get, name, owner)
    except KeyError:
        raise model_not_found(name, catalog.names(owner)) from None
    except TuneforgeError as e:
        raise APIError(400, f"model: {name} cannot be served: {e}", param="model", code="model_not_loadable") from None


_FIELD = re.compile(r"^([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+)*): ")


def api_error(e: BaseException) -> APIError:
    """An engine's exception as the client's error object: user errors are 400s naming their field."""
    from tuneforge.serve.adapters import UnknownAdapterError

    if isinstance(e, APIError):
        return e
    if isinstance(e, cmpl.EngineAborted):
        return APIError(503, str(e), code="engine_stopped")
    if isinstance(e, UnknownAdapterError):  # unloaded while the request waited
        return APIError(404, str(e), param="model", code="model_not_found")
    if isinstance(e, TuneforgeError):
        match = _FIELD.match(str(e))
        return APIError(400, str(e), param=match.group(1) if match else None, code="invalid_value")
    log.error("generation failed", exc_info=e)
    return APIError(500, "The server had an error while generating the answer.", code="server_error")


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is read, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def whole(request: Request, run: cmpl.Run, gens: Sequence[cmpl.Generation]) -> list[cmpl.Choice] | None:
    """Every choice, or None when the client left first (its generations are cancelled then)."""
    work = asyncio.ensure_future(cmpl.collect(run, gens))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            run.close()
    if work.cancelled():
        return None
    try:
        return work.result()
    except Exception as e:
        raise api_error(e) from None


async def primed(run: cmpl.Run) -> AsyncIterator[cmpl.Piece]:
    """The run's pieces, the first one awaited now: an error before any text is still an HTTP error status."""
    pieces = run.pieces()
    try:
        first = await anext(pieces)
    except Exception as e:
        raise api_error(e) from None

    async def replay() -> AsyncIterator[cmpl.Piece]:
        yield first
        async for piece in pieces:
            yield piece

    return replay()


def event_stream(events: AsyncIterator[str]) -> Response:
    """Server-sent events; an error after the stream began is sent as an ``error`` event (as OpenAI does)."""
    import json

    from sse_starlette import EventSourceResponse

    async def guarded() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except Exception as e:
            yield json.dumps(api_error(e).body())

    return EventSourceResponse(guarded(), ping=15, sep="\n")


# ------------------------------------------------------------------------------------------------- routes


def inference_router(auth: Auth, *, models_route: bool = True) -> APIRouter:
    """The routes, for any app whose ``state.catalog`` is a :class:`Catalog` (``models_route=False`` when the app
    lists models itself and merges the catalog's, as the jobs service does)."""
    router = APIRouter(prefix="/v1")

    @router.post("/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Any:
        owner = await auth.caller(request)
        body = parse_body(await request.body(), ChatRequest)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs: requires logprobs to be true", param="top_logprobs")
        served = await lookup(request, body.model, owner)
        prompt = chat_prompt_ids(served, [m.for_template() for m in body.messages])
        params = sampling(
            served,
            prompt_len=len(prompt),
            limit=body.token_limit,
            limit_param="max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens",
            prompt_param="messages",
            body=body,
            stop_ids=served.chat_stop_ids,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        )
        gens = cmpl.generations([prompt], body.n, params)
        run = cmpl.Run(served.engine, served.tokenizer, served.adapter, gens, body.stops)
        if body.stream:
            stream = cmpl.chat_stream(
                body.model,
                await primed(run),
                gens,
                served.tokenizer,
                logprobs=body.logprobs,
                include_usage=body.include_usage,
            )
            return event_stream(stream)
        choices = await whole(request, run, gens)
        if choices is None:
            return Response(status_code=499)
        return cmpl.chat_body(body.model, choices, gens, served.tokenizer, body.logprobs)

    @router.post("/completions", response_model=None)
    async def completions(request: Request) -> Any:
        owner = await auth.caller(request)
        body = parse_body(await request.body(), CompletionRequest)
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of: only best_of equal to n is supported", param="best_of")
        if body.echo and body.logprobs is not None:
            raise APIError(
                400, "echo: echo with logprobs needs the prompt's log-probabilities, not computed here", param="echo"
            )
        if len(body.prompts) * body.n > MAX_CHOICES:
            raise APIError(400, f"n: at most {MAX_CHOICES} choices per request (prompts × n)", param="n")
        served = await lookup(request, body.model, owner)
        prompts = []
        for i, p in enumerate(body.prompts):
            ids = text_prompt_ids(served, p) if isinstance(p, str) else p
            if not ids:
                raise APIError(400, f"prompt[{i}]: the prompt is empty", param=f"prompt[{i}]")
            prompts.append(ids)
        vocab = len(served.tokenizer)
        bad = next(((i, t) for i, ids in enumerate(prompts) for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(
                400, f"prompt[{bad[0]}]: {bad[1]} is not a token id of this model", param=f"prompt[{bad[0]}]"
            )
        params = [
            sampling(
                served,
                prompt_len=len(ids),
                limit=body.max_tokens,
                limit_param="max_tokens",
                prompt_param="prompt",
                body=body,
                stop_ids=served.text_stop_ids,
                logprobs=body.logprobs,
            )
            for ids in prompts
        ]
        gens = []
        for p, ids in enumerate(prompts):  # each prompt's choices, numbered on from the previous prompt's
            gens += [
                cmpl.Generation(p * body.n + g.index, ids, g.params, p)
                for g in cmpl.generations([ids], body.n, params[p])
            ]
        echo = None
        if body.echo:
            echo = [p if isinstance(p, str) else served.tokenizer.decode(p) for p in body.prompts]
        run = cmpl.Run(served.engine, served.tokenizer, served.adapter, gens, body.stops)
        logprobs = body.logprobs is not None
        if body.stream:
            stream = cmpl.completion_stream(
                body.model,
                await primed(run),
                gens,
                served.tokenizer,
                logprobs=logprobs,
                echo=echo,
                include_usage=body.include_usage,
            )
            return event_stream(stream)
        choices = await whole(request, run, gens)
        if choices is None:
            return Response(status_code=499)
        return cmpl.completion_body(body.model, choices, gens, served.tokenizer, logprobs=logprobs, echo=echo)

    @router.post("/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        owner = await auth.caller(request)
        body = parse_body(await request.body(), EmbeddingRequest)
        served = await lookup(request, body.model, owner)
        batch = [text_prompt_ids(served, x) if isinstance(x, str) else x for x in body.inputs]
        for i, ids in enumerate(batch):
            if not ids:
                raise APIError(400, f"input[{i}]: the input is empty", param=f"input[{i}]")
        try:
            vectors = await run_in_threadpool(served.engine.embed, batch, served.adapter)
        except TuneforgeError as e:
            raise api_error(e) from None
        if body.dimensions is not None and vectors and body.dimensions != len(vectors[0]):
            raise APIError(
                400,
                f"dimensions: this model's embeddings have {len(vectors[0])} dimensions (shortening is not supported)",
                param="dimensions",
            )

        def encode(v: list[float]) -> Any:
            if body.encoding_format == "base64":
                return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
            return v

        tokens = sum(len(ids) for ids in batch)
        return {
            "object": "list",
            "model": body.model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    if models_route:

        @router.get("/models")
        async def list_models(request: Request) -> dict[str, Any]:
            owner = await auth.caller(request)
            return {"object": "list", "data": [m.card() for m in catalog_of(request).list(owner)]}

        @router.get("/models/{model:path}")
        async def retrieve_model(model: str, request: Request) -> dict[str, Any]:
            owner = await auth.caller(request)
            catalog = catalog_of(request)
            served = catalog.find(model, owner)
            if served is None:
                raise model_not_found(model, catalog.names(owner))
            return served.card()

    @router.post("/load_lora_adapter", response_class=PlainTextResponse)
    async def load_lora_adapter(request: Request) -> str:
        """vLLM's route: serve an adapter under ``lora_name`` (an error if the name is taken)."""
        owner = await auth.admin(request)
        body = parse_body(await request.body(), LoadAdapterRequest)
        await _add(request, Spec(body.lora_path, body.lora_name, owner=owner), "lora_path", replace=False, lora=True)
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    @router.post("/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(request: Request) -> str:
        owner = await auth.admin(request)
        body = parse_body(await request.body(), UnloadAdapterRequest)
        catalog = catalog_of(request)
        served = catalog.find(body.lora_name, owner)
        if served is None or served.adapter is None:
            known = [m.id for m in catalog.list(owner) if m.adapter]
            raise APIError(
                404 if served is None else 400,
                f"lora_name: no LoRA adapter named '{body.lora_name}' is loaded"
                + (f" ('{body.lora_name}' is a base model)" if served is not None else "")
                + (f" (loaded: {', '.join(known)})" if known else ""),
                param="lora_name",
                code="not_found" if served is None else "invalid_value",
            )
        await run_in_threadpool(catalog.remove, body.lora_name, owner)
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    @router.post("/deployments")
    async def deploy(request: Request) -> dict[str, Any]:
        """Serve a model reference under a name, replacing what the name served (no restart, no gap)."""
        owner = await auth.admin(request)
        body = parse_body(await request.body(), DeploymentRequest)
        served = await _add(request, Spec(body.model, body.name, owner=owner), "model", replace=True, lora=False)
        return deployment(served)

    @router.get("/deployments")
    async def deployments(request: Request) -> dict[str, Any]:
        owner = await auth.admin(request)
        return {"object": "list", "data": [deployment(m) for m in catalog_of(request).list(owner)]}

    @router.delete("/deployments/{name:path}")
    async def undeploy(name: str, request: Request) -> dict[str, Any]:
        owner = await auth.admin(request)
        catalog = catalog_of(request)
        try:
            await run_in_threadpool(catalog.remove, name, owner)
        except KeyError:
            raise model_not_found(name, catalog.names(owner)) from None
        return {"id": name, "object": "model", "deleted": True}

    return router


def deployment(served: Served) -> dict[str, Any]:
    return {**served.card(), "source": served.source, "adapter": served.adapter is not None, "version": served.version}


async def _add(request: Request, spec: Spec, param: str, *, replace: bool, lora: bool) -> Served:
    catalog = catalog_of(request)
    try:
        return await run_in_threadpool(catalog.add, spec, replace=replace, require_adapter=lora)
    except NameTaken as e:
        raise APIError(400, str(e), param="lora_name" if lora else "name", code="already_exists") from None
    except TuneforgeError as e:
        raise APIError(400, f"{param}: {e}", param=param, code="invalid_value") from None


# ------------------------------------------------------------------------------------------ standalone


def install_handlers(app: FastAPI, *, generic: bool = True) -> None:
    """The error envelope for this module's :class:`APIError`; ``generic`` also for everything else (an app of
    its own — the jobs service has its own handlers for the rest)."""

    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    if not generic:
        return

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        param = param_of(p for p in first.get("loc", ()) if p not in ("body", "query", "path", "header"))
        return APIError(400, f"{param}: {first.get('msg')}", param or None, "invalid_value").response()

    @app.exception_handler(TuneforgeError)
    async def _user(_: Request, e: TuneforgeError) -> JSONResponse:
        return api_error(e).response()

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        return APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def _bug(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, "The server had an error while processing your request.", code="server_error").response()


def create_app(catalog: Catalog, *, api_key: str | None = None) -> FastAPI:
    """``tuneforge serve``: the routes over `catalog`, whose engines stop with the app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await run_in_threadpool(catalog.close)

    app = FastAPI(title="tuneforge serve", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.catalog = catalog
    install_handlers(app)
    app.include_router(inference_router(key_auth(api_key)))

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
