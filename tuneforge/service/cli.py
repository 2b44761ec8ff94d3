"""``tuneforge server``, ``tuneforge keys create``, ``tuneforge models add|list`` and ``tuneforge jobs …``.

``jobs`` commands are clients of a running server through the official ``openai`` client
(``--base-url`` / ``$TUNEFORGE_BASE_URL``, key from ``$TUNEFORGE_API_KEY``); ``keys`` writes the database directly,
since a first key cannot come from an API that needs one.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from tuneforge.serve.cli import add_engine_flags

DEFAULT_PORT = 8100


def add_commands(sub: Any) -> None:
    """Register the service's commands on the top-level subparsers of ``tuneforge``."""
    p = sub.add_parser("server", help="start the OpenAI-compatible fine-tuning service on 127.0.0.1")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--database-url", default=None, help="default: SQLite under $TUNEFORGE_HOME/service")
    p.add_argument("--slots", type=int, default=None, help="job replicas run at once (default: CPU cores)")
    p.add_argument("--max-upload-mb", type=int, default=512)
    p.add_argument("--tracking-uri", default=None, help="MLflow for the jobs (default: the embedded store)")
    p.add_argument("--no-tracking", action="store_true", help="jobs do not log to MLflow")
    p.add_argument("--executor", choices=["local", "kubernetes"], default="local")
    add_engine_flags(p)  # chat and completions on the same base URL: the same engine flags as `tuneforge serve`
    p.set_defaults(fn=_cmd_server)

    p = sub.add_parser("keys", help="API keys of the fine-tuning service")
    ksub = p.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")
    q = ksub.add_parser("create", help="create an API key for a project (printed once)")
    q.add_argument("--project", required=True)
    q.add_argument("--database-url", default=None)
    q.set_defaults(fn=_cmd_keys_create)

    p = sub.add_parser("models", help="short names for base models")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")
    q = msub.add_parser("add", help="register a model directory under a short name")
    q.add_argument("name")
    q.add_argument("path")
    q.set_defaults(fn=_cmd_models_add)
    q = msub.add_parser("list", help="registered base models")
    q.set_defaults(fn=_cmd_models_list)

    p = sub.add_parser("jobs", help="fine-tuning jobs of a running server")
    p.add_argument(
        "--base-url", default=None, help=f"default: $TUNEFORGE_BASE_URL or http://127.0.0.1:{DEFAULT_PORT}/v1"
    )
    jsub = p.add_subparsers(dest="jobs_command", required=True, metavar="SUBCOMMAND")
    q = jsub.add_parser("list", help="the project's jobs, newest first")
    q.add_argument("--limit", type=int, default=20)
    q.set_defaults(fn=_cmd_jobs_list)
    for name, fn, text in (("show", _cmd_jobs_show, "one job as JSON"), ("cancel", _cmd_jobs_cancel, "cancel a job")):
        q = jsub.add_parser(name, help=text)
        q.add_argument("job")
        q.set_defaults(fn=fn)
    q = jsub.add_parser("logs", help="a job's events, oldest first")
    q.add_argument("job")
    q.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    q.set_defaults(fn=_cmd_jobs_logs)


def _cmd_server(args: argparse.Namespace) -> int:
    import uvicorn

    from tuneforge.serve.cli import engine_factory
    from tuneforge.service.app import create_app
    from tuneforge.service.settings import Settings

    settings = Settings(
        database_url=args.database_url,
        max_upload_bytes=args.max_upload_mb * 1024 * 1024,
        tracking=not args.no_tracking,
        tracking_uri=args.tracking_uri,
        executor=args.executor,
    )
    if args.slots:
        settings.slots = args.slots
    settings.engine_factory = engine_factory(args)
    print(f"tuneforge server on http://{args.host}:{args.port}/v1 (database {settings.url})", flush=True)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning")
    return 0


def _cmd_keys_create(args: argparse.Namespace) -> int:
    from tuneforge.service.auth import create_key
    from tuneforge.service.db import Database
    from tuneforge.service.settings import Settings

    db = Database(args.database_url or Settings().url)
    db.migrate()
    print(create_key(db, args.project))
    db.dispose()
    return 0


def _cmd_models_add(args: argparse.Namespace) -> int:
    from tuneforge.service.base_models import add_model

    print(f"{args.name} → {add_model(args.name, args.path)}")
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    from tuneforge.service.base_models import registered

    for name, path in sorted(registered().items()):
        print(f"{name}\t{path}")
    return 0


def _client(args: argparse.Namespace) -> Any:
    from openai import OpenAI

    from tuneforge.errors import TuneforgeError

    key = os.environ.get("TUNEFORGE_API_KEY")
    if not key:
        raise TuneforgeError("set $TUNEFORGE_API_KEY (create one with `tuneforge keys create --project NAME`)")
    url = args.base_url or os.environ.get("TUNEFORGE_BASE_URL") or f"http://127.0.0.1:{DEFAULT_PORT}/v1"
    return OpenAI(base_url=url, api_key=key, max_retries=0)


def _api(call: Any) -> Any:
    """The openai client's errors as user errors (the server's message, no traceback)."""
    import openai

    from tuneforge.errors import TuneforgeError

    try:
        return call()
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        raise TuneforgeError(f"{e.status_code}: {body.get('message', e.message)}") from None
    except openai.APIConnectionError as e:
        raise TuneforgeError(f"cannot reach the server: {e}") from None


def _cmd_jobs_list(args: argparse.Namespace) -> int:
    client = _client(args)
    jobs = _api(lambda: client.fine_tuning.jobs.list(limit=args.limit))
    for job in jobs.data:
        print(f"{job.id}\t{job.status}\t{job.model}\t{job.fine_tuned_model or '-'}")
    return 0


def _cmd_jobs_show(args: argparse.Namespace) -> int:
    client = _client(args)
    print(json.dumps(_api(lambda: client.fine_tuning.jobs.retrieve(args.job)).model_dump(), indent=2))
    return 0


def _cmd_jobs_cancel(args: argparse.Namespace) -> int:
    client = _client(args)
    print(_api(lambda: client.fine_tuning.jobs.cancel(args.job)).status)
    return 0


def _cmd_jobs_logs(args: argparse.Namespace) -> int:
    client = _client(args)
    seen: set[str] = set()
    while True:
        events = _api(lambda: list(client.fine_tuning.jobs.list_events(args.job, limit=1000)))
        for event in reversed(events):
            if event.id not in seen:
                seen.add(event.id)
                print(f"{time.strftime('%H:%M:%S', time.localtime(event.created_at))} {event.level:5} {event.message}")
        if not args.follow:
            return 0
        status = _api(lambda: client.fine_tuning.jobs.retrieve(args.job)).status
        if status in ("succeeded", "failed", "cancelled"):
            return 0 if status == "succeeded" else 1
        time.sleep(1.0)
