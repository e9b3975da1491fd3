"""`gqa-convert` command line, apart from the library.

Each command module adds its subparser (`register`) with flags generated from the settings
models and imports the library, torch and transformers only inside `run`, so `gqa-convert --help`
and `gqa-convert COMMAND --help` load no ML stack. Errors derived from GqaConvertError are printed
as one line and turned into a non-zero exit.
"""

from __future__ import annotations

import argparse
import errno
import sys
from typing import Optional

from .. import __version__
from ..errors import GqaConvertError
from . import card, convert, law, pipeline, plan, push, uptrain, verify

# In the order `--help` lists them.
COMMANDS = [pipeline, convert, plan, uptrain, verify, card, push, law]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gqa-convert",
        description="Convert Hugging Face causal LMs to cost-optimal grouped-query attention. "
        "`gqa-convert MODEL --kv-heads N --context T ...` runs every stage (see `gqa-convert pipeline --help`).",
    )
    parser.add_argument("--version", action="version", version=f"gqa-convert {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # `gqa-convert MODEL --kv-heads N ...` (no subcommand) runs the whole pipeline.
    if argv and not argv[0].startswith("-") and argv[0] not in _subcommands(parser):
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
