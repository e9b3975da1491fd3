"""`gqa-convert plan SOURCE --context T`: every feasible KV-head count and the law's recommendation."""

from __future__ import annotations

import json

from ..settings import HardwareSettings, RunSettings, UptrainSettings, pick
from .flags import SEP, add_flags, settings_from_args

SHARED = ("source", "context", "revision", "max_loss_increase", "law", "kv_heads", "q_heads")
TOP = pick(RunSettings, SHARED, optional=("kv_heads",))
# The uptraining settings the memory planner reads (recipe: uptrain.*), as flags of the same names.
UPTRAIN = (
    "train",
    "lora",
    "lora_rank",
    "batch_size",
    "grad_accum",
    "gradient_checkpointing",
    "distill",
    "distill_weight",
    "tokens",
    "attn",
    "loss_chunk_tokens",
)
UP = pick(UptrainSettings, UPTRAIN)


def register(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="list KV-head options for a model at a context length and recommend one",
        description="For each feasible KV-head count: the law's predicted loss change, KV-cache "
        "bytes and FLOPs per token at the context, and the recommended count (least cost within "
        "--max-loss-increase). Reads the config only, never weights.",
    )
    add_flags(p, RunSettings, only=SHARED, positional=("source",), optional=("kv_heads",))
    hw = p.add_argument_group("uptraining memory and time (the planner; recipe: hardware.*, uptrain.*)")
    add_flags(hw, HardwareSettings)
    add_flags(hw, UptrainSettings, only=UPTRAIN, prefix="uptrain" + SEP)
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
    hw = settings_from_args(HardwareSettings, args)
    up = settings_from_args(UP, args, prefix="uptrain" + SEP)
    shape = load_shape(resolve_source(s.source, revision=s.revision, config_only=True))
    plan = plan_conversion(
        shape,
        s.context,
        max_loss_increase=s.max_loss_increase,
        dtype=args.dtype,
        law=load_law(s.law) if s.law else None,
        source=s.source,
    )
    from ..memory import format_memory_plan
    from ..pipeline.stages import memory_plan

    kv = plan.recommended.kv_heads if s.kv_heads in (None, "auto") else int(s.kv_heads)
    full = UptrainSettings(**up.model_dump())
    memory = memory_plan(shape, s.context, full, hw, converted_heads=(s.q_heads or shape.n_heads, kv))
    if args.plot:
        write_plot(plan, args.plot)
    if args.json:
        print(json.dumps({**plan.to_dict(), "memory": memory.to_dict()}, indent=2))
    else:
        print(format_plan(plan))
        print(f"\nuptraining {shape.n_heads}/{shape.n_kv} -> {s.q_heads or shape.n_heads}/{kv} heads at T={s.context}:")
        print(format_memory_plan(memory))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0
