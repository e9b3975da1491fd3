"""One command from checkpoint to published GQA model: plan → convert → uptrain → verify → card → push.

A run is a folder. Each stage reads what earlier stages left there and writes its own part:

    RUN_DIR/recipe.yaml        the resolved recipe of the last run
    RUN_DIR/state.json         per stage: fingerprint of its settings and inputs, status, outputs
    RUN_DIR/plan/              plan.json, plan.png
    RUN_DIR/converted/         the regrouped checkpoint (a plain HF model folder)
    RUN_DIR/uptrain/           checkpoints, metrics.jsonl, loss curve, final model in uptrain/model
    RUN_DIR/model -> the final model (converted/ or uptrain/model): verification.json, README.md card

A stage's fingerprint hashes its own settings and the fingerprint of the stage before it, so
re-running the same command skips finished stages, and a changed setting re-runs that stage and
every later one, never an earlier one. A stage that was interrupted re-runs (uptraining resumes
from its last checkpoint).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import ConfigError, VerificationFailed
from .fileio import write_json_atomic
from .recipe import Recipe, dump_recipe, load_recipe

STAGES = ["plan", "convert", "uptrain", "verify", "card", "push"]


def _fingerprint(settings: dict, upstream: str) -> str:
    blob = json.dumps({"settings": settings, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class RunState:
    """state.json: what each stage last did, keyed by stage name."""

    path: Path
    stages: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, run_dir: Path) -> "RunState":
        path = run_dir / "state.json"
        stages = json.loads(path.read_text())["stages"] if path.exists() else {}
        return cls(path=path, stages=stages)

    def is_done(self, stage: str, fingerprint: str) -> bool:
        entry = self.stages.get(stage, {})
        return entry.get("fingerprint") == fingerprint and entry.get("status") == "done"

    def mark(self, stage: str, fingerprint: str, status: str, outputs: Optional[dict] = None) -> None:
        self.stages[stage] = {
            "fingerprint": fingerprint,
            "status": status,
            "outputs": outputs or {},
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json_atomic(self.path, {"stages": self.stages})


@dataclass
class RunContext:
    recipe: Recipe
    run_dir: Path
    state: RunState
    log: Callable[[str], None] = print
    source_dir: Optional[Path] = None  # resolved local source checkpoint
    outputs: dict[str, dict] = field(default_factory=dict)  # per stage, this run or a skipped earlier one

    @property
    def final_model(self) -> Path:
        return self.run_dir / "model"


@dataclass
class StageResult:
    name: str
    skipped: bool
    outputs: dict


def _link_final_model(ctx: RunContext, target: Path) -> None:
    """RUN_DIR/model points at the model that is verified, carded and pushed."""
    link = ctx.final_model
    tmp = ctx.run_dir / ".model.tmp-link"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(target, ctx.run_dir))
    os.replace(tmp, link)


# --------------------------------------------------------------------------- stages
def stage_settings(recipe: Recipe, stage: str) -> dict:
    """The settings a stage's result depends on (its fingerprint), as plain data."""
    base = {"source": recipe.source, "revision": recipe.revision}
    if stage == "plan":
        return {**base, "context": recipe.context_tokens, "kv_heads": recipe.kv_heads,
                "max_loss_increase": recipe.max_loss_increase, "law": recipe.law}
    if stage == "convert":
        return {**base, **recipe.convert.model_dump()}
    if stage == "uptrain":
        return {"context": recipe.context_tokens, **recipe.uptrain.model_dump()}
    if stage == "verify":
        return {"context": recipe.context_tokens, **recipe.verify.model_dump(),
                "data": recipe.verify.data or recipe.uptrain.data, "law": recipe.law}
    if stage == "card":
        return {"push_repo": recipe.push.repo if recipe.push else None}
    if stage == "push":
        return recipe.push.model_dump() if recipe.push else {}
    raise KeyError(stage)


def run_pipeline(recipe: Recipe, *, log: Callable[[str], None] = print) -> dict[str, StageResult]:
    """Run (or resume) every stage of `recipe` in its run folder. Returns what each stage did."""
    from . import stages  # the stage bodies: thin calls into the library functions

    run_dir = Path(recipe.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create run folder {run_dir}: {err.strerror}; choose a writable --run-dir") from None
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    ctx = RunContext(recipe=recipe, run_dir=run_dir, state=RunState.load(run_dir), log=log)

    results: dict[str, StageResult] = {}
    upstream = ""
    for name in STAGES:
        body = getattr(stages, name)
        fp = _fingerprint(stage_settings(recipe, name), upstream)
        upstream = fp
        if ctx.state.is_done(name, fp):
            ctx.outputs[name] = ctx.state.stages[name]["outputs"]
            stages.after_skip(ctx, name)
            results[name] = StageResult(name, True, ctx.outputs[name])
            log(f"[{name}] up to date, skipped")
            continue
        resuming = ctx.state.stages.get(name, {}).get("fingerprint") == fp
        ctx.state.mark(name, fp, "running")
        log(f"[{name}] {'resuming' if resuming else 'running'}")
        outputs = body(ctx, resuming=resuming)
        ctx.outputs[name] = outputs
        ctx.state.mark(name, fp, "done", outputs)
        results[name] = StageResult(name, False, outputs)
        if name == "verify" and not outputs.get("passed", False):
            # Recorded as done (the measurement stands); later stages wait for a passing model.
            raise VerificationFailed(
                f"verification failed ({'; '.join(outputs.get('reasons', [])) or 'see verification.json'}); "
                f"the card is not written and nothing is pushed: uptrain longer (uptrain.tokens/steps) "
                f"or loosen verify.tolerance, then re-run"
            )
    return results


# --------------------------------------------------------------------------- CLI
def _recipe_from_flags(args: argparse.Namespace) -> Recipe:
    data: dict[str, Any] = {
        "source": args.model,
        "kv_heads": args.kv_heads if args.kv_heads == "auto" else _int(args.kv_heads, "--kv-heads"),
        "context": args.context,
        "run_dir": args.run_dir or f"runs/{Path(args.model.rstrip('/')).name}-kv{args.kv_heads}",
        "revision": args.revision,
        "convert": {"method": args.method},
    }
    if args.data:
        up: dict[str, Any] = {"enabled": True, "data": args.data}
        for key in ("tokens", "steps", "alpha", "lr", "batch_size"):
            if getattr(args, key) is not None:
                up[key] = getattr(args, key)
        data["uptrain"] = up
        data["verify"] = {"data": args.data}
    if args.push_to:
        data["push"] = {"repo": args.push_to, "private": args.private}
    return load_recipe(data=data, overrides=args.set or [])


def _int(value: str, flag: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{flag} must be a whole number or 'auto', not {value!r}") from None


def _print_summary(results: dict[str, StageResult], run_dir: Path) -> None:
    for name, res in results.items():
        what = "skipped (up to date)" if res.skipped else "done"
        print(f"  {name:8s} {what}")
    print(f"run folder: {run_dir}")


def _cmd_pipeline(args: argparse.Namespace) -> int:
    recipe = _recipe_from_flags(args)
    results = run_pipeline(recipe)
    _print_summary(results, Path(recipe.run_dir))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    results = run_pipeline(recipe)
    _print_summary(results, Path(recipe.run_dir))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "pipeline",
        help="(default) MODEL --kv-heads N|auto --context T: plan, convert, uptrain, verify, card, push",
        description="Run every stage for MODEL in a run folder; re-running resumes. "
        "`gqa-convert MODEL ...` is the same as `gqa-convert pipeline MODEL ...`.",
    )
    p.add_argument("model", help="hub id, alias (see `gqa-convert models`), local folder or llama2.c .bin")
    p.add_argument("--kv-heads", required=True, help="new KV-head count, or 'auto' for the law's recommendation")
    p.add_argument("--context", required=True, help="target context length, e.g. 8K, 128K, 131072")
    p.add_argument("--data", help="uptraining/verification text: file, folder or HF dataset name")
    p.add_argument("--tokens", help="uptraining budget in tokens, e.g. 50M")
    p.add_argument("--steps", type=int, help="uptraining budget in optimizer steps")
    p.add_argument("--alpha", type=float, help="uptraining budget as a fraction of pretraining tokens")
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--method", default="auto", choices=["auto", "mean", "align", "optimal"],
                   help="KV-head merge (default auto: optimal calibrated on --data, else mean)")
    p.add_argument("--push-to", metavar="USER/NAME", help="publish to this hub repo when verification passes")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision")
    p.add_argument("--run-dir", help="run folder (default runs/<model>-kv<N>)")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="any recipe setting, e.g. uptrain.warmup=0.05")
    p.set_defaults(func=_cmd_pipeline)

    r = sub.add_parser("run", help="run a recipe YAML: gqa-convert run RECIPE.yaml [key=value ...]")
    r.add_argument("recipe", help="recipe file (see recipes/)")
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override any recipe key, e.g. uptrain.steps=100")
    r.set_defaults(func=_cmd_run)
