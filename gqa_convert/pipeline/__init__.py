"""One command from checkpoint to published GQA model: plan → convert → uptrain → verify → card → push.

A run is a folder. Each stage reads what earlier stages left there and writes its own part:

    RUN_DIR/recipe.yaml        the resolved recipe of the last run
    RUN_DIR/state.json         per stage: fingerprint of its settings and inputs, status, outputs
    RUN_DIR/plan/              plan.json, plan.png
    RUN_DIR/converted/         the regrouped checkpoint (a plain HF model folder)
    RUN_DIR/uptrain/           checkpoints, metrics.jsonl, loss curve, the final model
    RUN_DIR/model -> the final model (converted/ or uptrain/): verification.json, README.md card

Re-running the same command skips finished stages; a changed setting re-runs that stage and every
later one, never an earlier one. A stage that was interrupted re-runs (uptraining resumes from its
last checkpoint). The stages themselves are in `stages.py`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, get_args

from pydantic import BaseModel

from ..errors import ConfigError, GqaConvertError, VerificationFailed
from ..fileio import FolderLock, write_text_atomic
from ..recipe import dump_recipe
from ..settings import RunSettings
from .stages import STAGES, RunContext, Stage, preflight
from .state import RunState, fingerprint

__all__ = ["run_pipeline", "StageResult", "STAGES", "Stage", "RunContext", "RunState"]


@dataclass
class StageResult:
    name: str
    skipped: bool  # up to date: finished by an earlier run with the same settings and inputs
    outputs: BaseModel
    not_run: Optional[str] = None  # why the stage did nothing although it ran (no push.repo, ...)

    @property
    def status(self) -> str:
        return "up to date" if self.skipped else ("not run" if self.not_run else "done")

    def to_dict(self) -> dict:
        return {"status": self.status, "reason": self.not_run, "outputs": self.outputs.model_dump(mode="json")}


def _check_run_dir(run_dir: Path, source: str) -> None:
    """A run folder is never the source checkpoint, nor inside it: the source is never modified."""
    src = Path(source).expanduser()
    if src.exists():
        src, out = src.resolve(), run_dir.resolve()
        if out == src or src in out.parents or (src.is_dir() and out in src.parents):
            raise ConfigError(f"--run-dir {run_dir} overlaps the source {source}; choose a folder outside it")
        if (run_dir / "config.json").is_file() and not (run_dir / "state.json").is_file():
            raise ConfigError(f"--run-dir {run_dir} holds a model (config.json), not a run; choose a new folder")


# Words that follow a flag name in a message without being its value ("--lr must be > 0").
_NOT_A_VALUE = {"is", "are", "must", "cannot", "can", "needs", "need", "or", "and", "to", "of", "for", "with",
                "in", "on", "the", "a", "an", "was", "has", "given", "exceeds", "expects", "takes", "only"}  # fmt: skip


def in_recipe_terms(message: str, section: Optional[str], top: bool = True) -> str:
    """A library message in the recipe's words: `--attn flash` -> `uptrain.attn: flash` for the
    stage's section and, with `top`, `--context 4096` -> `context: 4096`; other flags stay."""
    sections = RunSettings.model_fields
    ann = sections[section].annotation if section in sections else None
    models = [a for a in (ann, *get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)]  # Optional[...]
    keys = set(models[0].model_fields) if models else set()

    def key(m: re.Match) -> str:
        name = m.group(1).replace("-", "_")
        if name.startswith("no_") and name[3:] in keys | set(sections):
            return f"{f'{section}.' if name[3:] in keys else ''}{name[3:]}: false"
        if name in keys:
            path = f"{section}.{name}"
        elif (
            top
            and name in sections
            and name not in ("uptrain", "convert", "verify", "eval", "card", "push", "hardware")
        ):
            path = name
        else:
            return m.group(0)
        value = m.group(2)
        return path + (f": {value}" if value and value.lower() not in _NOT_A_VALUE else (f" {value}" if value else ""))

    return re.sub(r"(?<![\w-])--([a-z][a-z0-9-]*)(?: ([^\s,;:]+))?", key, message)


def run_pipeline(
    recipe: RunSettings, *, log: Callable[[str], None] = print, flags: bool = False
) -> dict[str, StageResult]:
    """Run (or resume) every stage of `recipe` in its run folder. Returns what each stage did.

    A refusal from inside a stage names the recipe key (`uptrain.attn`), not the single command's
    flag (`--attn`); with `flags` (the run came from `gqa-convert MODEL --context ...`), top-level
    settings keep their flag names, which are what the user typed."""
    try:
        return _run(recipe, log)
    except GqaConvertError as err:
        section = getattr(err, "recipe_section", None)
        raise type(err)(in_recipe_terms(str(err), section, top=not flags)) from None


def _run(recipe: RunSettings, log: Callable[[str], None]) -> dict[str, StageResult]:
    run_dir = Path(recipe.run_dir)
    _check_run_dir(run_dir, recipe.source)
    preflight(recipe)
    # One run at a time per run folder, taken before anything in it is written: a second run fails
    # at once naming the holder, and leaves state.json and recipe.yaml as the first one keeps them.
    lock = FolderLock(Path(os.path.abspath(run_dir)), "run folder")
    try:
        lock.__enter__()
    except OSError as err:
        raise ConfigError(f"cannot create run folder {run_dir}: {err.strerror}; choose a writable --run-dir") from None
    try:
        return _run_locked(recipe, run_dir, log)
    finally:
        lock.__exit__(None, None, None)


def _run_locked(recipe: RunSettings, run_dir: Path, log: Callable[[str], None]) -> dict[str, StageResult]:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create run folder {run_dir}: {err.strerror}; choose a writable --run-dir") from None
    state = RunState.load(run_dir)
    write_text_atomic(run_dir / "recipe.yaml", dump_recipe(recipe))
    ctx = RunContext(recipe=recipe, run_dir=run_dir, log=log)

    results: dict[str, StageResult] = {}
    upstream = ""
    for stage in STAGES:
        fp = fingerprint(stage.inputs(recipe), upstream)
        upstream = fp
        entry = state.entry(stage.name)
        if entry is not None and state.is_done(stage.name, fp):
            ctx.outputs[stage.name] = stage.Outputs.model_validate(entry.outputs)
            stage.after_skip(ctx)
            results[stage.name] = StageResult(
                stage.name, True, ctx.outputs[stage.name], stage.not_run(ctx.outputs[stage.name])
            )
            log(f"[{stage.name}] up to date, skipped")
            continue
        resuming = entry is not None and entry.fingerprint == fp
        state.mark(stage.name, fp, "running")
        log(f"[{stage.name}] {'resuming' if resuming else 'running'}")
        try:
            outputs = stage.run(ctx, resuming=resuming)
        except GqaConvertError as err:
            err.recipe_section = stage.section  # type: ignore[attr-defined]  # for in_recipe_terms
            raise
        ctx.outputs[stage.name] = outputs
        state.mark(stage.name, fp, "done", outputs.model_dump())
        results[stage.name] = StageResult(stage.name, False, outputs, stage.not_run(outputs))
        if stage.name == "verify" and not outputs.passed:  # type: ignore[attr-defined]
            # Recorded as done (the measurement stands); later stages wait for a passing model.
            raise VerificationFailed(
                f"verification failed ({'; '.join(outputs.reasons) or 'see verification.json'}); "  # type: ignore[attr-defined]
                f"the card is not written and nothing is pushed: uptrain longer (uptrain.tokens/steps) "
                f"or loosen verify.tolerance, then re-run"
            )
    return results
