"""`gqa-convert uptrain MODEL_DIR --data PATH --context T (--tokens|--steps|--alpha) --output DIR`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path

from ..settings import UptrainConfig
from .flags import add_flags, settings_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "uptrain",
        help="continue pretraining a converted model on packed documents (recovers the regrouping loss)",
        description="Uptrain a converted model: documents packed into rows of exactly --context tokens, attention "
        "confined to each document, AdamW + WSD schedule. Give exactly one budget: --tokens, --steps or --alpha. "
        "Runs under `accelerate launch` / torchrun for DDP/FSDP.",
    )
    add_flags(p, UptrainConfig, positional=("model",))
    p.add_argument("--json", action="store_true", help="print the result as JSON (the run's log goes to stderr)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..fileio import FolderLock
    from ..train.uptrain import check_output_place, uptrain

    cfg = settings_from_args(UptrainConfig, args, positional=("model",))
    # One writer per --output (rank 0 of a distributed run holds it for all ranks), taken before
    # the output's checks: a second run fails at once naming the holder, the folder untouched.
    check_output_place(cfg.model, Path(cfg.output))  # before the lock file is created beside it
    lock = (
        FolderLock(Path(os.path.abspath(cfg.output)), "uptraining output")
        if int(os.environ.get("RANK", "0")) == 0
        else contextlib.nullcontext()
    )
    with lock, contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = uptrain(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=2, default=str))
        return 0
    # The held-out number when there is one (the last batch's training loss is noise), its slice named.
    loss = (
        f"held-out loss {result.eval_loss:.4f} ({result.eval_slice} of heldout.jsonl)"
        if result.eval_loss is not None
        else f"last-step train loss {result.final_loss:.4f} (no held-out evaluation: --eval-docs 0)"
    )
    print(
        f"uptrained {result.steps} steps, {result.tokens:,} tokens, {loss}, "
        f"{result.tokens_per_s:,.0f} tokens/s -> {result.output}"
    )
    return 0
