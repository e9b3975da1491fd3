"""`gqa-convert plan SOURCE --context T`: every feasible KV-head count and the law's recommendation."""

from __future__ import annotations

import json

from ..settings import RunSettings, pick
from .flags import add_flags, settings_from_args

SHARED = ("source", "context", "revision", "max_loss_increase", "law")
TOP = pick(RunSettings, SHARED)


def register(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="list KV-head options for a model at a context length and recommend one",
        description="For each feasible KV-head count: the law's predicted loss change, KV-cache "
        "bytes and FLOPs per token at the context, and the recommended count (least cost within "
        "--max-loss-increase). Reads the config only, never weights.",
    )
    add_flags(p, RunSettings, only=SHARED, positional=("source",))
    p.add_argument("--dtype", default="bf16", help="KV-cache dtype for byte counts (default: bf16)")
    p.add_argument("--json", action="store_true", help="print JSON: one entry per option and a `recommended` entry")
    p.add_argument("--plot", help="write a PNG of predicted loss against KV memory and FLOPs")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..law.loss import load_law
    from ..law.shapes import load_shape
    from ..plan import format_plan, plan_conversion, write_plot
    from ..source import resolve_source

    s = settings_from_args(TOP, args, positional=("source",))
    shape = load_shape(resolve_source(s.source, revision=s.revision, config_only=True))
    plan = plan_conversion(
        shape,
        s.context,
        max_loss_increase=s.max_loss_increase,
        dtype=args.dtype,
        law=load_law(s.law) if s.law else None,
        source=s.source,
    )
    if args.plot:
        write_plot(plan, args.plot)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_plan(plan))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0
