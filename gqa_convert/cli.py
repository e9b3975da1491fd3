"""`gqa-convert` command line: a thin layer over the library functions.

Each subcommand lives in its own module that exposes `register(subparsers)`; the parser it adds
sets `func` to a callable taking the parsed args and returning an exit code. Errors derived from
GqaConvertError are printed as one line and turned into a non-zero exit.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from . import __version__
from .errors import GqaConvertError

# Module names under gqa_convert/ whose `register` adds a subcommand.
COMMAND_MODULES = [
    "convert",  # convert, models
    "law.commands",  # law optimize|table|fit|eval
    "plan",  # plan
    "train.commands",  # uptrain
    "verify",  # verify
    "hub",  # push
    "pipeline",  # run RECIPE.yaml, and the default `gqa-convert MODEL ...`
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gqa-convert",
        description="Convert Hugging Face causal LMs to cost-optimal grouped-query attention.",
    )
    parser.add_argument("--version", action="version", version=f"gqa-convert {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"gqa_convert.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # `gqa-convert MODEL --kv-heads N ...` (no subcommand) runs the whole pipeline.
    known = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    if argv and not argv[0].startswith("-") and argv[0] not in known:
        argv = ["pipeline", *argv]
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except GqaConvertError as err:
        print(f"gqa-convert: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        where = f" {err.filename}" if err.filename else ""
        print(
            f"gqa-convert: error: cannot write{where}: {err.strerror}; free space or choose a writable "
            "folder, then re-run the same command (completed work is kept, partial output was discarded)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("gqa-convert: interrupted; re-run the same command to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
