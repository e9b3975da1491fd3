"""The pipeline's stages: plan → convert → uptrain → verify → card → push.

Each stage is an object with
- `inputs(run)`: the settings its result depends on (hashed, with the stage before it, into its
  fingerprint: a changed input re-runs it and every later stage, never an earlier one);
- `run(ctx, resuming)`: its body, a thin call into the library function of the stage, returning
  its typed outputs (kept in state.json, so a later run that skips the stage still has them);
- `after_skip(ctx)`: what a skipped stage must still do (keep RUN_DIR/model pointing right).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Optional, TypeVar

from pydantic import BaseModel

from ..errors import ConfigError
from ..settings import RunSettings, UptrainConfig

Out = TypeVar("Out", bound=BaseModel)


# --------------------------------------------------------------------------- what stages share
@dataclass
class RunContext:
    recipe: RunSettings
    run_dir: Path
    log: Callable[[str], None] = print
    outputs: dict[str, BaseModel] = field(default_factory=dict)  # per stage, this run or a skipped earlier one
    _source_dir: Optional[Path] = None  # the source as a local folder, resolved once

    def output(self, stage: str, kind: type[Out]) -> Out:
        """The typed outputs of an earlier stage (this run's, or a skipped stage's from state.json)."""
        out = self.outputs[stage]
        assert isinstance(out, kind), (stage, type(out).__name__)
        return out

    @property
    def final_model(self) -> Path:
        """RUN_DIR/model: the model that is verified, carded and pushed."""
        return self.run_dir / "model"

    def source_dir(self, *, config_only: bool = False) -> Path:
        from ..source import resolve_source

        if self._source_dir is not None:
            return self._source_dir
        r = self.recipe
        folder = resolve_source(
            r.source, revision=r.revision, config_only=config_only, allow_pickle=r.convert.allow_pickle
        )
        if not config_only:
            self._source_dir = folder
        return folder

    def link_final_model(self, target: Path) -> None:
        tmp = self.run_dir / ".model.tmp-link"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(os.path.relpath(target, self.run_dir))
        os.replace(tmp, self.final_model)

    def command(self) -> str:
        return "gqa-convert " + " ".join(shlex.quote(a) for a in sys.argv[1:])


class Stage:
    name: ClassVar[str]
    Outputs: ClassVar[type[BaseModel]]
    section: ClassVar[Optional[str]] = None  # the recipe section whose keys its refusals name

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        if "section" not in cls.__dict__:
            cls.section = {"plan": "hardware"}.get(cls.name, cls.name)

    def inputs(self, run: RunSettings) -> dict:
        raise NotImplementedError

    def run(self, ctx: RunContext, *, resuming: bool) -> BaseModel:
        raise NotImplementedError

    def after_skip(self, ctx: RunContext) -> None:
        pass

    def not_run(self, outputs: BaseModel) -> Optional[str]:
        """Why the stage, although it ran, did nothing (the run summary says so); None: it did its work."""
        return None


def preflight(run: RunSettings) -> None:
    """What can fail without any work but needs the machine, not just the recipe: checked before
    the first stage, so a run never converts for an hour and then refuses (ConfigError)."""
    if run.uptrain.enabled:
        from ..train.backend import choose_attention

        try:
            choose_attention(run.uptrain.attn)  # flash asked for where it cannot run
            if run.uptrain.sequence_parallel > 1:
                _check_sequence_parallel(run)
        except ConfigError as err:
            err.recipe_section = "uptrain"  # type: ignore[attr-defined]
            raise


def _check_sequence_parallel(run: RunSettings) -> None:
    """Ulysses splits the converted model's heads over the SP group: checked on the head counts the
    run converts to, before any weights are fetched (the source's config only). With kv_heads
    `auto` the counts are the plan's; uptraining checks them again when it starts."""
    import dataclasses

    from ..architectures import read_config
    from ..law.shapes import shape_from_config
    from ..memory import check_sequence_parallel
    from ..source import resolve_source

    if run.kv_heads == "auto":
        return
    shape = shape_from_config(read_config(resolve_source(run.source, revision=run.revision, config_only=True)))
    heads = run.q_heads if isinstance(run.q_heads, int) else shape.n_heads
    converted = dataclasses.replace(shape, n_heads=heads, n_kv=int(run.kv_heads))
    sp = run.uptrain.sequence_parallel
    check_sequence_parallel(converted, sp, max(sp, run.uptrain.num_processes))


def _base(run: RunSettings) -> dict:
    return {"source": run.source, "revision": run.revision}


# --------------------------------------------------------------------------- plan
def memory_plan(shape, context: int, up, hw, *, converted_heads: Optional[tuple[int, int]] = None):
    """gqa_convert.memory's estimate for uptraining with these settings (UptrainSettings,
    HardwareSettings), on the converted head layout when given."""
    from .. import train
    from ..memory import plan_memory

    del train  # (the attention choice below mirrors train.backend: flash when importable, else packed)
    import importlib.util

    student = shape.with_heads(*converted_heads) if converted_heads else shape
    attention = {"flash": "flash", "sdpa": "sdpa", "packed": "packed"}.get(up.attn)
    if attention is None:  # auto
        attention = "flash" if importlib.util.find_spec("flash_attn") is not None else "packed"
    ckpt = up.gradient_checkpointing if up.gradient_checkpointing is not None else True
    return plan_memory(
        student,
        context,
        gpus=hw.gpus,
        gpu_memory=hw.gpu_memory,
        train=up.train,
        lora=up.lora,
        lora_rank=up.lora_rank,
        sequence_parallel=hw.sequence_parallel,
        sharding=hw.sharding,
        batch_size=up.batch_size,
        grad_accum=up.grad_accum,
        gradient_checkpointing=ckpt,
        distill=up.distill and up.distill_weight > 0,
        teacher=shape if up.distill and up.distill_weight > 0 else None,
        attention=attention,
        chunk_tokens=up.loss_chunk_tokens,
        tokens_per_s=hw.tokens_per_s,
        tokens=up.tokens,
    )


class PlanOutputs(BaseModel):
    kv_heads: int
    q_heads: Optional[int] = None  # None: unchanged
    recommended_kv_heads: int
    plan: str


class PlanStage(Stage):
    name, Outputs = "plan", PlanOutputs

    def inputs(self, run: RunSettings) -> dict:
        return {
            **_base(run),
            "hardware": run.hardware.model_dump(),
            "context": run.context,
            "kv_heads": run.kv_heads,
            "q_heads": run.q_heads,
            "max_loss_increase": run.max_loss_increase,
            "law": run.law,
        }

    def run(self, ctx: RunContext, *, resuming: bool) -> PlanOutputs:
        from ..architectures import read_config
        from ..fileio import write_json_atomic
        from ..law.loss import load_law
        from ..plan import format_plan, plan_conversion, write_plot

        r = ctx.recipe
        out = ctx.run_dir / "plan"
        out.mkdir(exist_ok=True)
        p = plan_conversion(
            read_config(ctx.source_dir(config_only=True)),
            r.context,
            source=r.source,
            max_loss_increase=r.max_loss_increase,
            law=load_law(r.law) if r.law else None,
        )
        write_json_atomic(out / "plan.json", p.to_dict())
        write_plot(p, out / "plan.png")
        ctx.log(format_plan(p))
        kv = p.recommended.kv_heads if r.kv_heads == "auto" else int(r.kv_heads)
        q = r.q_heads if isinstance(r.q_heads, int) else None
        if r.q_heads == "auto" and p.recommended_joint is not None:
            q, kv = p.recommended_joint.q_heads, p.recommended_joint.kv_heads
            ctx.log(
                f"[plan] --kv-heads auto --q-heads auto: the law recommends {q} query / {kv} KV heads at T={r.context}"
            )
        elif r.kv_heads == "auto":
            ctx.log(f"[plan] --kv-heads auto: the law recommends {kv} KV heads at T={r.context}")
        if r.uptrain.enabled:  # will uptraining fit the hardware? (gqa_convert.memory)
            from ..law.shapes import shape_from_config
            from ..memory import format_memory_plan

            shape = shape_from_config(read_config(ctx.source_dir(config_only=True)))
            mp = memory_plan(shape, r.context, r.uptrain, r.hardware, converted_heads=(q or shape.n_heads, kv))
            write_json_atomic(out / "memory.json", mp.to_dict())
            ctx.log(format_memory_plan(mp))
            if mp.fits is False:
                fix = mp.advice[0].text if mp.advice else "more GPUs or memory"
                ctx.log(
                    f"[plan] warning: uptraining needs {mp.total_bytes / 2**30:.1f} GiB per GPU, more than "
                    f"hardware.gpu_memory allows; {fix}"
                )
        return PlanOutputs(
            kv_heads=kv, q_heads=q, recommended_kv_heads=p.recommended.kv_heads, plan=str(out / "plan.json")
        )


# --------------------------------------------------------------------------- convert
class ConvertOutputs(BaseModel):
    model: str
    old_kv: int
    new_kv: int
    method: str


class ConvertStage(Stage):
    name, Outputs = "convert", ConvertOutputs

    def inputs(self, run: RunSettings) -> dict:
        spec = run.calibration_spec()
        calib = (
            None if spec is None else [spec.source, spec.text_field, spec.split, spec.config_name, spec.first_train_doc]
        )
        return {**_base(run), **run.convert.model_dump(), "q_heads": run.q_heads, "calibration": calib}

    def run(self, ctx: RunContext, *, resuming: bool) -> ConvertOutputs:
        from ..convert import convert_checkpoint
        from ..train.data import TrainingDocuments

        r = ctx.recipe
        target = ctx.run_dir / "converted"
        plan = ctx.output("plan", PlanOutputs)
        spec = r.calibration_spec() if r.convert.method != "mean" or plan.q_heads else None
        res = convert_checkpoint(
            ctx.source_dir(),
            target,
            ctx.output("plan", PlanOutputs).kv_heads,
            method=r.convert.method,
            max_shard_size=r.convert.max_shard_size,
            overwrite=True,
            allow_pickle=r.convert.allow_pickle,
            calib_data=TrainingDocuments(spec) if spec else None,
            calib_tokens=r.convert.calib_tokens,
            q_heads=plan.q_heads,
            q_method=r.convert.q_method,
            calib_device=r.convert.calib_device,
        )
        ctx.link_final_model(target)
        ctx.log(
            f"[convert] {res.family}: {res.old_shape.n_kv} -> {res.new_shape.n_kv} KV heads ({res.method}), "
            f"written to {target}"
        )
        return ConvertOutputs(
            model=str(target), old_kv=res.old_shape.n_kv, new_kv=res.new_shape.n_kv, method=res.method
        )

    def after_skip(self, ctx: RunContext) -> None:
        ctx.link_final_model(Path(ctx.output("convert", ConvertOutputs).model))


# --------------------------------------------------------------------------- uptrain
class UptrainOutputs(BaseModel):
    model: str
    skipped: bool = False
    steps: Optional[int] = None
    tokens: Optional[int] = None
    final_loss: Optional[float] = None


class UptrainStage(Stage):
    name, Outputs = "uptrain", UptrainOutputs

    def inputs(self, run: RunSettings) -> dict:
        return {"context": run.context, **run.uptrain.model_dump()}

    def run(self, ctx: RunContext, *, resuming: bool) -> UptrainOutputs:
        r = ctx.recipe
        converted = ctx.output("convert", ConvertOutputs).model
        if not r.uptrain.enabled:
            ctx.link_final_model(Path(converted))
            return UptrainOutputs(model=converted, skipped=True)
        from ..train.uptrain import uptrain

        u = r.uptrain
        target = ctx.run_dir / "uptrain"
        # Same settings and a checkpoint on disk: continue. Otherwise the folder holds a run of other
        # settings (or one killed before its first checkpoint): start over.
        resume = resuming and any((target / d).is_dir() for d in ("checkpoint", "checkpoint.old"))
        if not resume and target.exists():
            shutil.rmtree(target)
        # The teacher is the run's source (distillation is on by default; uptrain.distill: false turns
        # it off); the learning rate, when not set, is chosen by uptrain from the model's width.
        distill_from = u.distill_from or (str(ctx.source_dir()) if u.distill and u.distill_weight > 0 else None)
        settings = u.model_dump(exclude={"enabled", "num_processes", "launcher"})
        cfg = UptrainConfig(
            **{**settings, "distill_from": distill_from},
            model=converted,
            context=r.context,
            output=str(target),
            resume=resume,
        )
        if u.num_processes > 1:  # a launched job (torchrun / accelerate launch); its record says what ran
            from ..train.sequence_parallel import run_launched

            rec = run_launched(cfg, u.num_processes, u.launcher)
            ctx.link_final_model(target)
            return UptrainOutputs(model=str(target), steps=rec.steps, tokens=rec.tokens, final_loss=rec.final_loss)
        res = uptrain(cfg)
        ctx.link_final_model(res.output)
        return UptrainOutputs(model=str(res.output), steps=res.steps, tokens=res.tokens, final_loss=res.final_loss)

    def after_skip(self, ctx: RunContext) -> None:
        ctx.link_final_model(Path(ctx.output("uptrain", UptrainOutputs).model))

    def not_run(self, outputs: BaseModel) -> Optional[str]:
        if getattr(outputs, "skipped", False):
            return "the recipe has no uptrain section (or uptrain.enabled: false); the converted model is verified as it is"
        return None


# --------------------------------------------------------------------------- verify
class VerifyOutputs(BaseModel):
    passed: bool
    reasons: list[str] = []
    verification: str


class VerifyStage(Stage):
    name, Outputs = "verify", VerifyOutputs

    def inputs(self, run: RunSettings) -> dict:
        text = run.verify_source()
        fmt = text[1].model_dump(include={"text_field", "data_split", "data_config"}) if text else None
        return {
            "context": run.context,
            **run.verify.model_dump(),
            "data": text[0] if text else None,
            "format": fmt,
            "law": run.law,
            "eval": run.eval.model_dump() if run.verify.retrieval else None,
        }

    def run(self, ctx: RunContext, *, resuming: bool) -> VerifyOutputs:
        from ..verify import format_table, verify_model

        r = ctx.recipe
        text = r.verify_source()
        if text is None:
            raise ConfigError(
                "verify needs held-out text: set verify.data or uptrain.data (a file, folder or dataset name)"
            )
        data, fmt = text
        settings = r.verify.model_copy(update=fmt.model_dump(include={"text_field", "data_split", "data_config"}))
        report = verify_model(
            ctx.final_model.resolve(),
            str(ctx.source_dir()),
            data,
            r.context,
            settings=settings,
            card=False,
            command=ctx.command(),
            law_path=r.law,
            eval_settings=r.eval,
        )
        ctx.log(format_table(report))
        return VerifyOutputs(
            passed=report.passed, reasons=report.reasons, verification=str(ctx.final_model / "verification.json")
        )


# --------------------------------------------------------------------------- card
class CardOutputs(BaseModel):
    card: str


class CardStage(Stage):
    name, Outputs = "card", CardOutputs

    def inputs(self, run: RunSettings) -> dict:
        return {"push_repo": run.push.repo if run.push else None, **run.card.model_dump()}

    def run(self, ctx: RunContext, *, resuming: bool) -> CardOutputs:
        from ..card import write_model_card

        r = ctx.recipe
        repo = r.push.repo if r.push else None
        path = write_model_card(
            ctx.final_model.resolve(),
            base_model=r.card.base_model or _base_model(r.source),
            repo_id=repo,
            reproduce=ctx.command(),
            license=r.card.license,
            title=r.card.title or (None if repo else Path(r.run_dir).name),
        )
        return CardOutputs(card=str(path))


def _base_model(source: str) -> Optional[str]:
    """The source's hub id for the card's base_model: an alias's repo, a hub id; a local folder has none."""
    from ..settings import is_repo_id
    from ..source import aliases

    if source in aliases():
        return aliases()[source].repo
    return source if is_repo_id(source) and not Path(source).exists() else None


# --------------------------------------------------------------------------- push
class PushOutputs(BaseModel):
    pushed: bool
    repo: Optional[str] = None
    commit: Optional[str] = None


class PushStage(Stage):
    name, Outputs = "push", PushOutputs

    def inputs(self, run: RunSettings) -> dict:
        return run.push.model_dump() if run.push else {}

    def run(self, ctx: RunContext, *, resuming: bool) -> PushOutputs:
        r = ctx.recipe
        if r.push is None:
            return PushOutputs(pushed=False)
        from ..hub import push

        res = push(
            ctx.final_model.resolve(),
            r.push.repo,
            private=r.push.private,
            revision=r.push.revision,
            force=r.push.force,
            commit_message=r.push.message,
        )
        return PushOutputs(pushed=True, repo=r.push.repo, commit=res.commit_url)

    def not_run(self, outputs: BaseModel) -> Optional[str]:
        if not getattr(outputs, "pushed", True):
            return "no push.repo in the recipe (set push.repo, or --push-to USER/NAME); the model stays local"
        return None


STAGES: list[Stage] = [PlanStage(), ConvertStage(), UptrainStage(), VerifyStage(), CardStage(), PushStage()]
