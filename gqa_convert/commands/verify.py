"""`gqa-convert verify MODEL --data TEXT --context T`: measure, and check against the law."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

from ..settings import RunSettings, VerifySettings, is_repo_id, pick
from .flags import add_flags, settings_from_args

SHARED = ("context", "law")
TOP = pick(RunSettings, SHARED)


def register(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="measure loss and costs of a converted model and check them against the law",
        description="Measure source and converted loss/perplexity on the same held-out documents at context T, "
        "the converted model's KV-cache bytes and FLOPs per token, and compare with the law and the cost "
        "model. Writes MODEL/verification.json and README.md. Exit 0 pass, 1 fail.",
    )
    p.add_argument("model", metavar="MODEL", help="converted model folder")
    p.add_argument("--source", default=None, help="source checkpoint (default: the one recorded by convert)")
    add_flags(p, RunSettings, only=SHARED)
    add_flags(p, VerifySettings, require=("data",))
    p.add_argument("--card", action=argparse.BooleanOptionalAction, default=True, help="(re)write README.md")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def _public(spec: Optional[str]) -> Optional[str]:
    """A hub id as given; a local path reduced to its name (the record is published)."""
    if spec is None:
        return None
    return spec if is_repo_id(spec) and not Path(spec).exists() else Path(spec).name


def run(args) -> int:
    from ..errors import VerificationFailed
    from ..fileio import FolderLock
    from ..verify import format_table, verify_model

    top = settings_from_args(TOP, args)
    s = settings_from_args(VerifySettings, args)
    assert s.data is not None  # required by the parser
    public = s.model_copy(update={"data": _public(s.data)})
    command = " ".join(
        [
            "gqa-convert verify",
            shlex.quote(_public(args.model) or ""),
            *(["--source", shlex.quote(_public(args.source) or "")] if args.source else []),
            "--context",
            str(top.context),
            *(["--law", shlex.quote(_public(top.law) or "")] if top.law else []),
        ]
    ) + _flags(public)
    # One writer of MODEL's verification.json and README.md at a time: a second verify of the same
    # folder fails at once naming the holder, instead of racing the first one's files.
    # (Only an existing folder: a mistyped MODEL gets verify_model's one line, no folders created.)
    model = Path(os.path.abspath(args.model))
    with FolderLock(model, "model folder") if model.is_dir() else contextlib.nullcontext():
        report = verify_model(
            Path(args.model),
            args.source,
            s.data,
            top.context,
            settings=s,
            law_path=top.law,
            card=args.card,
            command=command,
        )
    print(report.model_dump_json(indent=2) if args.json else format_table(report))
    if not report.passed:
        print("gqa-convert: verification failed: " + "; ".join(report.reasons), file=sys.stderr)
        return VerificationFailed.exit_code
    return 0


def _flags(s: VerifySettings) -> str:
    from ..settings import command_line

    return command_line("verify", s, skip=("device", "batch_size")).removeprefix("gqa-convert verify")
