"""Uptrain a converted model: continued pretraining on packed documents at the serving context.

    result = uptrain(UptrainConfig(model="out/llama-kv2", data="corpus/", context=8192,
                                   tokens="50M", output="out/llama-kv2-up"))

One optimizer step consumes `batch_size * grad_accum * processes` rows of exactly `context` tokens
(no padding). The loss of a step is the sum of token cross-entropies over the whole global batch
divided by its number of target tokens, so 1 process with batch 4 and 2 processes with batch 2
take the same step. Runs under `accelerate launch` (DDP, FSDP) through `accelerate.Accelerator`.

Output folder: the final model (safetensors, config, tokenizer; loads with
AutoModelForCausalLM.from_pretrained), metrics.jsonl, loss_curve.png, heldout.jsonl (the held-out
documents, never trained on), uptrain_config.json (the settings a --resume must match),
uptrain.json (records.UptrainRecord: what ran and what it measured), and checkpoint/ (trainable
weights as safetensors; optimizer, scheduler and RNG via torch.save, loaded with weights_only=True).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..errors import CheckpointError, ConfigError, GqaConvertError, OutputError, SourceNotFoundError
from ..fileio import write_json_atomic
from ..records import ConversionRecord, UptrainRecord
from ..settings import UptrainConfig, UptrainSettings, command_line, data_spec
from .backend import choose_attention
from .data import IGNORE, RowStream, collate, write_heldout
from .loss import packed_losses
from .schedule import wsd_factor

CKPT, CKPT_TMP, CKPT_OLD = "checkpoint", "checkpoint.tmp", "checkpoint.old"
CONFIG_FILE = "uptrain_config.json"  # the run's settings, written at its start: what --resume must match
KILL_ENV = "GQA_CONVERT_KILL_AFTER_STEP"  # test hook: SIGKILL this process after step k
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
    "distill_from",
    "distill_weight",
    "lora",
    "lora_rank",
    "heldout_docs",
    "train_start",
    "seed",
)


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
            f"--context {context} is longer than the model's max_position_embeddings {max_pos} and it has no RoPE "
            f"scaling; use --context <= {max_pos}, or add rope scaling to config.json, e.g. "
            f'"rope_parameters": {{"rope_type": "yarn", "factor": {math.ceil(context / max_pos)}.0, '
            f'"original_max_position_embeddings": {max_pos}, "rope_theta": ...}} and max_position_embeddings >= {context}'
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
        if cfg.distill_weight > 0:
            raise ConfigError("--loss-impl liger has no distillation KL; use --loss-impl chunked with --distill-weight")
    try:
        mcfg = AutoConfig.from_pretrained(cfg.model)
    except (OSError, ValueError) as err:
        raise SourceNotFoundError(f"cannot load a model config from {cfg.model!r}: {str(err).splitlines()[0]}") from err
    check_context(mcfg, cfg.context)
    spec = data_spec(cfg.data, cfg, cfg.heldout_docs, cfg.train_start)
    steps = resolve_steps(cfg, world)
    spec.check()
    out = Path(cfg.output)
    if Path(cfg.model).exists() and out.resolve() == Path(cfg.model).resolve():
        raise OutputError(
            f"--output {out} is the model folder itself; choose a new folder (the source is never modified)"
        )
    if cfg.resume:
        if not (out / CKPT).is_dir() and not (out / CKPT_OLD).is_dir():
            raise OutputError(f"--resume: no checkpoint in {out}; run without --resume to start")
    elif out.exists() and any(out.iterdir()):
        raise OutputError(
            f"--output {out} exists and is not empty; pass --resume to continue that run or choose a new folder"
        )
    return attn, mcfg, spec, steps


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
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
        tmp / f"optimizer.rank{accelerator.process_index}.pt",
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(out: Path, accelerator, model, optimizer, scheduler) -> dict:
    """Restore trainable weights, optimizer, scheduler and RNG; returns the saved state dict."""
    from safetensors.torch import load_file

    folder = out / CKPT if (out / CKPT / "state.json").is_file() else out / CKPT_OLD
    state = json.loads((folder / "state.json").read_text())
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


def plot_curve(metrics: Path, png: Path) -> None:
    """Training loss (and LR) against tokens, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], lw=1, label="train loss")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token)")
    ax2 = ax.twinx()
    ax2.plot([r["tokens"] for r in rows], [r["lr"] for r in rows], color="grey", lw=0.8, ls="--")
    ax2.set_ylabel("learning rate", color="grey")
    ax.set_title("gqa-convert uptrain")
    fig.tight_layout()
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)


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
    if source is not None and (Path(source) / "gqa_convert.json").is_file():
        # The conversion record (source, heads, merge method) stays with the model it describes.
        shutil.copyfile(Path(source) / "gqa_convert.json", tmp / "gqa_convert.json")
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
    out = Path(cfg.output)
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)
    main = accelerator.is_main_process
    accelerator.wait_for_everyone()  # every rank has validated the output folder before rank 0 writes to it
    if accelerator.num_processes != world:  # WORLD_SIZE unset under some launchers
        world = accelerator.num_processes
        total_steps = resolve_steps(cfg, world)
    log = accelerator.print
    log(
        f"uptrain: attention = {attn}"
        + ("" if attn.startswith("flash") else " (PyTorch SDPA; flash-attn not used)")
        + f", {accelerator.num_processes} process(es) on {accelerator.device}"
        + (f" ({accelerator.distributed_type.value})" if accelerator.num_processes > 1 else "")
    )

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer of {cfg.model} has no EOS token, needed between packed documents")
    out.mkdir(parents=True, exist_ok=True)
    if main and not cfg.resume:
        write_json_atomic(out / CONFIG_FILE, cfg.model_dump(mode="json"))
        write_heldout(spec, out / "heldout.jsonl")
    if cfg.resume:
        saved = _read_run_config(out)
        now = cfg.model_dump(mode="json")
        diff = [k for k in RUN_FIELDS if saved.get(k) != now.get(k)]
        if diff:
            raise ConfigError(f"--resume with different settings ({', '.join(diff)}); use the original ones")
    accelerator.wait_for_everyone()

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
    if cfg.distill_from and cfg.distill_weight > 0:
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

    model = accelerator.prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: wsd_factor(s, total_steps, cfg.warmup, cfg.decay, cfg.lr_floor)
    )
    optimizer = accelerator.prepare(optimizer)
    log(
        f"uptrain: {total_steps} steps x {cfg.context * cfg.batch_size * cfg.grad_accum * world:,} tokens, "
        f"training {n_train:,} parameters ({cfg.train}{', LoRA' if cfg.lora else ''})"
    )

    rows_per_step = cfg.batch_size * cfg.grad_accum * world
    stream = RowStream(spec, tokenizer, cfg.context)
    start, tokens_done, elapsed_before = 0, 0, 0.0
    if cfg.resume:
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

    metrics_path = out / "metrics.jsonl"
    bar = tqdm(total=total_steps, initial=start, disable=not (main and cfg.progress), unit="step", dynamic_ncols=True)
    model.train()
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    losses: list[float] = []
    t_run = time.perf_counter()
    for step in range(start, total_steps):
        t0 = time.perf_counter()
        global_rows = [stream.next() for _ in range(rows_per_step)]
        # The number of targets in the whole global batch normalises every micro-batch's loss sum.
        n_targets = int((collate(global_rows)["labels"][:, 1:] != IGNORE).sum())
        scale = accelerator.num_processes / n_targets  # DDP/FSDP average gradients over processes
        ce_sum = torch.zeros((), device=accelerator.device)
        kl_sum = torch.zeros((), device=accelerator.device)
        for micro in range(cfg.grad_accum):
            first = (micro * world + accelerator.process_index) * cfg.batch_size
            batch = {
                k: v.to(accelerator.device) for k, v in collate(global_rows[first : first + cfg.batch_size]).items()
            }
            last = micro == cfg.grad_accum - 1
            ctx = accelerator.no_sync(model) if not last else _nullcontext()
            with ctx:
                # The loss from the final hidden states, a chunk of tokens at a time through the
                # output head: never the [T, V] logits (train/loss.py; 67 GB at 128K for Llama-3).
                with accelerator.autocast():
                    ce, kl, _ = packed_losses(
                        model, batch, teacher, chunk_tokens=cfg.loss_chunk_tokens, impl=cfg.loss_impl
                    )
                loss = (1 - cfg.distill_weight) * ce + cfg.distill_weight * kl if teacher is not None else ce
                accelerator.backward(loss * scale)
            ce_sum += ce.detach()
            kl_sum += kl.detach()
        grad_norm = accelerator.clip_grad_norm_(params, cfg.clip)
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
        if main:
            rec = {
                "step": step + 1,
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
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{ce_mean:.4f}", tok_s=f"{step_tokens / dt:,.0f}", refresh=False)
            bar.update(1)
        done = step + 1
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
    all_losses = [json.loads(x)["loss"] for x in metrics_path.read_text().splitlines() if x.strip()] if main else losses
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
    )
    if main:
        _record(cfg, result, spec).write(out)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _read_run_config(out: Path) -> dict:
    """The settings the run in OUT started with (uptrain_config.json), or one line saying what to do."""
    path = out / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
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
