"""``tuneforge registry list | show NAME [VERSION] | alias NAME VERSION ALIAS``: the model registry from a shell.

Every command works on the embedded MLflow store unless ``--tracking-uri`` names another; an unknown name,
version or alias is an ``error: …`` line (with the nearest match) and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

SHOWN_TAGS = ("method", "adapter", "base_model")


def add_commands(sub: Any) -> None:
    """Register ``registry`` on the top-level subparsers of ``tuneforge``."""
    p = sub.add_parser("registry", help="registered model versions: list, show, alias")
    rsub = p.add_subparsers(dest="registry_command", required=True, metavar="SUBCOMMAND")

    q = rsub.add_parser("list", help="registered models with their latest version and aliases")
    _common(q)
    q.set_defaults(fn=_cmd_list)

    q = rsub.add_parser("show", help="a model's versions, or one version's lineage tags as JSON")
    q.add_argument("name")
    q.add_argument("version", nargs="?", help="a version number, an alias or 'latest' (default: list the versions)")
    _common(q)
    q.set_defaults(fn=_cmd_show)

    q = rsub.add_parser("alias", help="point an alias (staging, production…) at a version")
    q.add_argument("name")
    q.add_argument("version")
    q.add_argument("alias")
    _common(q)
    q.set_defaults(fn=_cmd_alias)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: the embedded one)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _cmd_list(args: argparse.Namespace) -> int:
    from tuneforge.tracking.registry import list_models

    models = list_models(args.tracking_uri)
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    if not models:
        print("no registered models yet (every successful run with tracking on registers one)")
        return 0
    rows = [
        (
            m["name"],
            str(m["versions"]),
            m["latest"] or "-",
            ", ".join(f"{a}→{v}" for a, v in m["aliases"].items()) or "-",
            _when(m["updated"]),
        )
        for m in models
    ]
    _table(("name", "versions", "latest", "aliases", "updated"), rows)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from tuneforge.tracking.registry import get_version, versions

    if args.version is None:
        found = versions(args.name, args.tracking_uri)
        if args.json:
            print(json.dumps([v.as_dict() for v in found], indent=2))
            return 0
        rows = [
            (v.version, ", ".join(v.aliases) or "-", _when(v.created), *(v.tags.get(k, "-") for k in SHOWN_TAGS))
            for v in found
        ]
        _table(("version", "aliases", "created", *SHOWN_TAGS), rows)
        return 0
    spec = args.version.removeprefix("@")
    if spec.isdigit() or spec == "latest":
        info = get_version(args.name, None if spec == "latest" else spec, uri=args.tracking_uri)
    else:
        info = get_version(args.name, alias=spec, uri=args.tracking_uri)
    print(json.dumps({**info.as_dict(), "created": _when(info.created)}, indent=2, sort_keys=False))
    return 0


def _cmd_alias(args: argparse.Namespace) -> int:
    from tuneforge.errors import TuneforgeError
    from tuneforge.tracking.registry import set_alias

    if not args.version.isdigit():
        raise TuneforgeError(f"registry alias: VERSION must be a version number, got {args.version!r}")
    info = set_alias(args.name, args.version, args.alias, args.tracking_uri)
    if args.json:
        print(json.dumps(info.as_dict(), indent=2))
    else:
        print(f"models:/{info.name}@{args.alias} → version {info.version}")
    return 0


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else "-"


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
