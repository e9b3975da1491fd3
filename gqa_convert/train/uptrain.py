"""Uptrain a converted model: continued pretraining on packed documents at the serving context.

    result = uptrain(UptrainConfig(model="out/llama-kv2", data="corpus/", context=8192,
                                   tokens="50M", output="out/llama-kv2-up"))

One optimizer step consumes `batch_size * grad_accum * processes` rows of exactly `context` tokens
(no padding). The loss of a step is the sum of token cross-entropies over the whole global batch
divided by its number of target tokens, so 1 process with batch 4 and 2 processes with batch 2
take the same step. Runs under `accelerate launch` (DDP, FSDP) through `accelerate.Accelerator`.

The training documents are shuffled with the seed (data.RowStream: a seeded shuffle buffer, a new
order each epoch) unless `shuffle` is off. At `eval_steps` the model is scored on the first
`eval_docs` held-out documents with evaluate.document_loss; the result goes into that step's line of
metrics.jsonl (`eval_loss`, `eval_slice`) and, with `report_to`, to an accelerate tracker.

Output folder: the final model (safetensors, config, tokenizer; loads with
AutoModelForCausalLM.from_pretrained), metrics.jsonl, loss_curve.png, heldout.jsonl (the held-out
documents, never trained on), uptrain_config.json (the settings a --resume must match),
uptrain.json (records.UptrainRecord: what ran and what it measured), checkpoint/ (trainable
weights as safetensors; optimizer, scheduler and RNG via torch.save, loaded with weights_only=True),
and with --report-to tensorboard, tensorboard/ (event files).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..errors import CheckpointError, ConfigError, GqaConvertError, OutputError, SourceNotFoundError
from ..fileio import raise_if_disk_full, read_small_text, share_modes, write_json_atomic
from ..hostmem import return_large_frees_to_os
from ..records import ConversionRecord, UptrainRecord
from ..settings import UptrainConfig, UptrainSettings, command_line, data_spec, is_repo_id
from .backend import choose_attention
from .data import IGNORE, RowStream, collate, write_heldout
from .loss import packed_losses
from .schedule import wsd_factor

CKPT, CKPT_TMP, CKPT_OLD = "checkpoint", "checkpoint.tmp", "checkpoint.old"
CONFIG_FILE = "uptrain_config.json"  # the run's settings, written at its start: what --resume must match
KILL_ENV = "GQA_CONVERT_KILL_AFTER_STEP"  # test hook: SIGKILL this process after step k
TRACE_ENV = "GQA_CONVERT_TRACE_DOCS"  # test hook: append each step's document ids (JSON lines) to this file
EVAL_POINTS = 5  # held-out evaluations of a run without eval_every: evenly spaced, the last at the end
TRACKER_DIR = "tensorboard"  # OUTPUT/tensorboard/: the tensorboard event files
# The package each --report-to needs (any one of them), and the extra that brings it.
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "trackio": ("trackio",)}
# Fields that define the run; a resumed run must agree on all of them.
RUN_FIELDS = (
    "model",
    "data",
    "text_field",
    "data_split",
    "data_config",
    "context",
    "lr",
    "batch_size",
    "grad_accum",
    "warmup",
    "decay",
    "lr_floor",
    "weight_decay",
    "betas",
    "clip",
    "train",
    "distill",
    "distill_from",
    "distill_weight",
    "lora",
    "lora_rank",
    "heldout_docs",
    "train_start",
    "seed",
    "shuffle",
    "shuffle_buffer",  # compared only when shuffling
    "sequence_parallel",  # the data-parallel degree, and so the rows of a step, follow it
    "eval_docs",  # the held-out curve of a resumed run is one curve
)
# What a run whose uptrain_config.json predates a field did (its order was the file order); fields
# missing from an older config and not listed here are not compared.
LEGACY_RUN_FIELDS = {"shuffle": False, "sequence_parallel": 1}


@dataclass
class UptrainResult:
    output: Path
    steps: int
    tokens: int  # training tokens consumed
    final_loss: float  # mean training loss of the last step
    tokens_per_s: float  # measured over this invocation's steps
    attn_implementation: str
    heldout_docs: int
    resumed_from: int = 0  # step the run resumed from (0: fresh)
    losses: list[float] = field(default_factory=list)
    eval_loss: Optional[float] = None  # held-out loss at the last evaluation (the final step's)
    eval_slice: Optional[str] = None  # which documents it scored, e.g. "documents[0:50]"
    evals: list[dict] = field(default_factory=list)  # every evaluation: step, tokens, eval_loss


# ----------------------------------------------------------------------------- checks before work


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def known_pretraining_tokens(model: str) -> Optional[int]:
    """The source's pretraining tokens from the alias table, if the model names an alias.

    The model may be an alias or repo id, or a folder whose conversion record names its source.
    """
    from ..source import aliases

    names = {model}
    if Path(model).is_dir():
        record = ConversionRecord.read(model)
        if record is not None:
            names |= {n for n in (record.source, record.source_repo) if n}
    for alias in aliases().values():
        if (alias.name in names or alias.repo in names) and alias.pretraining_tokens:
            return int(alias.pretraining_tokens)
    return None


def resolve_steps(cfg: UptrainConfig, world: int) -> int:
    """Optimizer steps for the budget; ConfigError if the budget is missing, ambiguous or < 1 step."""
    cfg.check_budget()
    per_step = cfg.context * cfg.batch_size * cfg.grad_accum * world
    if cfg.steps is not None:
        return int(cfg.steps)
    if cfg.tokens is not None:
        tokens, what = cfg.tokens, f"--tokens {cfg.tokens:,}"
    else:
        assert cfg.alpha is not None
        pre = cfg.pretraining_tokens or known_pretraining_tokens(cfg.model)
        if pre is None:
            raise ConfigError(
                f"--alpha needs the source's pretraining token count, unknown for {cfg.model}; "
                "give --pretraining-tokens (e.g. 2T) or use --tokens/--steps"
            )
        tokens, what = int(cfg.alpha * pre), f"--alpha {cfg.alpha} x {pre:,} pretraining tokens"
    steps = tokens // per_step
    if steps < 1:
        raise ConfigError(
            f"budget {what} = {tokens:,} tokens is smaller than one step of {per_step:,} tokens "
            f"(context {cfg.context} x batch {cfg.batch_size} x grad-accum {cfg.grad_accum} x {world} process(es))"
        )
    return steps


def check_context(model_config, context: int) -> None:
    """A context beyond max_position_embeddings needs RoPE scaling in the model's config."""
    if context < 2:
        raise ConfigError(f"--context must be at least 2 tokens, not {context}")
    max_pos = getattr(model_config, "max_position_embeddings", None)
    rope = getattr(model_config, "rope_parameters", None) or getattr(model_config, "rope_scaling", None) or {}
    scaled = isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) not in (None, "default")
    if max_pos is not None and context > max_pos and not scaled:
        raise ConfigError(
            # (kept under ~300 characters: the example was cut off mid-way at a 7-digit context)
            f"--context {context} is above the model's max_position_embeddings {max_pos} and it has no RoPE "
            f"scaling; use --context <= {max_pos}, or set in config.json max_position_embeddings >= {context} and "
            f'"rope_parameters": {{"rope_type": "yarn", "factor": {math.ceil(context / max_pos)}.0, ...}}'
        )


def check_tracker(report_to: str) -> None:
    """--report-to names a tracker whose package is installed (or none)."""
    if report_to == "none":
        return
    packages = TRACKER_PACKAGES[report_to]
    if not any(importlib.util.find_spec(p) is not None for p in packages):
        raise ConfigError(
            f"--report-to {report_to} needs the {packages[0]} package: pip install 'gqa-convert[{report_to}]' "
            f"(or pip install {packages[0]}), or use --report-to none"
        )


def eval_steps(total_steps: int, every: Optional[int], points: int = EVAL_POINTS) -> list[int]:
    """The steps after which the held-out documents are scored: every `every` steps and the last
    one; or, without `every`, `points` evenly spaced steps ending at the last (fewer if the run is
    shorter)."""
    if every:
        steps = set(range(every, total_steps + 1, every))
    else:
        steps = {max(1, (total_steps * k + points // 2) // points) for k in range(1, points + 1)}
    return sorted(steps | {total_steps})


def check_output_place(model: str, out: Path) -> None:
    """--output is neither the model folder nor inside it (checked before anything is created)."""
    if Path(model).exists() and out.resolve() == Path(model).resolve():
        raise OutputError(
            f"--output {out} is the model folder itself; choose a new folder (the source is never modified)"
        )
    if Path(model).is_dir() and Path(model).resolve() in out.resolve().parents:
        raise OutputError(
            f"--output {out} is inside the model folder; choose a folder outside it (the source is never modified)"
        )


def validate(cfg: UptrainConfig, world: int = 1):
    """Every check that needs no model weights; returns (attn, model config, data spec, steps)."""
    from transformers import AutoConfig

    attn = choose_attention(cfg.attn)
    if cfg.loss_impl == "liger":
        import importlib.util

        if not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError(
                "--loss-impl liger needs CUDA and liger-kernel (pip install liger-kernel); "
                "use --loss-impl chunked (the default) or auto"
            )
        if cfg.distill and cfg.distill_weight > 0 and cfg.distill_from:  # a recorded teacher: resolve_defaults
            raise ConfigError("--loss-impl liger has no distillation KL; pass --no-distill, or use --loss-impl chunked")
    check_tracker(cfg.report_to)
    if not Path(cfg.model).exists() and (cfg.model.startswith((".", "/", "~")) or cfg.model.count("/") > 1):
        raise SourceNotFoundError(f"model folder {cfg.model[:200]} does not exist; give the converted model's folder")
    try:
        mcfg = AutoConfig.from_pretrained(cfg.model)
    except (OSError, ValueError) as err:
        raise SourceNotFoundError(f"cannot load a model config from {cfg.model!r}: {str(err).splitlines()[0]}") from err
    check_context(mcfg, cfg.context)
    if cfg.sequence_parallel > 1:  # the degree, the heads, the attention, DeepSpeed installed
        from .sequence_parallel import check as check_sequence_parallel

        check_sequence_parallel(cfg.sequence_parallel, world, mcfg, attn)
    spec = data_spec(cfg.data, cfg, cfg.heldout_docs, cfg.train_start)
    steps = resolve_steps(cfg, world // cfg.sequence_parallel)  # rows per step follow the data-parallel ranks
    spec.check()
    out = Path(cfg.output)
    check_output_place(cfg.model, out)
    if cfg.resume:
        if not (out / CKPT).is_dir() and not (out / CKPT_OLD).is_dir():
            # A run killed before its first checkpoint left its settings: --resume starts it over
            # there (without them the folder is no run of ours).
            if not (out / CONFIG_FILE).is_file():
                raise OutputError(f"--resume: no checkpoint in {out}; run without --resume to start")
            _read_run_config(out)
        else:
            _read_run_config(out)
            _check_checkpoint(out)
    elif out.exists() and any(out.iterdir()):
        raise OutputError(
            f"--output {out} exists and is not empty; pass --resume to continue that run or choose a new folder"
        )
    return attn, mcfg, spec, steps


# ----------------------------------------------------------------------------- defaults resolved


def recorded_source(model: str) -> tuple[Optional[str], str]:
    """(a local folder or file of the source the model's gqa_convert.json names, or None; what it
    is, for the log). Never downloads: a hub source counts only when it is in the local cache."""
    record = ConversionRecord.read(model) if Path(model).is_dir() else None
    if record is None:
        return None, f"{model} has no conversion record (gqa_convert.json) naming its source"
    found = record.find_source()  # the one reading of where a record's source is
    if found is None:
        if record.source_path:
            return None, f"the recorded source {record.source_path} is not there any more"
        return None, f"the record names the source only as {record.source!r}, not a path or hub id"
    spec, at = found
    if Path(spec).exists():
        return spec, spec
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(spec, "config.json", revision=at)
    folder = Path(config).parent if isinstance(config, str) else None
    if folder is None or not any(folder.glob("*.safetensors")):
        return None, f"the recorded source {spec} is not in the local hub cache (nothing is downloaded for it)"
    return str(folder), f"{spec} (local hub cache)"


def resolve_defaults(cfg: UptrainConfig, mcfg) -> tuple[UptrainConfig, list[str]]:
    """The run's settings with the defaults that depend on the model filled in, and what the log
    says about them: the learning rate by the model's width (schedule.default_lr) when --lr is not
    given, and the teacher: --distill-from, else the recorded source when it is found, else none
    (distill off, and the log says why). Checked here, before any work: a teacher that cannot be
    loaded, or one with another vocabulary."""
    from transformers import AutoConfig

    from .schedule import default_lr

    notes, update = [], {}
    if cfg.lr is None:
        width = int(getattr(mcfg, "hidden_size", 0) or 0)
        if not width:
            raise ConfigError(f"{cfg.model}'s config has no hidden_size to choose a learning rate by; pass --lr")
        update["lr"] = default_lr(width)
        notes.append(f"uptrain: learning rate {update['lr']:.3g} (by width: 0.32 / hidden_size {width}; --lr to set)")
    if not cfg.distill or cfg.distill_weight == 0:
        why = "--no-distill" if not cfg.distill else "--distill-weight 0"
        notes.append(f"uptrain: no distillation ({why}): next-token loss only")
        return cfg.model_copy(update=update), notes
    teacher, what = cfg.distill_from, f"{cfg.distill_from} (--distill-from)"
    if teacher is None:
        teacher, what = recorded_source(cfg.model)
        if teacher is None:
            notes.append(
                f"uptrain: no distillation: {what}; training on next-token loss only "
                "(--distill-from SRC to distil from the unconverted model)"
            )
            return cfg.model_copy(update={**update, "distill": False}), notes
        what += " (the recorded source; --no-distill to turn off)"
        if teacher.endswith(".bin") and Path(teacher).is_file():  # a llama2.c checkpoint: its cached import
            from ..source import resolve_source

            teacher = str(resolve_source(teacher))
    if not Path(teacher).exists() and not is_repo_id(teacher):  # a path: not transformers' "Repo id must be ..."
        raise SourceNotFoundError(
            f"the teacher {teacher[:120]} does not exist; pass the unconverted model's folder or hub id "
            "(--distill-from), or --no-distill"
        )
    try:
        tcfg = AutoConfig.from_pretrained(teacher)
    except (OSError, ValueError) as err:
        raise SourceNotFoundError(f"cannot load the teacher {teacher!r}: {str(err).splitlines()[0][:160]}") from None
    if getattr(tcfg, "vocab_size", None) != getattr(mcfg, "vocab_size", None):
        raise ConfigError(
            f"the teacher {teacher} has vocabulary {tcfg.vocab_size}, the model {mcfg.vocab_size}; "
            "distil from the model it was converted from (--distill-from SRC) or pass --no-distill"
        )
    if cfg.loss_impl == "liger":
        raise ConfigError("--loss-impl liger has no distillation KL; pass --no-distill, or use --loss-impl chunked")
    w = cfg.distill_weight
    notes.append(f"uptrain: distilling from {what}: loss = {1 - w:g}*CE + {w:g}*KL(teacher || model)")
    return cfg.model_copy(update={**update, "distill_from": teacher}), notes


# ----------------------------------------------------------------------------- model set-up


def select_trainable(model, train: str) -> int:
    """Freeze all but the chosen parameters; returns the number of trainable values."""
    for name, p in model.named_parameters():
        if train == "all":
            p.requires_grad_(True)
        elif train == "attention":
            p.requires_grad_(".self_attn." in name)
        else:  # kv: the projections the conversion regrouped
            p.requires_grad_(any(f".{k}." in name for k in ("k_proj", "v_proj")))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise ConfigError(f"--train {train} selects no parameters of this model (no self_attn.k_proj/v_proj?)")
    return n


def add_lora(model, train: str, rank: int):
    """Wrap in a peft LoRA whose targets follow --train; merged back into the weights on save."""
    from peft import LoraConfig, get_peft_model

    targets = {
        "kv": ["k_proj", "v_proj"],
        "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }[train]
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets))


# ----------------------------------------------------------------------------- checkpoints


def _unwrap(accelerator, model):
    return accelerator.unwrap_model(model)


def save_checkpoint(out: Path, accelerator, model, optimizer, scheduler, state: dict) -> None:
    """Write checkpoint.tmp/ on every rank, then swap it in for checkpoint/ (never half-written)."""
    from safetensors.torch import save_file

    tmp, final, old = out / CKPT_TMP, out / CKPT, out / CKPT_OLD
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    full = accelerator.get_state_dict(model)  # gathers FSDP shards; plain state dict for DDP
    trainable = {n for n, p in _unwrap(accelerator, model).named_parameters() if p.requires_grad}
    if accelerator.is_main_process:
        tensors = {n: t.detach().cpu().contiguous() for n, t in full.items() if n in trainable}
        save_file(tensors, str(tmp / "trainable.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    try:
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
            tmp / f"optimizer.rank{accelerator.process_index}.pt",
        )
    except RuntimeError as err:  # torch's zip writer says "unexpected pos" for a full disk
        raise_if_disk_full(tmp, err)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        share_modes(tmp)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(out: Path, accelerator, model, optimizer, scheduler) -> dict:
    """Restore trainable weights, optimizer, scheduler and RNG; returns the saved state dict."""
    from safetensors.torch import load_file

    folder = out / CKPT if (out / CKPT / "state.json").exists() else out / CKPT_OLD
    state = json.loads(read_small_text(folder / "state.json"))
    if state["processes"] != accelerator.num_processes:
        raise ConfigError(
            f"checkpoint was written by {state['processes']} process(es); resume with the same number, "
            f"not {accelerator.num_processes}"
        )
    tensors = load_file(str(folder / "trainable.safetensors"))
    missing = [n for n in tensors if n not in dict(_unwrap(accelerator, model).named_parameters())]
    if missing:
        raise ConfigError(
            f"checkpoint does not match this model (e.g. {missing[0]}); was it written with other settings?"
        )
    _unwrap(accelerator, model).load_state_dict(tensors, strict=False)
    blob = torch.load(folder / f"optimizer.rank{accelerator.process_index}.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    random.setstate(blob["rng"]["python"])
    torch.set_rng_state(blob["rng"]["torch"])
    if "cuda" in blob["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
    return state


# ----------------------------------------------------------------------------- outputs


def smoothed(values: Sequence[float], span: float) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing): weight 1 - 1/span per
    step, divided by 1 - weight**n so the first points are not pulled towards 0."""
    beta = 1.0 - 1.0 / max(span, 1.0)
    out, avg = [], 0.0
    for n, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**n) if beta > 0 else v)
    return out


def smoothing_span(steps: int) -> float:
    """The EMA span of the loss plot: 10 steps, or 2% of the run when that is longer."""
    return max(10.0, steps / 50)


def plot_curve(metrics: Path, png: Path) -> None:
    """The training objective and the held-out loss against tokens, from metrics.jsonl.

    Drawn: each step's training cross-entropy (and KL(source || model) when distilling) as a faint
    line and as its exponential moving average (`smoothed`, span `smoothing_span`); the held-out loss
    at each evaluation (markers, not smoothed); the learning rate (grey, right axis).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in _read_metrics(metrics) if "loss" in r]
    if not rows:
        return
    span = smoothing_span(len(rows))
    tokens = [r["tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    series = [("loss", "train CE", "C0")]
    if any("kl" in r for r in rows):
        series.append(("kl", "train KL(source || model)", "C2"))
    for key, label, color in series:
        pts = [(r["tokens"], r[key]) for r in rows if key in r]
        xs, ys = [x for x, _ in pts], [y for _, y in pts]
        ax.plot(xs, ys, color=color, lw=0.6, alpha=0.3)
        ax.plot(xs, smoothed(ys, span), color=color, lw=1.6, label=f"{label} (EMA, span {span:g} steps)")
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        where = evals[-1].get("eval_slice", "held-out")
        ax.plot(
            [r["tokens"] for r in evals],
            [r["eval_loss"] for r in evals],
            color="C3",
            lw=1.4,
            marker="o",
            ms=4,
            label=f"held-out loss ({where}, {evals[-1].get('eval_docs', '?')} docs)",
        )
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_xlim(0, max(tokens) * 1.01)
    ax2 = ax.twinx()
    ax2.plot(tokens, [r["lr"] for r in rows], color="grey", lw=0.8, ls="--")
    ax2.set_ylabel("learning rate", color="grey")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("gqa-convert uptrain")
    fig.tight_layout()
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)


def _read_metrics(path: Path) -> list[dict]:
    """The lines of metrics.jsonl that parse (a line cut short by a kill is left out)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drop lines a killed run logged after its last checkpoint, so the curve is continuous."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line cut short by the kill
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def save_final(out: Path, model, tokenizer, dtype: torch.dtype, lora: bool, source: Optional[Path] = None) -> None:
    """Model (merged LoRA, source dtype, safetensors) + tokenizer, written beside and renamed in."""
    if lora:
        model = model.merge_and_unload()
    model = model.to(dtype)
    model.config.use_cache = True
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    # The conversion record (source, heads, merge method) stays with the model it describes, and a
    # sentencepiece tokenizer.model (llama.cpp's converter reads it), which save_pretrained drops.
    for name in ("gqa_convert.json", "tokenizer.model"):
        if source is not None and (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, tmp / name)
    share_modes(tmp)  # safetensors writes 0600: a served model must be readable by others
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)
    tmp.rmdir()


def _source_dtype(mcfg) -> torch.dtype:
    d = getattr(mcfg, "dtype", None) or getattr(mcfg, "torch_dtype", None) or torch.float32
    return getattr(torch, d) if isinstance(d, str) else d


# ----------------------------------------------------------------------------- the loop


def uptrain(cfg: UptrainConfig) -> UptrainResult:
    """Run (or resume) an uptraining run; see the module docstring for what it writes."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    attn, mcfg, spec, total_steps = validate(cfg, world)
    cfg, default_notes = resolve_defaults(cfg, mcfg)
    out = Path(cfg.output)
    cuda = torch.cuda.is_available()
    if not cuda:
        return_large_frees_to_os()  # the step's freed multi-MB buffers would otherwise stay resident
    tracking = cfg.report_to != "none"
    sp = cfg.sequence_parallel
    if sp > 1:  # DeepSpeed Ulysses through accelerate's ParallelismConfig (train/sequence_parallel.py)
        from . import sequence_parallel as spm

        accelerator = spm.make_accelerator(
            sp,
            cfg.context,
            attn,
            cfg.clip,
            mixed_precision="bf16" if cuda else "no",
            log_with=cfg.report_to if tracking else None,
            project_dir=str(out) if tracking else None,
        )
    else:
        accelerator = Accelerator(
            mixed_precision="bf16" if cuda else "no",
            cpu=not cuda,
            log_with=cfg.report_to if tracking else None,
            project_dir=str(out) if tracking else None,
        )
    main = accelerator.is_main_process
    accelerator.wait_for_everyone()  # every rank has validated the output folder before rank 0 writes to it
    if accelerator.num_processes != world:  # WORLD_SIZE unset under some launchers
        world = accelerator.num_processes
        total_steps = resolve_steps(cfg, world // sp)
    # From here `world` counts the data-parallel ranks: an SP group of `sp` consecutive ranks trains
    # on the same rows, each rank on its slice of every row's tokens.
    sp_rank = accelerator.process_index % sp
    world, dp_rank = world // sp, accelerator.process_index // sp
    log = accelerator.print
    log(
        f"uptrain: attention = {attn}"
        + ("" if attn.startswith("flash") else " (PyTorch SDPA; flash-attn not used)")
        + f", {accelerator.num_processes} process(es) on {accelerator.device}"
        + (f" ({accelerator.distributed_type.value})" if accelerator.num_processes > 1 else "")
        + (f", sequence parallel {sp} (DeepSpeed Ulysses) x data parallel {world}" if sp > 1 else "")
    )
    for note in default_notes:
        log(note)

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer of {cfg.model} has no EOS token, needed between packed documents")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        diff = run_differences(_read_run_config(out), cfg.model_dump(mode="json"))
        if diff:
            raise ConfigError(f"--resume with different settings ({', '.join(diff)}); use the original ones")
    # --resume of a run killed before its first checkpoint: nothing to continue, it starts over.
    restart = cfg.resume and not (out / CKPT).is_dir() and not (out / CKPT_OLD).is_dir()
    if main and (not cfg.resume or restart):
        write_json_atomic(out / CONFIG_FILE, cfg.model_dump(mode="json"))
        write_heldout(spec, out / "heldout.jsonl")
        if restart:
            _trim_metrics(out / "metrics.jsonl", 0)
    accelerator.wait_for_everyone()
    eval_docs, eval_slice, eval_at = _eval_plan(cfg, spec, tokenizer, total_steps, log)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    n_train = select_trainable(model, cfg.train)
    if cfg.lora:
        model = add_lora(model, cfg.train, cfg.lora_rank)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else cuda:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.train != "all" or cfg.lora:
            model.enable_input_require_grads()
    teacher = None
    if cfg.distill and cfg.distill_from and cfg.distill_weight > 0:
        teacher = (
            AutoModelForCausalLM.from_pretrained(
                cfg.distill_from, dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation=attn
            )
            .to(accelerator.device)
            .eval()
        )
        teacher.requires_grad_(False)
        if teacher.config.vocab_size != model.config.vocab_size:
            raise ConfigError(
                f"--distill-from {cfg.distill_from} has vocabulary {teacher.config.vocab_size}, "
                f"the model {model.config.vocab_size}; distil from the model it was converted from"
            )

    if sp == 1:
        model = accelerator.prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]
    assert cfg.lr is not None  # resolve_defaults chose it by the model's width
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: wsd_factor(s, total_steps, cfg.warmup, cfg.decay, cfg.lr_floor)
    )
    if sp == 1:
        optimizer = accelerator.prepare(optimizer)
    else:  # DeepSpeed takes model and optimizer together (its engine steps the same AdamW)
        model, optimizer = spm.prepare(
            accelerator, model, optimizer, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum
        )
    log(
        f"uptrain: {total_steps} steps x {cfg.context * cfg.batch_size * cfg.grad_accum * world:,} tokens, "
        f"training {n_train:,} parameters ({cfg.train}{', LoRA' if cfg.lora else ''})"
    )

    rows_per_step = cfg.batch_size * cfg.grad_accum * world
    stream = RowStream(
        spec, tokenizer, cfg.context, shuffle_buffer=cfg.shuffle_buffer if cfg.shuffle else 0, seed=cfg.seed
    )
    log(
        f"uptrain: training documents shuffled (seed {cfg.seed}, a new order each epoch, "
        f"buffer of {cfg.shuffle_buffer:,} documents)"
        if cfg.shuffle
        else "uptrain: training documents in the order of the source (--no-shuffle)"
    )
    start, tokens_done, elapsed_before = 0, 0, 0.0
    if cfg.resume and not restart:
        try:
            state = load_checkpoint(out, accelerator, model, optimizer, scheduler)
        except GqaConvertError:
            raise
        except Exception as err:  # truncated safetensors, damaged optimizer file, state.json not JSON
            raise CheckpointError(
                f"--resume: the checkpoint in {out} is damaged ({type(err).__name__}: {str(err)[:80]}); start "
                "over in a new --output (or delete its checkpoint/ folder to resume from checkpoint.old/)"
            ) from None
        start, tokens_done, elapsed_before = state["step"], state["tokens"], state["elapsed_s"]
        stream.skip(state["rows"])
        if main:
            _trim_metrics(out / "metrics.jsonl", start)
        log(f"uptrain: resumed at step {start} of {total_steps}")

    if tracking:
        _init_tracker(accelerator, cfg, out, start)
    metrics_path = out / "metrics.jsonl"
    trace = os.environ.get(TRACE_ENV) if main else None
    bar = tqdm(total=total_steps, initial=start, disable=not (main and cfg.progress), unit="step", dynamic_ncols=True)
    model.train()
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    losses: list[float] = []
    evals: list[dict] = []
    last_eval: Optional[float] = None
    t_run = time.perf_counter()
    for step in range(start, total_steps):
        t0 = time.perf_counter()
        done = step + 1
        global_rows, row_docs = [], []
        for _ in range(rows_per_step):
            global_rows.append(stream.next())
            row_docs.append(list(stream.last_docs))
        # The number of targets in the whole global batch normalises every micro-batch's loss sum.
        n_targets = int((collate(global_rows)["labels"][:, 1:] != IGNORE).sum())
        # DDP/FSDP average gradients over processes; Ulysses sums them over its SP ranks and averages
        # over the data-parallel ones (sequence_parallel.loss_scale): world = data-parallel ranks.
        scale = world / n_targets
        ce_sum = torch.zeros((), device=accelerator.device)
        kl_sum = torch.zeros((), device=accelerator.device)
        for micro in range(cfg.grad_accum):
            first = (micro * world + dp_rank) * cfg.batch_size
            batch = {
                k: v.to(accelerator.device) for k, v in collate(global_rows[first : first + cfg.batch_size]).items()
            }
            last = micro == cfg.grad_accum - 1
            ctx = accelerator.no_sync(model) if not last else _nullcontext()
            with ctx:
                # The loss from the final hidden states, a chunk of tokens at a time through the
                # output head: never the [T, V] logits (train/loss.py; 67 GB at 128K for Llama-3).
                with accelerator.autocast():
                    if sp > 1:  # this rank's slice of the rows (targets shifted on the whole row)
                        part = spm.shard(batch, sp, sp_rank)
                        ce, kl, _ = spm.losses(model, batch, part, teacher, sp=sp, sp_rank=sp_rank,
                                               chunk_tokens=cfg.loss_chunk_tokens, impl=cfg.loss_impl)  # fmt: skip
                    else:
                        ce, kl, _ = packed_losses(
                            model, batch, teacher, chunk_tokens=cfg.loss_chunk_tokens, impl=cfg.loss_impl
                        )
                loss = (1 - cfg.distill_weight) * ce + cfg.distill_weight * kl if teacher is not None else ce
                if sp > 1:
                    spm.backward(model, loss * scale, last)
                else:
                    accelerator.backward(loss * scale)
            ce_sum += ce.detach()
            kl_sum += kl.detach()
        # Under DeepSpeed its engine clips (to cfg.clip, set in its config) and steps here; the
        # optimizer.step()/zero_grad() below are then accelerate's no-ops.
        grad_norm = spm.step(model) if sp > 1 else accelerator.clip_grad_norm_(params, cfg.clip)
        lr_used = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sums = accelerator.reduce(torch.stack([ce_sum, kl_sum]), reduction="sum")
        ce_mean, kl_mean = (sums / n_targets).tolist()
        step_tokens = rows_per_step * cfg.context
        tokens_done += step_tokens
        dt = time.perf_counter() - t0
        losses.append(ce_mean)
        ev = _evaluate(model, tokenizer, eval_docs, cfg, accelerator) if done in eval_at else None
        if ev is not None:
            last_eval = ev.mean_loss
            evals.append({"step": done, "tokens": tokens_done, "eval_loss": ev.mean_loss})
        if main:
            rec = {
                "step": done,
                "tokens": tokens_done,
                "loss": round(ce_mean, 6),
                "lr": lr_used,
                "grad_norm": round(float(grad_norm), 5),
                "tokens_per_s": round(step_tokens / dt, 1),
                "epoch": stream.epoch,
                "elapsed_s": round(elapsed_before + time.perf_counter() - t_run, 3),
            }
            if teacher is not None:
                rec["kl"] = round(kl_mean, 6)
            if ev is not None:
                rec.update(
                    eval_loss=round(ev.mean_loss, 6),
                    eval_tokens=ev.tokens,
                    eval_docs=ev.documents,
                    eval_slice=eval_slice,
                )
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            if trace:
                with open(trace, "a") as fh:
                    fh.write(json.dumps({"step": done, "docs": row_docs}) + "\n")
            shown = {"loss": f"{ce_mean:.4f}", "tok_s": f"{step_tokens / dt:,.0f}"}
            if teacher is not None:
                shown["kl"] = f"{kl_mean:.4f}"
            if last_eval is not None:
                shown["eval"] = f"{last_eval:.4f}"
            bar.set_postfix(shown, refresh=False)
            bar.update(1)
        if tracking:
            values = {
                "train/loss": ce_mean,
                "train/lr": lr_used,
                "train/grad_norm": float(grad_norm),
                "train/tokens_per_s": step_tokens / dt,
                "train/tokens": tokens_done,
                "train/epoch": stream.epoch,
            }
            if teacher is not None:
                values["train/kl"] = kl_mean
            if ev is not None:
                values["eval/loss"] = ev.mean_loss
            accelerator.log(values, step=done)
        if done % cfg.save_every == 0 or done == total_steps:
            save_checkpoint(
                out,
                accelerator,
                model,
                optimizer,
                scheduler,
                {
                    "step": done,
                    "rows": done * rows_per_step,
                    "tokens": tokens_done,
                    "processes": accelerator.num_processes,
                    "elapsed_s": elapsed_before + time.perf_counter() - t_run,
                    "epoch": stream.epoch,
                },
            )
            if main:
                plot_curve(metrics_path, out / "loss_curve.png")
        if kill_after and done == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the resume test
    bar.close()
    run_s = time.perf_counter() - t_run
    accelerator.wait_for_everyone()
    if main:
        final_model = _unwrap(accelerator, model)
        save_final(out, final_model, tokenizer, _source_dtype(mcfg), cfg.lora, source=Path(cfg.model))
        plot_curve(metrics_path, out / "loss_curve.png")
    if main:
        rows = _read_metrics(metrics_path)
        all_losses = [r["loss"] for r in rows if "loss" in r]
        evals = [{k: r[k] for k in ("step", "tokens", "eval_loss")} for r in rows if "eval_loss" in r]
    else:
        all_losses = losses
    result = UptrainResult(
        output=out,
        steps=total_steps,
        tokens=tokens_done,
        final_loss=all_losses[-1] if all_losses else float("nan"),
        tokens_per_s=(total_steps - start) * rows_per_step * cfg.context / max(run_s, 1e-9),
        attn_implementation=attn,
        heldout_docs=spec.heldout,
        resumed_from=start,
        losses=all_losses,
        eval_loss=evals[-1]["eval_loss"] if evals else None,
        eval_slice=eval_slice if evals else None,
        evals=evals,
    )
    if main:
        _record(cfg, result, spec).write(out)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _check_checkpoint(out: Path) -> None:
    """A damaged checkpoint is found before any model is loaded: its state.json parses, the
    safetensors header and the optimizer archives are whole."""
    import zipfile

    from safetensors import safe_open

    folder = out / CKPT if (out / CKPT / "state.json").exists() else out / CKPT_OLD
    try:
        state = json.loads(read_small_text(folder / "state.json"))
        # The counts the resume reads (a list, "two" or -5 reached them as tracebacks or a bad skip).
        counts = ("step", "rows", "tokens", "processes")
        if not isinstance(state, dict) or not all(type(state.get(k)) is int and state[k] >= 0 for k in counts):
            raise ValueError("state.json lacks whole step/rows/tokens/processes counts")
        if not isinstance(state.get("elapsed_s"), (int, float)):
            raise ValueError("state.json lacks elapsed_s")
        with safe_open(str(folder / "trainable.safetensors"), "pt") as f:
            for name in f.keys():
                f.get_slice(name)  # reads the header; a truncated file fails here or below
        size = (folder / "trainable.safetensors").stat().st_size
        with open(folder / "trainable.safetensors", "rb") as fh:
            header = int.from_bytes(fh.read(8), "little")
            meta = json.loads(fh.read(header))
        end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
        if 8 + header + end > size:
            raise ValueError("trainable.safetensors is shorter than its header says")
        for opt in folder.glob("optimizer.rank*.pt"):
            with zipfile.ZipFile(opt) as z:
                if z.testzip() is not None:
                    raise ValueError(f"{opt.name} is corrupt")
    except Exception as err:  # any damage: one line, before any work
        raise CheckpointError(
            f"--resume: the checkpoint in {out} is damaged ({type(err).__name__}: {str(err)[:80]}); start "
            "over in a new --output (or delete its checkpoint/ folder to resume from checkpoint.old/)"
        ) from None


def run_differences(saved: dict, now: dict) -> list[str]:
    """The RUN_FIELDS on which a run's saved settings and a resume's settings differ."""
    saved = {**LEGACY_RUN_FIELDS, **saved}
    diff = []
    for k in RUN_FIELDS:
        if k not in saved:
            continue  # a field added after the run started, with no effect on what it did
        if k == "shuffle_buffer" and not (saved.get("shuffle") or now.get("shuffle")):
            continue
        if saved.get(k) != now.get(k):
            diff.append(k)
    return diff


def _eval_plan(cfg: UptrainConfig, spec, tokenizer, total_steps: int, log) -> tuple[list[str], str, set[int]]:
    """(held-out documents to score, their name, the steps after which to score them)."""
    import itertools

    n = min(cfg.eval_docs, spec.heldout)
    why = None
    if cfg.eval_docs and not spec.heldout:
        why = "--heldout-docs 0 sets no documents aside"
    elif n and tokenizer.bos_token_id is None:
        why = "the tokenizer has no BOS token, which evaluate.document_loss prefixes to every document"
    if why or not n:
        if why:
            log(f"uptrain: no held-out evaluation: {why}")
        return [], "", set()
    docs = list(itertools.islice(spec.documents(), n))  # the first n of the held-out slice (heldout.jsonl)
    name = f"documents[0:{n}]"
    steps = eval_steps(total_steps, cfg.eval_every)
    shown = ", ".join(map(str, steps[:8])) + (", ..." if len(steps) > 8 else "")
    log(f"uptrain: held-out loss on {name} (the first {n} of heldout.jsonl) after steps {shown}")
    return docs, name, set(steps)


def _evaluate(model, tokenizer, docs: list[str], cfg: UptrainConfig, accelerator):
    """evaluate.document_loss of the model being trained on `docs`, at the training context.

    Every process scores all of them (the same forwards, so DDP's buffer sync and FSDP's gathers
    match); under autocast as in training (bf16 on CUDA, float32 on CPU). Back in train mode after.
    """
    from ..evaluate import document_loss

    with accelerator.autocast():
        result = document_loss(
            model,
            tokenizer,
            docs,
            max_tokens=cfg.context,
            batch_size=cfg.batch_size,
            chunk_tokens=cfg.loss_chunk_tokens,
        )
    model.train()
    return result


def _tracker_config(cfg: UptrainConfig) -> dict[str, Any]:
    """The run's settings for a tracker: scalars only (tensorboard's hparams take nothing else), local
    paths by their name (a tracker may upload them)."""
    config: dict[str, Any] = {}
    for k, v in cfg.model_dump(mode="json").items():
        if k in ("model", "data", "distill_from", "output"):
            v = _public(v) if k != "output" else Path(v).name
        if v is None:
            continue
        config[k] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return config


def _init_tracker(accelerator, cfg: UptrainConfig, out: Path, start: int) -> None:
    """accelerate's tracker for --report-to: tensorboard event files in OUTPUT/tensorboard/ (a resumed
    run purges the steps logged after its checkpoint); wandb offline in OUTPUT/wandb/ unless
    WANDB_MODE says otherwise; trackio in its local store."""
    kwargs: dict[str, dict] = {}
    if cfg.report_to == "tensorboard":
        project = TRACKER_DIR
        if start:
            kwargs["tensorboard"] = {"purge_step": start + 1}
    else:
        project = "gqa-convert"
        if cfg.report_to == "wandb":
            kwargs["wandb"] = {"dir": str(out), "name": out.name}
            if "WANDB_MODE" not in os.environ:
                kwargs["wandb"]["mode"] = "offline"
        else:
            kwargs["trackio"] = {"name": out.name, "resume": "allow"}
    accelerator.init_trackers(project, config=_tracker_config(cfg), init_kwargs=kwargs)
    where = {"tensorboard": f"{out / TRACKER_DIR}", "wandb": f"{out / 'wandb'}", "trackio": "trackio's local store"}
    mode = os.environ.get("WANDB_MODE", "offline") if cfg.report_to == "wandb" else ""
    accelerator.print(f"uptrain: logging to {cfg.report_to}{f' ({mode})' if mode else ''}: {where[cfg.report_to]}")


def _read_run_config(out: Path) -> dict:
    """The settings the run in OUT started with (uptrain_config.json), or one line saying what to do."""
    path = out / CONFIG_FILE
    try:
        data = json.loads(read_small_text(path))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise OutputError(f"--resume: {path} is missing or damaged; start a new run in another --output") from None
    if not isinstance(data, dict):
        raise OutputError(f"--resume: {path} is damaged; start a new run in another --output")
    return data


def _public(value: Optional[str]) -> Optional[str]:
    """A hub id as it is; a local path by its name only (the record is published)."""
    if value is None:
        return None
    return Path(value).name if Path(value).exists() or value.startswith((".", "/", "~")) else value


def _record(cfg: UptrainConfig, result: UptrainResult, spec) -> UptrainRecord:
    """uptrain.json: what ran (settings, local paths by name) and what it measured."""
    settings = UptrainSettings.model_validate({k: getattr(cfg, k) for k in UptrainSettings.model_fields}).model_dump(
        mode="json"
    )
    settings["distill_from"] = _public(settings["distill_from"])
    settings["data"] = _public(settings["data"])
    public = cfg.model_copy(
        update={
            "model": _public(cfg.model),
            "data": _public(cfg.data),
            "output": Path(cfg.output).name,
            "distill_from": _public(cfg.distill_from),
        }
    )
    return UptrainRecord(
        model=_public(cfg.model),
        data=_public(cfg.data),
        context=cfg.context,
        steps=result.steps,
        tokens=result.tokens,
        final_loss=result.final_loss,
        eval_loss=result.eval_loss,
        eval_slice=result.eval_slice,
        tokens_per_s=result.tokens_per_s,
        attn_implementation=result.attn_implementation,
        heldout_docs=spec.heldout,
        train_start=spec.first_train_doc,
        resumed_from=result.resumed_from,
        settings=settings,
        command=command_line("uptrain", public, positional=("model",), skip=("resume", "progress")),
    )


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
