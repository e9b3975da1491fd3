"""`gqa-convert` command line, apart from the library.

Each command module adds its subparser (`register`) with flags generated from the settings
models and imports the library, torch and transformers only inside `run`, so `gqa-convert --help`
and `gqa-convert COMMAND --help` load no ML stack. Errors derived from GqaConvertError are printed
as one line and turned into a non-zero exit.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import Optional

from .. import __version__
from ..errors import GqaConvertError
from . import card, convert, law, pipeline, plan, push, uptrain, verify
from . import eval as eval_command

# In the order `--help` lists them.
COMMANDS = [pipeline, convert, plan, uptrain, verify, eval_command, card, push, law]


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (not the usage block and then the error)."""

    def error(self, message: str):  # type: ignore[override]
        line = " ".join(message.split())
        line = line if len(line) <= 300 else line[:297] + "..."
        where = self.prog.removeprefix("gqa-convert").strip()
        self.exit(2, f"gqa-convert: error: {where + ': ' if where else ''}{line} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gqa-convert",
        description="Convert Hugging Face causal LMs to cost-optimal grouped-query attention. "
        "`gqa-convert MODEL --kv-heads N --context T ...` runs every stage (see `gqa-convert pipeline --help`).",
    )
    parser.add_argument("--version", action="version", version=f"gqa-convert {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an internal error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def _short(text: object, limit: int = 200) -> str:
    line = (str(text).splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _save_traceback() -> str:
    """The current exception's traceback in a log file (never the message alone: it may be long)."""
    import tempfile
    import traceback

    # The XDG spec: an empty or relative XDG_CACHE_HOME is ignored (an empty one put the logs in
    # the current folder); then the temp folder; and if nothing is writable, the line says so.
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    try:
        base = (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "gqa-convert" / "logs"
        base.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="error-", suffix=".log", dir=base)
    except (OSError, RuntimeError):  # RuntimeError: no home directory
        try:
            fd, path = tempfile.mkstemp(prefix="gqa-convert-error-", suffix=".log")
        except OSError:
            return "nowhere (no writable cache or temp folder)"
    with os.fdopen(fd, "w") as fh:
        fh.write(" ".join(sys.argv) + "\n\n" + traceback.format_exc())
    return path


def _rerun(args: argparse.Namespace) -> str:
    """How to continue: the same command, except that an uptraining run continues with --resume."""
    out = getattr(args, "output", None)
    if getattr(args, "command", None) == "uptrain" and not getattr(args, "resume", False) and out:
        if (Path(out) / "uptrain_config.json").is_file():  # the run started: it continues from its checkpoint
            return "re-run the same command with --resume"
    return "re-run the same command"


_DISK_FULL = ("no space left on device", "storagefull", "os error 28", "disk quota exceeded", "errno 28")


def _disk_full(err: BaseException) -> bool:
    """ENOSPC anywhere in the chain, or in the message of a writer that wraps it (safetensors'
    `IoError(Os { code: 28, kind: StorageFull })`, torch's `PytorchStreamWriter failed writing file`)."""
    seen: set[int] = set()
    e: Optional[BaseException] = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e).lower()
        if any(k in text for k in _DISK_FULL):
            return True
        e = e.__cause__ or e.__context__
    return False


def quiet_transformers() -> None:
    """transformers' own "Loading weights" / "Writing model shards" bars: off, our commands show
    their own progress, and a failing command should print its one line, not bars before it."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def quiet_deepspeed() -> None:
    """DeepSpeed (the [sp] extra), which accelerate imports whenever a model is saved, warns on
    stderr at every CPU-only start that it found no accelerator: tell it the answer instead, so a
    command's stderr is its own. Only where CUDA is absent; a DS_ACCELERATOR of the user's stays."""
    import importlib.util

    if "DS_ACCELERATOR" in os.environ or importlib.util.find_spec("deepspeed") is None:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # inherited by torchrun's workers too


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # `gqa-convert MODEL --kv-heads N ...` (no subcommand) runs the whole pipeline.
    if argv and not argv[0].startswith("-") and argv[0] not in _subcommands(parser):
        argv = ["pipeline", *argv]
    if any("\x00" in a for a in argv):  # os calls refuse it with a ValueError deep inside a command
        print("gqa-convert: error: an argument contains a NUL byte, which no path or value can hold", file=sys.stderr)
        return 2
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    if argv[:1] == ["run"] and "--json" in argv:  # `run RECIPE --json k=v`: argparse would stop the
        argv.remove("--json")  # key=value list at the flag and refuse what follows it
        argv.append("--json")
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error (printed as one line)
        return done.code if isinstance(done.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if getattr(args, "command", None) not in (None, "law", "models", "plan", "card", "push"):
            quiet_transformers()  # commands that load models
            quiet_deepspeed()
        return int(args.func(args) or 0)
    except GqaConvertError as err:
        print(f"gqa-convert: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        where = f" {_short(err.filename)}" if err.filename else ""
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "the disk is full: free space there or choose a folder on another disk"
        elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            fix = "choose a writable folder"
        elif err.errno in (errno.EEXIST, errno.ENOTDIR):  # a file where a folder must be (or be created)
            fix = "a file is in the way of a folder there: choose another path"
        else:
            fix = "check the path"
        print(
            f"gqa-convert: error: cannot use{where}: {err.strerror or type(err).__name__}; {fix}, then "
            f"{_rerun(args)} (completed work is kept, partial output was discarded)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"gqa-convert: interrupted; {_rerun(args)} to resume.", file=sys.stderr)
        return 130
    except Exception as err:  # a bug of ours: one line, the traceback kept where it can be read
        if _disk_full(err):  # a writer outside Python's I/O (safetensors, torch.save) that reports ENOSPC its way
            print(
                "gqa-convert: error: the disk is full (no space left on device while writing); free space or "
                f"choose an output on another disk, then {_rerun(args)} (completed work is kept)",
                file=sys.stderr,
            )
            return 2
        if isinstance(err, ValueError) and "null byte" in str(err):  # a NUL in a path from a recipe or data spec
            print("gqa-convert: error: a path contains a NUL byte; remove it from the recipe or value", file=sys.stderr)
            return 2
        if debug:
            raise
        log = _save_traceback()
        print(
            f"gqa-convert: internal error: {type(err).__name__}: {_short(str(err))}; this is a bug — the "
            f"traceback is in {log} (or re-run with --debug); please report it",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
