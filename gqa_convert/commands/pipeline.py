"""`gqa-convert MODEL --kv-heads N --context T ...` (the whole pipeline) and `gqa-convert run RECIPE`."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..settings import ConvertSettings, RunSettings, UptrainSettings
from .flags import SEP, add_flags, given

TOP = ("source", "kv_heads", "q_heads", "context", "run_dir", "revision", "max_loss_increase", "law")
# The section settings most runs set, as flags of their own; every other key through --set.
UPTRAIN = ("data", "tokens", "steps", "alpha", "lr", "batch_size")


def register(sub) -> None:
    p = sub.add_parser(
        "pipeline",
        help="(default) MODEL --kv-heads N|auto --context T: plan, convert, uptrain, verify, card, push",
        description="Run every stage for MODEL in a run folder; re-running resumes. "
        "`gqa-convert MODEL ...` is the same as `gqa-convert pipeline MODEL ...`. --data turns uptraining on "
        "(and is the text verify scores); any recipe key can be set with --set KEY=VALUE.",
    )
    add_flags(p, RunSettings, only=TOP, positional=("source",), optional=("run_dir",))
    add_flags(p, UptrainSettings, only=UPTRAIN, prefix="uptrain" + SEP)
    add_flags(p, ConvertSettings, only=("method",), prefix="convert" + SEP)
    p.add_argument(
        "--gpus",
        type=int,
        metavar="N",
        help="uptrain on N processes (uptrain.num_processes; also hardware.gpus for the plan unless --set)",
    )
    p.add_argument("--push-to", metavar="USER/NAME", help="publish to this hub repo when verification passes")
    p.add_argument("--private", action="store_true", help="create the pushed repo private")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="any recipe setting, e.g. uptrain.warmup=0.05 verify.tolerance=0.1",
    )
    p.add_argument("--json", action="store_true", help="print the run's summary as JSON (stage logs go to stderr)")
    p.set_defaults(func=run_flags)

    r = sub.add_parser(
        "run",
        help="run a recipe YAML: gqa-convert run RECIPE.yaml [key=value ...]",
        description="Run (or resume) the recipe's stages in its run_dir; key=value overrides "
        "any recipe key (values are YAML scalars).",
    )
    r.add_argument("recipe", help="recipe file (see recipes/)")
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override any recipe key, e.g. uptrain.steps=100")
    r.add_argument("--json", action="store_true", help="print the run's summary as JSON (stage logs go to stderr)")
    r.set_defaults(func=run_recipe)


def recipe_from_flags(args) -> RunSettings:
    from ..recipe import apply_overrides, validate_settings
    from ..settings import flag_name

    data: dict[str, Any] = given(args)
    for key in ("func", "command", "push_to", "private", "set", "debug", "json", "gpus"):
        data.pop(key, None)
    up = given(args, "uptrain" + SEP)
    if up:
        data["uptrain"] = {"enabled": True, **up}
    if getattr(args, "gpus", None) is not None:
        if args.gpus < 1:
            raise ConfigError(f"--gpus must be a whole number >= 1 (processes to uptrain on), not {args.gpus}")
        data.setdefault("uptrain", {})["num_processes"] = args.gpus
        data["hardware"] = {"gpus": args.gpus}
    if "method" in given(args, "convert" + SEP):
        data["convert"] = given(args, "convert" + SEP)
    if args.push_to:
        data["push"] = {"repo": args.push_to, "private": args.private}
    if "run_dir" not in data:
        kv = data.get("kv_heads", "auto")
        data["run_dir"] = f"runs/{Path(str(data.get('source', 'model')).rstrip('/')).name}-kv{kv}"
    # Errors name what the user typed: a top-level flag as --flag, a --set key by its dotted path.
    return validate_settings(
        RunSettings,
        apply_overrides(data, args.set),
        name=lambda loc: flag_name(loc[0]) if len(loc) == 1 else ".".join(loc),
    )


def _summary(results: dict, run_dir: Path, as_json: bool) -> None:
    """One line per stage: done, up to date, or not run and why."""
    if as_json:
        print(json.dumps({"run_dir": str(run_dir), "stages": {n: r.to_dict() for n, r in results.items()}}, indent=2))
        return
    for name, res in results.items():
        print(f"  {name:8s} {res.status}" + (f": {res.not_run}" if res.not_run else ""))
    print(f"run folder: {run_dir}")


def _run(recipe, as_json: bool, flags: bool = False) -> int:
    from ..pipeline import run_pipeline

    # With --json, stdout carries only the summary: the stages' logs (uptraining's included) go to stderr.
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        results = run_pipeline(recipe, flags=flags)
    _summary(results, Path(recipe.run_dir), as_json)
    return 0


def run_flags(args) -> int:
    return _run(recipe_from_flags(args), args.json, flags=True)


def run_recipe(args) -> int:
    from ..recipe import load_recipe

    return _run(load_recipe(args.recipe, args.overrides), args.json)
