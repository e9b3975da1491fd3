"""The pipeline's stage bodies: each a thin call into the library function of its stage.

Each takes the RunContext and returns the small dict of outputs that later stages (and a later
run that skips this stage) read back from state.json.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

from .errors import ConfigError
from .pipeline import RunContext, _link_final_model


def _source_dir(ctx: RunContext, *, config_only: bool = False) -> Path:
    """The source as a local folder, resolved once per run (config only for the plan stage)."""
    from .source import resolve_source

    if ctx.source_dir is not None:
        return ctx.source_dir
    r = ctx.recipe
    folder = resolve_source(r.source, revision=r.revision, config_only=config_only, allow_pickle=r.convert.allow_pickle)
    if not config_only:
        ctx.source_dir = folder
    return folder


def plan(ctx: RunContext, *, resuming: bool = False) -> dict:
    from .plan import format_plan, plan_conversion, write_plot
    from .source import load_config

    r = ctx.recipe
    out = ctx.run_dir / "plan"
    out.mkdir(exist_ok=True)
    kwargs = {"max_loss_increase": r.max_loss_increase} if r.max_loss_increase is not None else {}
    if r.law:
        from .law.loss import load_law

        kwargs["law"] = load_law(r.law)
    p = plan_conversion(load_config(_source_dir(ctx, config_only=True)), r.context_tokens, source=r.source, **kwargs)
    (out / "plan.json").write_text(json.dumps(p.to_dict(), indent=2, default=str) + "\n")
    write_plot(p, out / "plan.png")
    ctx.log(format_plan(p))
    kv = p.recommended.kv_heads if r.kv_heads == "auto" else int(r.kv_heads)
    if r.kv_heads == "auto":
        ctx.log(f"[plan] --kv-heads auto: the law recommends {kv} KV heads at T={r.context_tokens}")
    return {"kv_heads": kv, "recommended_kv_heads": p.recommended.kv_heads, "plan": str(out / "plan.json")}


def convert(ctx: RunContext, *, resuming: bool = False) -> dict:
    from .convert import convert_checkpoint

    r = ctx.recipe
    target = ctx.run_dir / "converted"
    res = convert_checkpoint(
        _source_dir(ctx), target, ctx.outputs["plan"]["kv_heads"], method=r.convert.method,
        max_shard_size=r.convert.max_shard_size, overwrite=True, allow_pickle=r.convert.allow_pickle,
        calib_data=_calibration_text(r) if r.convert.method != "mean" else None,
        calib_tokens=r.convert.calib_tokens,
    )
    _link_final_model(ctx, target)
    ctx.log(f"[convert] {res.family}: {res.old_shape.n_kv} -> {res.new_shape.n_kv} KV heads ({res.method}), "
            f"written to {target}")
    return {"model": str(target), "old_kv": res.old_shape.n_kv, "new_kv": res.new_shape.n_kv, "method": res.method}


def _calibration_text(r):
    """convert.calib_data, else the uptraining documents after the held-out slice (never the
    documents verification scores), else None (then `auto` means mean pooling)."""
    if r.convert.calib_data:
        return r.convert.calib_data
    data = r.uptrain.data if r.uptrain.enabled else None
    if data is None:
        return None
    from .train.data import DataSpec

    return DataSpec(data, heldout=max(r.uptrain.heldout_docs, r.verify.heldout_docs)).training_documents()


def uptrain(ctx: RunContext, *, resuming: bool = False) -> dict:
    r = ctx.recipe
    if not r.uptrain.enabled:
        _link_final_model(ctx, Path(ctx.outputs["convert"]["model"]))
        return {"model": ctx.outputs["convert"]["model"], "skipped": True}
    from .train.uptrain import UptrainConfig, uptrain as run_uptrain

    u = r.uptrain
    target = ctx.run_dir / "uptrain"
    # Same settings and a checkpoint on disk: continue. Otherwise the folder holds a run of other
    # settings (or one killed before its first checkpoint): start over.
    resume = resuming and any((target / d).is_dir() for d in ("checkpoint", "checkpoint.old"))
    if not resume and target.exists():
        shutil.rmtree(target)
    cfg = UptrainConfig(
        model=ctx.outputs["convert"]["model"], data=u.data, context=r.context_tokens, output=str(target),
        tokens=u.tokens, steps=u.steps, alpha=u.alpha, pretraining_tokens=u.pretraining_tokens,
        text_field=u.text_field, heldout_docs=u.heldout_docs, lr=u.lr, batch_size=u.batch_size,
        grad_accum=u.grad_accum, warmup=u.warmup, decay=u.decay, weight_decay=u.weight_decay, clip=u.clip,
        train=u.train, distill_from=str(_source_dir(ctx)) if u.distill_weight > 0 else None,
        distill_weight=u.distill_weight, lora=u.lora, lora_rank=u.lora_rank, attn=u.attn,
        gradient_checkpointing=u.gradient_checkpointing or None, save_every=u.save_every,
        seed=u.seed, resume=resume,
    )
    res = run_uptrain(cfg)
    _link_final_model(ctx, res.output)
    return {"model": str(res.output), "steps": res.steps, "tokens": res.tokens, "final_loss": res.final_loss}


def verify(ctx: RunContext, *, resuming: bool = False) -> dict:
    from .verify import format_table, verify_model

    r = ctx.recipe
    data = r.verify.data or r.uptrain.data
    if data is None:
        raise ConfigError("verify needs held-out text: set verify.data (or uptrain.data) in the recipe, or --data")
    kwargs = {"tolerance": r.verify.tolerance} if r.verify.tolerance is not None else {}
    report = verify_model(ctx.final_model.resolve(), str(_source_dir(ctx)), data, r.context_tokens,
                          documents=r.verify.heldout_docs, card=False, command=_command(),
                          law_path=Path(r.law) if r.law else None, **kwargs)
    ctx.log(format_table(report))
    return {"passed": bool(report.get("passed")), "reasons": report.get("reasons", []),
            "verification": str(ctx.final_model / "verification.json")}


def card(ctx: RunContext, *, resuming: bool = False) -> dict:
    from .card import write_model_card

    r = ctx.recipe
    path = write_model_card(ctx.final_model.resolve(), base_model=_base_model(r.source),
                            repo_id=r.push.repo if r.push else None, reproduce=_command(),
                            title=Path(r.run_dir).name)
    return {"card": str(path)}


def push(ctx: RunContext, *, resuming: bool = False) -> dict:
    r = ctx.recipe
    if r.push is None:
        return {"pushed": False}
    from .hub import push as hub_push

    res = hub_push(ctx.final_model.resolve(), r.push.repo, private=r.push.private,
                   revision=r.push.revision, force=r.push.force)
    return {"pushed": True, "repo": r.push.repo, "commit": getattr(res, "commit_url", None)}


def after_skip(ctx: RunContext, name: str) -> None:
    """Keep RUN_DIR/model pointing at the right model when stages are skipped."""
    if name in ("convert", "uptrain") and ctx.outputs[name].get("model"):
        _link_final_model(ctx, Path(ctx.outputs[name]["model"]))


def _base_model(source: str):
    from .source import aliases

    if source in aliases():
        return aliases()[source].repo
    return source if "/" in source and not Path(source).exists() else None


def _command() -> str:
    return "gqa-convert " + " ".join(shlex.quote(a) for a in sys.argv[1:])
