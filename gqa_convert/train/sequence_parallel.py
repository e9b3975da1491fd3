"""Sequence parallelism for uptraining: DeepSpeed Ulysses through accelerate's ParallelismConfig.

    uptrain --sequence-parallel 2 ...   under   torchrun --nproc_per_node 2 -m gqa_convert uptrain ...

What runs (accelerate >= 1.12 `ParallelismConfig(sp_backend="deepspeed")`, DeepSpeed >= 0.18.2):
the processes form groups of `sp` ranks; each group trains on the same rows, each rank holding a
contiguous 1/sp slice of every row's tokens. In every attention layer DeepSpeed's
`UlyssesSPAttentionHF` all-to-alls the query/key/value projections so that each rank holds the
whole sequence for n_heads/sp heads (KV heads are replicated when sp exceeds them), runs the model's
own attention function on it, and all-to-alls the output back to the rank's slice of tokens. The
wrapper replaces the chosen attention in transformers' registry and drops the attention mask; it
all-gathers `position_ids` and hands them to the attention, so:

- "sdpa_packed" (train/attention.py) rebuilds each packed document from the gathered position ids
  and attends inside it: the packing stays exact (tests/test_sequence_parallel.py, CPU);
- flash-attn 2's varlen path reads documents from the same position ids (GPU, unverified here);
- stock "sdpa" ignores position ids without a mask: every token would attend across document
  boundaries, so it is refused.

Where this module departs from accelerate's recipe, and why (all measured on 2 CPU processes):
- the loss: accelerate's/DeepSpeed's documented recipe all-gathers every rank's loss, which makes
  every rank back-propagate sp times its share; DeepSpeed then sums the gradients over the sequence
  ranks (it divides only by the data-parallel degree), so gradients come out sp times too large.
  Here each rank back-propagates its own token-loss sum x dp / (targets of the global batch); the
  sum over the sequence ranks and the mean over the data-parallel ones is then exactly the
  single-process gradient (`loss_scale`).
- the labels are shifted on the whole row before it is cut (as UlyssesSPDataLoaderAdapter does):
  the last token of one rank's slice predicts the first token of the next rank's slice. Every rank
  already builds the step's rows (train/data.RowStream is deterministic), so a rank simply takes its
  slice (`shard`): no DataLoader adapter and no communication.
- clipping: accelerate's DeepSpeed plugin writes `gradient_clipping: 1.0` unless told; the plugin
  is built with the run's `clip`.
- rows are padded to a multiple of sp with a padding "document" (position ids from 0, no targets):
  causal attention keeps every real token blind to it.
- DeepSpeed runs ZeRO stage 0 here (weights, gradients and optimizer replicated; Adam steps in
  float32 under torch's own AdamW, the same optimizer as without SP).

On CPU (tests only) DeepSpeed compiles a small shared-memory communication extension at its first
start (needs a C++ compiler and ninja; about 3 minutes on a 2-core machine, then cached under
~/.cache/torch_extensions). Two ranks compiling it at once corrupt each other's ninja state and it
is rebuilt on every start, so `_build_cpu_comm` builds it under a file lock first.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from ..errors import ConfigError
from .data import IGNORE

MIN_DEEPSPEED = "0.18.2"  # first release with UlyssesSPAttentionHF / the accelerate integration
MIN_ACCELERATE = "1.12.0"  # first release with ParallelismConfig(sp_backend="deepspeed")
# The attention implementations that keep packed documents apart under Ulysses (see the docstring).
SP_ATTENTION = ("sdpa_packed", "flash_attention_2")


def require_deepspeed() -> None:
    """DeepSpeed and a new enough accelerate are installed, or one line saying how to get them."""
    from importlib.metadata import version

    from packaging.version import Version

    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "--sequence-parallel needs DeepSpeed: pip install 'gqa-convert[sp]' "
            "(on a machine without CUDA: DS_BUILD_OPS=0 pip install 'gqa-convert[sp]')"
        )
    for name, least in (("deepspeed", MIN_DEEPSPEED), ("accelerate", MIN_ACCELERATE)):
        if Version(version(name)) < Version(least):
            raise ConfigError(
                f"--sequence-parallel needs {name} >= {least}, found {version(name)}: pip install -U {name}"
            )


def ulysses_degree_ok(n_heads: int, n_kv: int, sp: int) -> bool:
    """DeepSpeed Ulysses splits the query heads over the SP ranks and splits or replicates the KV heads."""
    return n_heads % sp == 0 and (n_kv % sp == 0 or sp % n_kv == 0)


def check(sp: int, world: int, mcfg, attn: str) -> None:
    """Every SP rule that needs no weights: the degree, the heads, the attention, what SP cannot run."""
    if sp == 1:
        return
    require_deepspeed()
    if world % sp:
        raise ConfigError(
            f"--sequence-parallel {sp} does not divide the {world} process(es); launch a multiple of {sp} "
            f"(torchrun --nproc_per_node {sp} -m gqa_convert uptrain ...)"
        )
    text = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
    n_heads = text.num_attention_heads
    n_kv = getattr(text, "num_key_value_heads", None) or n_heads
    if not ulysses_degree_ok(n_heads, n_kv, sp):
        ok = [s for s in range(2, n_heads + 1) if ulysses_degree_ok(n_heads, n_kv, s)]
        raise ConfigError(
            f"--sequence-parallel {sp} cannot split {n_heads} query / {n_kv} KV heads (Ulysses needs "
            f"n_heads % sp == 0 and n_kv % sp == 0 or sp % n_kv == 0); possible degrees: "
            f"{', '.join(map(str, ok)) or 'none'}"
        )
    if attn not in SP_ATTENTION:
        raise ConfigError(
            f"--sequence-parallel with --attn {'sdpa' if attn == 'sdpa' else attn}: under Ulysses stock SDPA gets no "
            "mask and would attend across packed documents; use --attn packed (or auto, or flash on a GPU)"
        )


def padded_length(context: int, sp: int) -> int:
    """The row length the SP ranks split: context rounded up to a multiple of sp."""
    return -(-context // sp) * sp


def _build_cpu_comm() -> None:
    """Build (or find built) DeepSpeed's CPU communication extension, one process at a time."""
    import fcntl

    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR", get_default_build_root())
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".gqa_convert_shm_comm.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            from deepspeed.accelerator import get_accelerator
            from deepspeed.ops import __compatible_ops__

            builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
            if builder is not None and __compatible_ops__.get(builder.NAME, False):
                builder.load(verbose=False)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def make_accelerator(sp: int, context: int, attn: str, clip: float, *, mixed_precision: str, **kwargs):
    """An Accelerator with a DeepSpeed plugin (ZeRO 0, clipping = `clip`) and Ulysses of degree sp.

    Not `cpu=True`: accelerate then refuses the parallelism config; without CUDA it runs on CPU anyway.
    """
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, ParallelismConfig
    from accelerate.utils.dataclasses import DeepSpeedSequenceParallelConfig

    if not torch.cuda.is_available():
        _build_cpu_comm()
    plugin = DeepSpeedPlugin(zero_stage=0, gradient_clipping=clip)
    handler = DeepSpeedSequenceParallelConfig(
        sp_seq_length=padded_length(context, sp), sp_seq_length_is_variable=False, sp_attn_implementation="sdpa"
    )
    # accelerate checks the name against its own list (flash_attention_2/3, sdpa, hub kernels);
    # DeepSpeed takes any name registered with transformers' AttentionInterface, "sdpa_packed" too.
    handler.sp_attn_implementation = attn
    pc = ParallelismConfig(sp_backend="deepspeed", sp_size=sp, sp_handler=handler)
    handlers = list(kwargs.pop("kwargs_handlers", []))
    if not torch.cuda.is_available():
        # Without CUDA (and without cpu=True) accelerate picks no backend and counts one process on
        # every rank (every rank "main", reduce/gather broken) while DeepSpeed starts gloo under it;
        # naming gloo makes accelerate see the torchrun world.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(
        mixed_precision=mixed_precision,
        deepspeed_plugin=plugin,
        parallelism_config=pc,
        kwargs_handlers=handlers,
        **kwargs,
    )


def prepare(accelerator, model, optimizer, *, batch_size: int, grad_accum: int):
    """accelerator.prepare(model, optimizer) under DeepSpeed: the engine and its optimizer wrapper.

    There is no DataLoader, so the micro-batch and accumulation are written into the DeepSpeed
    config (accelerate derives train_batch_size from them and the data-parallel degree).
    """
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = batch_size
    config["gradient_accumulation_steps"] = grad_accum
    # accelerate's own count must agree, or it warns of a mismatch (the loop never uses it:
    # the accumulation boundary is set explicitly in `backward`)
    accelerator.gradient_accumulation_steps = grad_accum
    return accelerator.prepare(model, optimizer)


def groups(accelerator, sp: int) -> tuple[int, int, int]:
    """(data-parallel degree, data-parallel rank, rank inside the SP group) of this process.

    DeepSpeed's parallel_state_sp puts consecutive global ranks in one SP group.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    if torch.distributed.is_initialized() and world != torch.distributed.get_world_size():
        raise RuntimeError(
            f"accelerate counts {world} process(es), torch.distributed {torch.distributed.get_world_size()}"
        )
    return world // sp, rank // sp, rank % sp


def loss_scale(dp: int, n_targets: int) -> float:
    """The factor of a rank's token-loss sum: dp / targets of the global batch.

    DeepSpeed all-reduces the gradients over all ranks and divides by dp only, i.e. sums over the
    sequence ranks; each rank's share must therefore be its own sum, not the group's mean.
    """
    return dp / n_targets


def _padded(batch: dict[str, torch.Tensor], sp: int) -> dict[str, torch.Tensor]:
    """The whole rows with shifted targets, padded to a multiple of sp (see `shard`)."""
    ids, pos, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
    rows, length = ids.shape
    shift = torch.full_like(labels, IGNORE)
    shift[:, :-1] = labels[:, 1:]
    pad = padded_length(length, sp) - length
    if pad:
        ids = torch.cat([ids, ids[:, -1:].expand(rows, pad)], dim=1)
        pos = torch.cat([pos, torch.arange(pad, dtype=pos.dtype, device=pos.device).expand(rows, pad)], dim=1)
        shift = torch.cat([shift, shift.new_full((rows, pad), IGNORE)], dim=1)
    return {"input_ids": ids, "position_ids": pos, "shift_labels": shift}


def shard(batch: dict[str, torch.Tensor], sp: int, sp_rank: int) -> dict[str, torch.Tensor]:
    """This rank's slice of a packed batch (input_ids, position_ids, labels [B, T]).

    The targets are shifted on the whole row first (`shift_labels`: token t predicts label t + 1;
    the row's last token predicts nothing), then every tensor is padded to a multiple of sp and cut
    into sp contiguous slices. Padding is a document of its own (position ids from 0, token = the
    row's last token, no targets), after every real token, so causal attention never shows it to them.
    """
    whole = _padded(batch, sp)
    size = whole["input_ids"].shape[1] // sp
    return {k: v[:, sp_rank * size : (sp_rank + 1) * size] for k, v in whole.items()}


def losses(
    model,
    full: dict[str, torch.Tensor],
    part: dict[str, torch.Tensor],
    teacher=None,
    *,
    sp: int,
    sp_rank: int,
    chunk_tokens: Optional[int] = None,
    impl: str = "chunked",
):
    """(CE sum, KL sum, targets) of this rank's slice `part` (= shard(full, sp, sp_rank)).

    The model runs on the slice (Ulysses gathers the sequence inside attention). The teacher is not
    sequence-parallel: it runs in eval mode, where the Ulysses wrapper steps aside, on the whole
    padded row of every rank under no_grad, and its final hidden states are cut to this rank's slice
    -- sp times the teacher's forward FLOPs, and its activations at the full context (no gradients).
    """
    from .loss import chunked_token_losses, output_head, packed_hidden

    hidden = packed_hidden(model, part)
    t_hidden = t_head = None
    if teacher is not None:
        length = part["input_ids"].shape[1]
        whole = _padded(full, sp)
        with torch.no_grad():
            t_hidden = packed_hidden(teacher, whole)[:, sp_rank * length : (sp_rank + 1) * length]
        t_head = output_head(teacher).detached()
    return chunked_token_losses(
        hidden,
        output_head(model),
        part["shift_labels"],
        teacher_hidden=t_hidden,
        teacher_head=t_head,
        chunk_tokens=chunk_tokens,
        impl=impl,
        shifted=True,
    )


def backward(engine, loss: torch.Tensor, last: bool) -> None:
    """One micro-step's backward through the DeepSpeed engine: gradients are all-reduced on the last.

    `scale_wrt_gas=False`: the loss is already normalised by the global batch's targets (`loss_scale`).
    """
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss, scale_wrt_gas=False)


def step(engine) -> float:
    """The optimizer step at the accumulation boundary (DeepSpeed clips to the configured norm
    first: at ZeRO 0 its norm counts each replicated gradient once, over the SP group); returns the
    gradient norm before clipping. DeepSpeed records that norm only for its ZeRO/mixed-precision
    optimizers, so it is taken here from the all-reduced gradients, the same on every rank."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    engine.set_gradient_accumulation_boundary(True)
    engine.step()
    return norm


__all__ = [
    "SP_ATTENTION",
    "require_deepspeed",
    "ulysses_degree_ok",
    "check",
    "padded_length",
    "make_accelerator",
    "prepare",
    "groups",
    "loss_scale",
    "shard",
    "losses",
    "backward",
    "step",
]


# ----------------------------------------------------------------------------- launched from the pipeline


def launch_command(cfg, processes: int, launcher: str, port: int) -> list[str]:
    """The command that runs `gqa-convert uptrain` with cfg's settings on `processes` processes.

    torchrun (`python -m torch.distributed.run`) or `accelerate launch`; the uptrain flags are
    settings.command_line's reproduction of cfg (every non-default setting, --resume included).
    """
    import shlex
    import sys

    from ..settings import command_line

    args = shlex.split(command_line("uptrain", cfg, positional=("model",), skip=("progress",)))[2:]
    if not cfg.progress:
        args.append("--no-progress")
    if launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        head += ["--master_port", str(port)]
    elif launcher == "accelerate":
        head = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
        head += ["--main_process_port", str(port)] + ([] if torch.cuda.is_available() else ["--cpu"])
    else:
        raise ConfigError(f"uptrain.launcher must be torchrun or accelerate, not {launcher!r}")
    return [*head, "-m", "gqa_convert", "uptrain", *args]


def free_port() -> int:
    """A TCP port nothing listens on now, for the launched job's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_launched(cfg, processes: int, launcher: str):
    """Run uptraining as a launched multi-process job and return its record (records.UptrainRecord).

    The job's output goes to this process's terminal; a failed job is one line naming its exit code
    (its own error line is above it). Killed and re-run, the stage passes --resume as in-process.
    """
    import subprocess
    from pathlib import Path

    from ..errors import GqaConvertError
    from ..records import UptrainRecord

    cmd = launch_command(cfg, processes, launcher, free_port())
    print(f"uptrain: launching {processes} processes ({launcher}): {' '.join(cmd[1:4])} ... uptrain", flush=True)
    code = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}).returncode
    if code != 0:
        raise GqaConvertError(
            f"the launched uptraining ({processes} processes, {launcher}) exited with code {code}; its error is "
            "above; re-run the same command to resume from its last checkpoint"
        )
    record = UptrainRecord.read(Path(cfg.output))
    if record is None:
        raise GqaConvertError(f"the launched uptraining wrote no {UptrainRecord.FILE} in {cfg.output}")
    return record
