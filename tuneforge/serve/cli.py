"""``tuneforge serve [MODEL …]`` and ``tuneforge deploy MODEL``.

``serve`` starts the OpenAI-compatible endpoint on 127.0.0.1 over the models named (each ``REF`` or
``NAME=REF``: a model or adapter directory, a run directory, ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, an
``ft:`` name); every adapter of one base shares that base's single copy in memory, and the base is served under
its folder's name. ``deploy`` makes a model available on a running server (``tuneforge serve`` or
``tuneforge server``) without a restart, and with ``--alias`` points a registry alias at the version served.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from tuneforge.errors import TuneforgeError

DEFAULT_PORT = 8000


def add_commands(sub: Any) -> None:
    """Register ``serve`` and ``deploy`` on the top-level subparsers of ``tuneforge``."""
    p = sub.add_parser("serve", help="OpenAI-compatible endpoint: one base in memory, many adapters per batch")
    p.add_argument("models", nargs="*", metavar="MODEL", help="REF or NAME=REF (directory, run, models:/…, ft:…)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument(
        "--api-key-env",
        default=None,
        metavar="VAR",
        help="environment variable holding the key clients must send (default: no key; then only this machine "
        "may load or unload models)",
    )
    add_engine_flags(p)
    p.add_argument("--tracking-uri", default=None, help="registry for models:/ references (default: embedded)")
    p.set_defaults(fn=_cmd_serve)

    p = sub.add_parser("deploy", help="serve a registered version or run on a running server, without a restart")
    p.add_argument("model", metavar="MODEL_VERSION|RUN_DIR", help="models:/NAME/VERSION, a run or model directory…")
    p.add_argument("--name", default=None, help="the name clients ask for (default: NAME@ALIAS, or the model's)")
    p.add_argument("--alias", default=None, help="point this registry alias (e.g. production) at the version")
    p.add_argument("--server", default=None, help=f"default: $TUNEFORGE_BASE_URL or http://127.0.0.1:{DEFAULT_PORT}/v1")
    p.add_argument("--api-key-env", default="TUNEFORGE_API_KEY", metavar="VAR", help="default: $TUNEFORGE_API_KEY")
    p.add_argument("--tracking-uri", default=None, help="the registry --alias writes to (default: embedded)")
    p.set_defaults(fn=_cmd_deploy)


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """The inference engine's flags, shared by ``tuneforge serve`` and ``tuneforge server``; see engine_factory."""
    p.add_argument("--max-batch-size", type=int, default=32, help="requests decoded together per base model")
    p.add_argument(
        "--adapter-budget-mb", type=float, default=None, help="memory for loaded adapters (LRU eviction beyond)"
    )
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--engine", choices=["tuneforge", "vllm"], default="tuneforge")
    p.add_argument("--max-loras", type=int, default=8, help="--engine vllm: adapters in one batch")
    p.add_argument("--max-lora-rank", type=int, default=64, help="--engine vllm: the largest adapter rank")


def engine_factory(args: argparse.Namespace) -> Any:
    """base path → a started engine of the kind asked for, configured from the flags."""
    if args.engine == "vllm":
        from tuneforge.serve.vllm_engine import VllmEngine, check_available

        check_available()  # before any model is read
        return lambda base: VllmEngine(
            base,
            max_batch_size=args.max_batch_size,
            max_loras=args.max_loras,
            max_lora_rank=args.max_lora_rank,
            max_model_len=args.max_model_len,
        )
    from tuneforge.serve.engine import Engine

    budget = int(args.adapter_budget_mb * 2**20) if args.adapter_budget_mb else None
    return lambda base: Engine(
        base, max_batch_size=args.max_batch_size, adapter_budget_bytes=budget, max_model_len=args.max_model_len
    )


def _api_key(var: str | None) -> str | None:
    if var is None:
        return None
    key = os.environ.get(var)
    if not key:
        raise TuneforgeError(f"--api-key-env {var}: the environment variable is not set (or empty)")
    return key


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tuneforge.models.loading import quiet_transformers
    from tuneforge.serve.app import create_app
    from tuneforge.serve.catalog import Catalog, add_all

    key = _api_key(args.api_key_env)
    quiet_transformers()
    catalog = Catalog(engine_factory(args), tracking_uri=args.tracking_uri)
    try:
        add_all(catalog, args.models)
    except BaseException:
        catalog.close()
        raise
    names = ", ".join(m.id + (f" (adapter of {m.parent})" if m.adapter else "") for m in catalog.list()) or "none yet"
    if key is None and args.host not in ("127.0.0.1", "::1", "localhost"):
        print(f"warning: serving on {args.host} without an API key (--api-key-env VAR)", flush=True)
    print(f"tuneforge serve on http://{args.host}:{args.port}/v1 — models: {names}", flush=True)
    uvicorn.run(create_app(catalog, api_key=key), host=args.host, port=args.port, log_level="warning")
    return 0


def deploy(
    model: str,
    *,
    server: str,
    name: str | None = None,
    alias: str | None = None,
    api_key: str | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Serve `model` on the running server at `server` (``…/v1``); with `alias`, then point the registry alias
    at the version (only once it is being served, so the alias never names a version that failed to load)."""
    import httpx

    from tuneforge.tracking import registry

    info = None
    if alias is not None:
        if not model.startswith(registry.SCHEME):
            raise TuneforgeError(
                f"--alias needs a registered version ({registry.SCHEME}NAME/VERSION), not {model}; register a run "
                "with tracking.register_as, or deploy it without --alias"
            )
        info = registry.resolve(model, tracking_uri)
        model, name = info.uri, name or f"{info.name}@{alias}"
    elif Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())  # the server resolves it, from its own directory
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = server.rstrip("/") + "/deployments"
    try:
        reply = httpx.post(url, json={"model": model, "name": name}, headers=headers, timeout=600)
    except httpx.HTTPError as e:
        raise TuneforgeError(f"cannot reach the server at {server}: {e}") from None
    if reply.status_code != 200:
        try:
            message = reply.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = reply.text
        raise TuneforgeError(f"{url}: {reply.status_code}: {message}")
    out = reply.json()
    if info is not None and alias is not None:
        moved = registry.set_alias(info.name, info.version, alias, tracking_uri)
        out["alias"] = {"name": info.name, "alias": alias, "version": moved.version}
    return out


def _cmd_deploy(args: argparse.Namespace) -> int:
    server = args.server or os.environ.get("TUNEFORGE_BASE_URL") or f"http://127.0.0.1:{DEFAULT_PORT}/v1"
    out = deploy(
        args.model,
        server=server,
        name=args.name,
        alias=args.alias,
        api_key=os.environ.get(args.api_key_env) or None,
        tracking_uri=args.tracking_uri,
    )
    print(json.dumps(out, indent=2))
    return 0
