"""`gqa-convert eval MODEL --context T [--source SRC]`: long-context retrieval, before and after."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..settings import EvalSettings, RunSettings, pick
from .flags import add_flags, settings_from_args

TOP = pick(RunSettings, ("context",))


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="long-context retrieval (passkey probe, RULER) of a model, and of its source on the same prompts",
        description="Accuracy by task x length: the built-in passkey probe (needle depth x length) and RULER's "
        "offline tasks through lm-evaluation-harness (pip install 'gqa-convert[eval]'). With --source, the "
        "source is scored on identical prompts and the ratio reported. Writes MODEL/retrieval.json and "
        "retrieval.png (the heat map) unless --no-write.",
    )
    p.add_argument("model", metavar="MODEL", help="model folder (converted or any local Hugging Face folder)")
    p.add_argument("--source", default=None, help="the source checkpoint to compare with (folder, alias or hub id)")
    add_flags(p, RunSettings, only=("context",))
    add_flags(p, EvalSettings)
    p.add_argument(
        "--write",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write retrieval.json and retrieval.png into MODEL",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ConfigError
    from ..evals.report import format_report, retrieval_report
    from ..records import RetrievalRecord
    from ..source import resolve_source

    top = settings_from_args(TOP, args)
    s = settings_from_args(EvalSettings, args)
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise ConfigError(f"{model} is not a model folder (no config.json); give a local Hugging Face model folder")
    folders = {}
    if args.source:
        folders["source"] = resolve_source(args.source)
        if Path(folders["source"]).resolve() == model.resolve():  # a ratio of 1 that compares nothing
            raise ConfigError(f"--source {str(args.source)[:80]} is MODEL itself; pass the unconverted checkpoint")
    folders["converted"] = model
    report = retrieval_report(folders, s, top.context, plot_dir=model if args.write else None)
    if args.write:
        RetrievalRecord(model=model.name, source=Path(args.source).name if args.source else None, report=report).write(
            model
        )
    print(report.model_dump_json(indent=2) if args.json else format_report(report))
    return 0
