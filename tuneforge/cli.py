"""The ``tuneforge`` command: a thin layer over the Python API.

Every user-fixable problem is a :class:`~tuneforge.errors.TuneforgeError` and is printed as a plain message
with a non-zero exit code — never a traceback. Heavy imports happen inside the commands, so ``--help`` and
``data validate`` start fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tuneforge.data.formats import FORMATS
from tuneforge.errors import TuneforgeError


def _cmd_train(args: argparse.Namespace) -> int:
    from tuneforge.api import train
    from tuneforge.config import load_recipe

    recipe = load_recipe(args.recipe, [*args.set, *(["data.verify=true"] if args.verify else [])])
    resume = args.resume
    if resume == "latest":
        if not recipe.output.dir:
            raise TuneforgeError("--resume without a path needs output.dir in the recipe (or pass the run directory)")
        resume = recipe.output.dir
    result = train(
        recipe,
        resume=resume,
        progress=not args.quiet,
        replicas=args.replicas,
        fault_plan=args.fault_plan,
        force=args.force,
    )
    summary = {"run_dir": str(result.run_dir), "output_dir": str(result.output_dir), "metrics": result.metrics}
    if result.model_version:
        summary["model_version"] = result.model_version
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_scale(args: argparse.Namespace) -> int:
    from tuneforge.distributed import scale

    scale(args.run, args.replicas)
    print(f"asked {args.run} to run on {args.replicas} replica(s)")
    return 0


def _cmd_recipe_show(args: argparse.Namespace) -> int:
    from tuneforge.config import load_recipe, recipe_yaml

    print(recipe_yaml(load_recipe(args.recipe, args.set)), end="")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    """The method registry as a table: what each method trains on, its recipe section, where it runs."""
    from tuneforge.methods import METHODS

    rows = [
        (m.name, " / ".join(m.formats), m.section or "-", "yes" if m.elastic else "no", m.summary)
        for m in METHODS.values()
    ]
    head = ("method", "data formats", "section", "elastic", "")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    return 0


def _cmd_data_validate(args: argparse.Namespace) -> int:
    from tuneforge.data.validate import validate_file

    token_length = None
    if args.model:
        token_length = _token_length_fn(args.model, args.chat_template)
    report = validate_file(
        args.file,
        args.format,
        token_length=token_length,
        max_tokens=args.max_length if args.model else None,
        keep_examples=False,  # only the issues are printed: memory stays bounded on any file
    )
    for issue in report.issues:
        print(issue)
    print(report.summary(), file=sys.stderr if report.issues else sys.stdout)
    return 1 if report.issues else 0  # any reported problem (a bad record, an empty file) fails


def _token_length_fn(model: str, chat_template: str | None) -> Any:
    from tuneforge.data.templates import render_chat
    from tuneforge.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model, chat_template)

    def length(example: dict) -> int:
        if "text" in example:
            return len(tokenizer(example["text"], add_special_tokens=False)["input_ids"]) + 2
        if "messages" in example:
            text = render_chat(tokenizer, example["messages"], tokenizer.chat_template)
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return 0

    return length


def _cmd_export(args: argparse.Namespace) -> int:
    from tuneforge.api import export

    out = export(args.run, args.out, merge=args.merge, base=args.base)
    print(out)
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    from tuneforge.paths import default_tracking_uri
    from tuneforge.tracking.ui import run_ui

    return run_ui(args.uri or default_tracking_uri(), host=args.host, port=args.port)


def _cmd_demo(args: argparse.Namespace) -> int:
    from tuneforge.demo.run import run_demo

    run_demo(quick=args.quick, rebuild=args.rebuild)
    return 0


def _cmd_grader_run(args: argparse.Namespace) -> int:
    from tuneforge.rewards.cli import grader_cli

    return grader_cli(args.grader, args.item, args.sample)


def _cmd_constitutional(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tuneforge.rewards.constitutional import (
        Settings,
        build_model_client,
        load_principles,
        read_prompts,
        run_constitutional,
    )

    # Cheap checks first (constitution, flags, every prompt record), so a typo costs no model load.
    principles = load_principles(args.principles)
    settings = Settings(
        revisions=args.revisions,
        seed=args.seed,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        concurrency=args.concurrency,
    )
    settings.check(len(principles))
    prompts = read_prompts(args.prompts)
    client = build_model_client(args.model, base_url=args.base_url, api_key_env=args.api_key_env)
    source = Path(args.prompts)
    out = args.out or str(source.with_name(f"{source.stem}.pairs.jsonl"))
    summary = run_constitutional(
        prompts,
        out,
        client,
        principles,
        settings,
        critiques=args.critiques,
        overwrite=args.overwrite,
        source=args.prompts,
    )
    print(summary.render())
    return 0 if summary.written + summary.resumed or not summary.prompts else 1


def _revisions(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of principles or 'all', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description="Customise open LLMs on your own hardware.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a recipe")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. train.lr=1e-4"
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="RUN_OR_CHECKPOINT",
        help="continue exactly from the newest checkpoint (of output.dir, or of the given path)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--verify", action="store_true", help="re-hash the data files instead of trusting size + mtime")
    p.add_argument(
        "--replicas",
        metavar="MIN:MAX",
        default=None,
        help="elastic, fault-tolerant data-parallel replicas (torchft), e.g. 2:8",
    )
    p.add_argument(
        "--fault-plan",
        default=None,
        metavar="PLAN",
        help="inject failures: 'kill:1@10' (replica 1 at step 10), 'hang:0@25s', a JSON/YAML file…",
    )
    p.add_argument("--force", action="store_true", help="train even when the memory forecast says it will not fit")
    p.set_defaults(fn=_cmd_train)

    p = sub.add_parser("plan", help="resolve every auto value, explain it, forecast peak memory and time")
    from tuneforge.planning.cli import add_arguments as add_plan_arguments

    add_plan_arguments(p)

    p = sub.add_parser("scale", help="change the number of replicas of a running elastic job")
    p.add_argument("run", help="run directory or name")
    p.add_argument("replicas", type=int)
    p.set_defaults(fn=_cmd_scale)

    p = sub.add_parser("lighthouse", help="run the torchft lighthouse for a job across several machines")
    from tuneforge.distributed.lighthouse import add_serve_arguments, serve_from_args

    add_serve_arguments(p)
    p.set_defaults(fn=serve_from_args)

    p = sub.add_parser("methods", help="list the training methods and what each trains on")
    p.set_defaults(fn=_cmd_methods)

    p = sub.add_parser("recipe", help="work with recipes")
    rsub = p.add_subparsers(dest="recipe_command", required=True, metavar="SUBCOMMAND")
    q = rsub.add_parser("show", help="print the fully resolved recipe with every default filled in")
    q.add_argument("recipe")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    q.set_defaults(fn=_cmd_recipe_show)

    p = sub.add_parser("data", help="work with data files")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    q = dsub.add_parser("validate", help="report every bad record as FILE:LINE: field: problem")
    q.add_argument("file")
    q.add_argument("--format", default="auto", choices=["auto", *FORMATS])
    q.add_argument("--model", help="tokenizer (model dir) to check lengths with")
    q.add_argument("--chat-template", default=None)
    q.add_argument("--max-length", type=int, default=2048)
    q.set_defaults(fn=_cmd_data_validate)
    from tuneforge.data.preview import add_preview_arguments, preview_from_args

    q = dsub.add_parser("preview", help="show each record as training renders it, supervised tokens marked")
    add_preview_arguments(q)
    q.set_defaults(fn=preview_from_args)

    p = sub.add_parser("export", help="export a run's result (merge an adapter into full weights)")
    p.add_argument("run", help="run directory or adapter directory")
    p.add_argument("--out", required=True)
    p.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--base", default=None, help="base model (default: the one recorded in the adapter)")
    p.set_defaults(fn=_cmd_export)

    p = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--uri", default=None, help="tracking URI (default: the embedded SQLite store)")
    p.set_defaults(fn=_cmd_ui)

    p = sub.add_parser("demo", help="build a base model, fine-tune it with and without data mixing, compare")
    p.add_argument("--quick", action="store_true", help="a much smaller run, for smoke tests")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached base model")
    p.set_defaults(fn=_cmd_demo)

    from tuneforge.service.cli import add_commands as add_service_commands

    add_service_commands(sub)  # server, keys, models, jobs
    from tuneforge.eval.cli import add_commands as add_eval_commands

    add_eval_commands(sub)  # eval, compare
    from tuneforge.tracking.cli import add_commands as add_registry_commands

    add_registry_commands(sub)  # registry list|show|alias
    from tuneforge.serve.cli import add_commands as add_serve_commands

    add_serve_commands(sub)  # serve, deploy

    p = sub.add_parser("grader", help="test a reward grader")
    gsub = p.add_subparsers(dest="grader_command", required=True, metavar="SUBCOMMAND")
    q = gsub.add_parser("run", help="grade one sample against one item")
    q.add_argument("grader", help="grader JSON file")
    q.add_argument("--item", required=True, help="item JSON, or @file")
    q.add_argument("--sample", required=True, help="sample JSON (or plain output text), or @file")
    q.set_defaults(fn=_cmd_grader_run)

    p = sub.add_parser(
        "constitutional",
        help="Constitutional AI: the model answers, critiques and revises; write (revised, original) DPO pairs",
    )
    p.add_argument(
        "prompts",
        metavar="PROMPTS",
        help="prompt records (messages ending with a user turn, a chat "
        "whose last answer is dropped, or {prompt, completion})",
    )
    p.add_argument("--model", required=True, help="local Hugging Face model directory, or a model name at the endpoint")
    p.add_argument("--base-url", default=None, help="any OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument(
        "--api-key-env",
        default=None,
        metavar="VAR",
        help="environment variable holding the API key (default: $OPENAI_API_KEY; none for a local endpoint)",
    )
    p.add_argument(
        "--principles",
        default=None,
        metavar="FILE",
        help="constitution YAML/JSON (default: the shipped tuneforge/rewards/constitution.yaml)",
    )
    p.add_argument("--out", default=None, help="output JSONL of DPO pairs (default: PROMPTS' name + .pairs.jsonl)")
    p.add_argument(
        "--revisions",
        type=_revisions,
        default=1,
        metavar="K",
        help="principles per prompt, drawn with --seed; 'all' for every principle in order (default 1)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=512, help="per model reply")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--concurrency", type=int, default=8, help="endpoint requests in flight (a local model uses 1)")
    p.add_argument(
        "--critiques",
        default=None,
        metavar="FILE",
        help="also write every exchange (critiques, revisions, skip reasons) as JSONL for inspection",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh instead of skipping prompts whose pair is already in --out",
    )
    p.set_defaults(fn=_cmd_constitutional)
    return parser


def _version() -> str:
    from tuneforge import __version__

    return f"tuneforge {__version__}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except TuneforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
