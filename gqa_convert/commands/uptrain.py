"""`gqa-convert uptrain MODEL_DIR --data PATH --context T (--tokens|--steps|--alpha) --output DIR`."""

from __future__ import annotations

import os

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
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train.uptrain import uptrain

    result = uptrain(settings_from_args(UptrainConfig, args, positional=("model",)))
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"uptrained {result.steps} steps, {result.tokens:,} tokens, final train loss {result.final_loss:.4f}, "
            f"{result.tokens_per_s:,.0f} tokens/s -> {result.output}"
        )
    return 0
