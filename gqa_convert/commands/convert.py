"""`gqa-convert convert SOURCE --kv-heads N -o DIR` and `gqa-convert models`."""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

from ..settings import ConvertSettings, RunSettings, pick
from .flags import add_flags, settings_from_args

# Top-level recipe keys this command also takes (same names, defaults and checks as the recipe).
SHARED = ("kv_heads", "q_heads", "context", "revision")
TOP = pick(RunSettings, ("source", *SHARED), optional=("context",))


def register(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="regroup a checkpoint's KV heads into fewer (mean pooling or a calibrated merge)",
        description="Write a copy of SOURCE with --kv-heads KV heads. SOURCE: folder, alias, hub id or llama2.c .bin.",
    )
    add_flags(p, RunSettings, only=("source",), positional=("source",))
    p.add_argument("--output", "-o", required=True, help="folder to create")
    add_flags(p, RunSettings, only=SHARED, optional=("context",))
    add_flags(p, ConvertSettings)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)

    m = sub.add_parser("models", help="list the model aliases convert accepts")
    m.add_argument("--json", action="store_true", help="print as JSON")
    m.set_defaults(func=run_models)


def heads_for(source: str, kv_heads, q_heads, context, revision) -> tuple[int, Optional[int]]:
    """(--kv-heads, --q-heads) as numbers: as given, or the law's recommendation at --context for
    `auto` (KV heads alone, or both counts with --q-heads auto)."""
    from ..errors import ConfigError

    if kv_heads != "auto":
        if q_heads == "auto":
            raise ConfigError("--q-heads auto needs --kv-heads auto: the law recommends both counts together")
        return int(kv_heads), q_heads
    if not context:
        raise ConfigError("--kv-heads auto needs --context (the serving context length in tokens)")
    from ..plan import recommend_heads, recommend_kv_heads
    from ..source import resolve_source

    folder = resolve_source(source, revision=revision, config_only=True)
    if q_heads == "auto":
        n_q, n_kv = recommend_heads(folder, context)
        return int(n_kv), int(n_q)
    return int(recommend_kv_heads(folder, context)), q_heads


def run(args) -> int:
    from ..convert import convert_checkpoint
    from ..settings import data_spec
    from ..train.data import TrainingDocuments

    shared = settings_from_args(TOP, args, positional=("source",))
    settings = settings_from_args(ConvertSettings, args)
    calib = None
    if settings.calib_data:  # calibrate after the held-out slice, which verify scores
        calib = TrainingDocuments(data_spec(settings.calib_data, settings, settings.heldout_docs, settings.train_start))
    kv, q = heads_for(shared.source, shared.kv_heads, shared.q_heads, shared.context, shared.revision)
    result = convert_checkpoint(
        shared.source,
        args.output,
        kv,
        method=settings.method,
        max_shard_size=settings.max_shard_size,
        overwrite=args.overwrite,
        allow_pickle=settings.allow_pickle,
        progress=args.progress and not args.json,
        revision=shared.revision,
        token=os.environ.get("HF_TOKEN") or None,
        calib_data=calib,
        calib_tokens=settings.calib_tokens,
        q_heads=q,
        q_method=settings.q_method,
        calib_device=settings.calib_device,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        o, n = result.old_shape, result.new_shape
        qs = f"query heads {o.n_heads} -> {n.n_heads}" if n.n_heads != o.n_heads else f"{o.n_heads} query heads"
        print(
            f"wrote {result.output}: {result.family}, KV heads {o.n_kv} -> {n.n_kv} ({qs}, "
            f"head_dim {o.head_dim}), method {result.method}; {result.tensors_changed} tensors regrouped, "
            f"{result.tensors_copied} copied, {result.bytes_written / 1e6:.1f} MB in {len(result.weight_files)} file(s)"
        )
    return 0


def run_models(args) -> int:
    from dataclasses import asdict

    from ..source import aliases

    rows = list(aliases().values())
    if args.json:
        print(json.dumps([asdict(a) for a in rows], indent=2))
        return 0
    print(f"{'alias':<17} {'repo':<36} {'family':<11} {'heads':>5} {'kv':>4} {'pretrain tokens':>15}  licence")
    for a in rows:
        tokens = f"{a.pretraining_tokens / 1e12:g}T" if a.pretraining_tokens else "unknown"
        heads = f"{a.heads or '?':>5} {a.kv_heads or '?':>4}"
        print(f"{a.name:<17} {a.repo:<36} {a.family:<11} {heads} {tokens:>15}  {a.licence or '?'}")
    return 0
