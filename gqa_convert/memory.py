"""Per-GPU memory (and time) of an uptraining run, before it starts: which part needs what, whether
it fits, and which setting to change when it does not.

    plan = plan_memory(load_shape("out/llama-3.1-8b-kv2"), "128K", gpus=8, gpu_memory="80GB",
                       sharding="full", sequence_parallel=4, tokens="2B", tokens_per_s=20_000)
    print(format_memory_plan(plan))

What is modelled is what `train/uptrain.py` allocates (docs/long-context.md, "Memory planner"):
weights loaded in float32 and updated in place by AdamW (they are the fp32 master copy; there is no
third copy), `dtype="bf16"` = the loop on CUDA (accelerate's bf16 autocast: bf16 copies of the
weights and bf16 matmul outputs, a float32 residual stream and norms, foreach AdamW),
`dtype="fp32"` = the loop on CPU, and with `sharding="full"` FSDP's mixed precision (bf16
all-gathered weights, so a bf16 residual stream); the loss is `train/loss.py`'s chunked one (at most chunk x V
logits at a time); the teacher is held in bf16 on CUDA, fp32 on CPU. Every term is a sum of the
tensors the step holds at its peak moment; `tests/test_memory_plan.py` checks the totals, the
backward's and the optimizer step's peaks and what the forward saves against measurements of real
training steps (CPU, tiny Llamas, float32 and bf16 autocast).

No torch here: planning a run must not need the machine that runs it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

from .errors import ConfigError
from .law.shapes import ModelShape
from .units import parse_count

# = train/loss.py CHUNK_LOGITS and chunk_size() (tests check they agree; that module imports torch).
CHUNK_LOGITS = 1 << 25

TRAIN = ("all", "attention", "kv")
DTYPES = ("bf16", "fp32")
ATTENTION = ("flash", "packed", "sdpa")
LOSSES = ("chunked", "unchunked")
SHARDING = ("none", "optimizer", "gradients", "full")
SHARDING_ALIASES = {"ddp": "none", "zero1": "optimizer", "zero2": "gradients", "zero3": "full", "fsdp": "full"}

# Allocator fragmentation and what lives outside PyTorch's allocator (CUDA context, cuBLAS/NCCL
# workspaces): the estimate must fit in gpu_memory * (1 - FRAGMENTATION) - RESERVED_BYTES.
FRAGMENTATION = 0.10
RESERVED_BYTES = 1 << 30

# The linears each --train choice trains (uptrain.select_trainable), and that --lora adapts (uptrain.add_lora).
TRAINED = {"kv": ("k", "v"), "attention": ("q", "k", "v", "o"), "all": ("q", "k", "v", "o", "gate", "up", "down")}

# The parts a plan reports, in table order.
PARTS = (
    "weights",
    "weight copies",
    "gradients",
    "optimizer states",
    "optimizer step",
    "DDP buckets",
    "activations",
    "attention masks",
    "backward buffers",
    "loss",
    "teacher weights",
    "teacher forward",
)

GB = 10**9


# ----------------------------------------------------------------------------- inputs


def parse_gpu_memory(value: Union[int, float, str]) -> int:
    """'80GB' / '80G' (decimal), '80GiB' (binary), or a number of bytes -> bytes; ConfigError in one line."""
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, (int, float)):
        if value <= 0 or value != value:
            raise ConfigError(f"--gpu-memory must be a positive size like 80GB or 40GiB, not {value!r}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*", str(value), flags=re.I)
    if not m or (m.group(3) and not m.group(2)):
        raise ConfigError(f"--gpu-memory must be a size like 80GB or 40GiB, not {value!r}")
    power = " kmgt".index(m.group(2).lower() or " ")
    number = float(m.group(1)) * ((1024 if m.group(3) else 1000) ** power)
    if number < 1:
        raise ConfigError(f"--gpu-memory must be a positive size like 80GB or 40GiB, not {value!r}")
    return int(number)


def default_chunk(vocab: int) -> int:
    """train/loss.py's default chunk: ~CHUNK_LOGITS logits, a multiple of 64 tokens."""
    return max(64, CHUNK_LOGITS // vocab // 64 * 64)


def check_sequence_parallel(shape: ModelShape, sp: int, gpus: int) -> None:
    """DeepSpeed-Ulysses splits the heads over the SP group: n_heads % sp == 0, and the KV heads
    split (n_kv % sp == 0) or are replicated (sp % n_kv == 0); sp must also divide the GPUs."""
    if isinstance(sp, bool) or not isinstance(sp, int) or sp < 1:
        raise ConfigError(f"--sequence-parallel must be a whole number >= 1, not {sp!r}")
    if gpus % sp:
        raise ConfigError(f"--sequence-parallel {sp} does not divide --gpus {gpus}; use a divisor of {gpus}")
    if shape.n_heads % sp or (shape.n_kv % sp and sp % shape.n_kv):
        ok = valid_sequence_parallel(shape, gpus)
        raise ConfigError(
            f"--sequence-parallel {sp} cannot split {shape.n_heads} query / {shape.n_kv} KV heads (Ulysses needs "
            f"n_heads % sp == 0 and n_kv % sp == 0 or sp % n_kv == 0); use one of {', '.join(map(str, ok))}"
        )


def valid_sequence_parallel(shape: ModelShape, gpus: int) -> list[int]:
    """The Ulysses SP degrees this model and GPU count allow."""
    return [
        s
        for s in range(1, gpus + 1)
        if gpus % s == 0 and shape.n_heads % s == 0 and (shape.n_kv % s == 0 or s % shape.n_kv == 0)
    ]


def _positive_int(value, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{what} must be a whole number >= {minimum}, not {value!r}")
    return value


def _choice(value, what: str, choices: tuple[str, ...], aliases: Optional[dict] = None) -> str:
    key = str(value).lower()
    key = (aliases or {}).get(key, key)
    if key not in choices:
        names = list(choices) + list(aliases or {})
        raise ConfigError(f"{what} must be one of {', '.join(names)}, not {value!r}")
    return key


# ----------------------------------------------------------------------------- the plan


@dataclass
class Advice:
    """A change of one or more settings and what the plan needs with it."""

    change: dict  # setting -> new value (plan_memory's keyword arguments)
    text: str  # e.g. "enable gradient checkpointing (--gradient-checkpointing)"
    total_bytes: int
    fits: bool


@dataclass
class MemoryPlan:
    """Per-GPU bytes of one uptraining step at its peak moment, by part, and the run's time."""

    settings: dict  # the inputs, normalised
    parts: dict[str, int]  # PARTS -> bytes at the peak moment (they add up to total_bytes)
    total_bytes: int
    peak_phase: str  # the moment of the peak: forward, loss backward, last/first layer backward, optimizer step, ...
    phases: dict[str, int]  # the total at each candidate peak moment
    phase_parts: dict[str, dict[str, int]]  # the parts at each of them
    activations_checkpointed: int  # activations + masks + backward buffers at the peak, with checkpointing
    activations_full: int  # the same without checkpointing
    gpu_memory: Optional[int] = None
    usable_bytes: Optional[int] = None  # gpu_memory less the safety margin
    fits: Optional[bool] = None
    advice: list[Advice] = field(default_factory=list)
    tokens_per_step: int = 0
    steps: Optional[int] = None
    tokens_per_s: Optional[float] = None
    time_s: Optional[float] = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Setup:
    """Everything plan_memory needs, validated."""

    shape: ModelShape
    context: int
    gpus: int
    train: str
    lora: bool
    lora_rank: int
    sp: int
    sharding: str
    batch: int
    grad_accum: int
    ckpt: bool
    distill: bool
    teacher: ModelShape
    dtype: str
    attention: str
    loss: str
    chunk: int

    @property
    def precision(self) -> str:
        """fp32: the loop on CPU. autocast: the loop on CUDA (fp32 weights, bf16 matmuls, fp32 residual
        stream). bf16: a fully sharded model computing with bf16 all-gathered weights (FSDP mixed precision)."""
        if self.dtype == "fp32":
            return "fp32"
        return "bf16" if self.sharding == "full" else "autocast"

    @property
    def teacher_bytes(self) -> int:
        """Bytes per teacher weight: bf16 on CUDA, float32 on CPU (as uptrain loads it); 0 without one."""
        return 0 if not self.distill else (2 if self.dtype == "bf16" else 4)


def _bytes_per_layer(s: _Setup, m: ModelShape, *, student: bool = True) -> dict[str, float]:
    """Bytes per local token of what one decoder layer saves for backward (student) or holds at
    once in a no-grad forward (teacher), without the attention mask. See the docs for the list."""
    d, hd, f = m.hidden, m.head_dim, m.d_ff
    sp, mode = s.sp, s.precision
    a = 4 if mode == "fp32" else 2  # bytes of a matmul output
    qd = m.n_heads * hd  # per local token: n_h/sp heads over the full T (Ulysses) = n_h heads over T/sp
    kv_local = m.n_kv // sp if m.n_kv % sp == 0 else 1
    kvd = kv_local * sp * hd  # KV heads are replicated when sp > n_kv
    repeat = s.attention == "sdpa" and m.n_kv < m.n_heads  # with a mask, transformers repeats K/V to n_h heads
    k_bytes = (qd if repeat else kvd) * a
    attn_io = qd * a + 2 * k_bytes + qd * a + 4 * m.n_heads  # q, k, v, output, log-sum-exp (fp32)
    trained = set(TRAINED[s.train])
    if sp > 1 or (s.attention == "packed" and student and "o" in trained):
        # a second copy of the output, saved by o_proj: the all-to-all back (Ulysses), or sdpa_packed's
        # concatenation of its documents' outputs
        attn_io += qd * a
    if not student:  # a teacher (bf16 weights on CUDA): nothing saved; one layer's tensors at a time
        mlp_now = (3 if m.gated_ffn else 2) * f * a  # act, up and their product alive at once
        return {"layer": 2 * d * a + 4 * d + max(attn_io, mlp_now)}  # residual, the norm's fp32 upcast, the rest
    norms = s.train == "all" and not s.lora

    def inputs(names: tuple[str, ...]) -> float:
        """A linear whose weight gets a gradient (or carries a LoRA adapter) saves its input: one norm
        output shared by q/k/v (gate/up), except under autocast, where each call saves its own bf16 copy."""
        n = len(trained.intersection(names))
        return (n * 2 if mode == "autocast" else min(n, 1) * a) * d

    out = {
        # Both norms' inputs, float32: the residual stream itself (fp32, autocast) or the norm's upcast of it (bf16).
        "residual": 2 * 4 * d,
        # x * rsqrt(var) of both norms, saved when their weights train (bf16 params: cast back first); rsqrt
        "norm": (2 * d * (2 if mode == "bf16" else 4) if norms else 0) + 8,
        "qkv input": inputs(("q", "k", "v")),
        "attention": attn_io,
        "mlp input": inputs(("gate", "up")),
    }
    if m.gated_ffn:
        out["mlp"] = 3 * f * a + (f * a if "down" in trained else 0)  # gate, up, act (, act * up for down's weight)
    else:
        out["mlp"] = 2 * f * a if "down" in trained else f * a
    if s.lora:
        out["lora"] = s.lora_rank * a * len(trained)  # the [T, r] inputs of the B matrices
    return out


def _params(s: _Setup) -> dict[str, int]:
    m = s.shape
    d, hd = m.hidden, m.head_dim
    sizes = {
        "q": (d, m.n_heads * hd),
        "k": (d, m.n_kv * hd),
        "v": (d, m.n_kv * hd),
        "o": (m.n_heads * hd, d),
        "gate": (d, m.d_ff),
        "up": (d, m.d_ff),
        "down": (m.d_ff, d),
    }
    if not m.gated_ffn:
        del sizes["gate"]
    layer = sum(i * o for i, o in sizes.values())
    head = m.vocab * d
    lora = 0
    if s.lora:
        lora = m.n_layers * s.lora_rank * sum(i + o for k, (i, o) in sizes.items() if k in TRAINED[s.train])
    if s.lora:
        trainable = lora
    elif s.train == "all":
        trainable = m.total_params
    else:
        trainable = m.n_layers * sum(i * o for k, (i, o) in sizes.items() if k in TRAINED[s.train])
    if s.lora:
        largest = max(s.lora_rank * max(i, o) for k, (i, o) in sizes.items() if k in TRAINED[s.train])
    elif s.train == "all":
        largest = max(head, max(i * o for i, o in sizes.values()))
    else:
        largest = max(i * o for k, (i, o) in sizes.items() if k in TRAINED[s.train])
    return {
        "layer": layer,
        "head": head,
        "all": m.total_params + lora,
        "trainable": trainable,
        "lora": lora,
        "largest": largest,
    }


def _setup(
    shape,
    context,
    *,
    gpus,
    train,
    lora,
    lora_rank,
    sequence_parallel,
    sharding,
    batch_size,
    grad_accum,
    gradient_checkpointing,
    distill,
    teacher,
    dtype,
    attention,
    loss,
    chunk_tokens,
) -> _Setup:
    if not isinstance(shape, ModelShape):
        raise ConfigError(f"plan_memory needs a ModelShape (law.shapes.load_shape), not {type(shape).__name__}")
    if isinstance(context, str):
        context = parse_count(context, what="--context", binary_k=True)
    context = _positive_int(context, "--context", 2)
    gpus = _positive_int(gpus, "--gpus")
    sp = _positive_int(sequence_parallel, "--sequence-parallel")
    check_sequence_parallel(shape, sp, gpus)
    if context % sp:
        raise ConfigError(
            f"--context {context} does not split into --sequence-parallel {sp} equal parts; use a multiple of {sp}"
        )
    if chunk_tokens is not None:
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ConfigError(f"the loss chunk must be a positive number of tokens, e.g. 1024, not {chunk_tokens!r}")
    return _Setup(
        shape=shape,
        context=context,
        gpus=gpus,
        train=_choice(train, "--train", TRAIN),
        lora=bool(lora),
        lora_rank=_positive_int(lora_rank, "--lora-rank"),
        sp=sp,
        sharding=_choice(sharding, "--sharding", SHARDING, SHARDING_ALIASES),
        batch=_positive_int(batch_size, "--batch-size"),
        grad_accum=_positive_int(grad_accum, "--grad-accum"),
        ckpt=bool(gradient_checkpointing),
        distill=bool(distill),
        teacher=teacher or shape,
        dtype=_choice(dtype, "dtype", DTYPES),
        attention=_choice(attention, "--attn", ATTENTION),
        loss=_choice(loss, "loss", LOSSES),
        chunk=chunk_tokens or default_chunk(shape.vocab),
    )


def _phases(s: _Setup) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Candidate peak moments of one step, each as bytes by part (PARTS)."""
    m, p = s.shape, _params(s)
    notes: list[str] = []
    L, d, V = m.n_layers, m.hidden, m.vocab
    T, B, n = s.context, s.batch, s.gpus
    n_tok = B * T // s.sp  # tokens on this GPU
    bf16 = s.dtype == "bf16"
    a = 2 if bf16 else 4  # bytes of a matmul output
    r = 2 if s.precision == "bf16" else 4  # bytes of the residual stream (float32, as the weights are)
    shard_w = n if s.sharding == "full" else 1
    shard_g = n if s.sharding in ("gradients", "full") else 1
    shard_o = n if s.sharding != "none" else 1
    head_trains = s.train == "all" and not s.lora

    # ---- what lives through the whole step
    persistent = {
        "weights": 4 * p["all"] / shard_w,  # float32, as uptrain loads them: also AdamW's master copy
        "optimizer states": 8 * p["trainable"] / shard_o,  # exp_avg, exp_avg_sq in float32
        # DDP (accelerate's default gradient_as_bucket_view=False) copies the gradients into its buckets
        "DDP buckets": 4 * p["trainable"] if s.gpus // s.sp > 1 and s.sharding in ("none", "optimizer") else 0,
    }
    if s.teacher_bytes:  # uptrain moves the teacher to each device whole: never sharded
        persistent["teacher weights"] = s.teacher_bytes * s.teacher.total_params
    grads_all = 4 * p["trainable"] / shard_g
    if s.grad_accum > 1:  # the gradients live through every micro-batch of the step
        persistent["gradients"] = grads_all
    accum = persistent.get("gradients", 0)
    # foreach AdamW (torch's default for CUDA tensors) makes one float32 temporary as large as its states'
    # first half; the per-tensor loop (CPU) the square root and its quotient of one tensor.
    step_tmp = 4 * p["trainable"] / shard_o if bf16 else 2 * 4 * p["largest"] / shard_o

    # ---- weight copies: autocast's bf16 copies (every linear saves its own for backward; a trainable
    # weight's is cached until the forward ends), or the all-gathered units of a fully sharded model
    if s.sharding == "full":
        gathered = (2 * p["layer"] + p["head"] * (1 if m.tied else 2)) * a
        copies = {"forward": gathered, "loss": gathered, "top": gathered, "bottom": gathered}
    elif s.precision == "autocast":
        head_copy = 2 * p["head"]
        if s.ckpt:  # saved copies are dropped with the layer's activations; the cache lasts to the forward's end
            cached = 2 * p["trainable"] if not s.lora else 0
            copies = {"forward": cached, "loss": head_copy, "top": 2 * p["layer"], "bottom": 2 * p["layer"]}
        else:
            every = 2 * L * p["layer"] + head_copy
            copies = {"forward": every, "loss": every, "top": every - head_copy, "bottom": 2 * p["layer"]}
    else:
        copies = {"forward": 0, "loss": 0, "top": 0, "bottom": 0}

    # ---- activations
    layer = sum(_bytes_per_layer(s, m).values()) * n_tok  # what one layer saves for backward
    mask_layer = B * T * T * a if s.attention == "sdpa" else 0  # the bool mask as SDPA converts it, per layer
    mask_bool = B * T * T if s.attention == "sdpa" else 0  # the model's own [B, 1, T, T] bool mask
    # One [T, d] tensor of the residual stream (float32, but bf16 with bf16 parameters): what a checkpointed
    # layer keeps (its input). `layer` includes its inputs' float32 form; the embedding output is layer 0's
    # input, the last layer's output the final norm's. In a layer's backward its output is gone.
    hidden = (2 if s.precision == "bf16" else 4) * d * n_tok
    hidden32 = 4 * d * n_tok
    rope = 2 * B * T * m.head_dim * (2 if s.precision == "bf16" else 4)  # RoPE cos and sin, shared by the layers
    # final norm: x * rsqrt(var) when its weight trains, and its output, in the residual stream's dtype
    final = (2 if head_trains else 1) * hidden
    if s.ckpt:
        own = hidden if s.precision == "bf16" else 0  # a bf16 layer input is not its norm's fp32 upcast
        acts = {
            "all": L * hidden + hidden32 + final + rope,
            "top": L * hidden + layer - hidden + own + rope,
            "bottom": layer + own + rope,
        }
        masks = {
            "forward": mask_bool,
            "all": mask_bool,
            "top": mask_bool + mask_layer,
            "bottom": mask_bool + mask_layer,
        }
    else:
        acts = {"all": L * layer + hidden32 + final + rope, "top": L * layer + rope, "bottom": layer + rope}
        masks = {"forward": L * mask_layer, "all": L * mask_layer, "top": L * mask_layer, "bottom": mask_layer}
    # The backward of one layer, beyond what it saved: d(act * up) and d(act), d(up) while gate, up and
    # act are still alive (act * up itself was freed), the [T, d] gradient coming in and the one going out.
    down_saved = "down" in TRAINED[s.train]
    f_grads = ((3 if m.gated_ffn else 2) - (1 if down_saved else 0)) * m.d_ff * a
    bwd_extra = (f_grads + 2 * r * d) * n_tok
    if s.sharding == "full":  # a unit's unsharded gradients before the reduce-scatter
        bwd_extra += 4 * p["layer"]

    # ---- loss: chunk x V float32 buffers -- logits, log-softmax and its gradient; with a teacher also its
    # log-probabilities and probabilities (train/loss.py loss_peak_bytes) -- and the [T, d] hidden-state gradient.
    chunk = min(s.chunk, n_tok)
    if s.loss == "chunked":
        bufs = (5 if s.distill else 3) * chunk * V * 4
    else:
        chunk = n_tok
        bufs = (8 if s.distill else 3) * n_tok * V * 4
        notes.append("unchunked loss: 3 [T, V] float32 copies (8 with a teacher), as measured in docs/long-context.md")
    # The head's weight gradient forms during the loss backward as a running sum over the chunks, in the
    # matmul's dtype, added out of place (running sum, new chunk's and their sum alive at once); under
    # autocast the sum is then cast to the float32 .grad. Unsharded until its unit's reduce-scatter.
    g, vd = (2 if bf16 else 4), V * d
    multi = n_tok > chunk
    if head_trains:
        running = g * vd if multi else 0
        moment = max(bufs + running, chunk * V * 4 + g * vd * (3 if multi else 1), 6 * vd if bf16 else 0)
    else:
        running, moment = 0, bufs
    loss_part = moment - running + 2 * r * d * n_tok
    head_grad = 4 * p["head"] / shard_g if head_trains else 0

    # ---- teacher: a no-grad forward after the student's (its layer's tensors one at a time), its final hidden
    # states kept for the loss
    teacher_fwd = teacher_hidden = 0.0
    if s.distill:
        t = s.teacher
        teacher_hidden = s.teacher_bytes * t.hidden * n_tok
        teacher_fwd = _bytes_per_layer(s, t, student=False)["layer"] * n_tok + teacher_hidden
        if s.attention == "sdpa":
            teacher_fwd += B * T * T * (1 + s.teacher_bytes)  # its own bool mask, converted for one layer at a time
        if t.vocab != m.vocab:
            notes.append(f"the teacher's vocabulary ({t.vocab}) differs from the model's ({V}); uptrain refuses that")

    # The input embedding's gradient forms after the first layer's backward; tied, it is added to the head's.
    emb_grad = 4 * p["head"] / shard_g if head_trains else 0
    tied_tmp = 2 * emb_grad if m.tied else 0  # the new [V, d] gradient and the out-of-place sum
    phases: dict[str, dict[str, float]] = {
        "forward": {
            **persistent,
            "weight copies": copies["forward"],
            "activations": acts["all"],
            "attention masks": masks["forward"],
            "teacher forward": teacher_fwd,
        },
        "loss backward": {
            **persistent,
            "weight copies": copies["loss"],
            "gradients": accum + running,
            "activations": acts["all"],
            "attention masks": masks["all"],
            "loss": loss_part,
            "teacher forward": teacher_hidden,
        },
        "last layer backward": {
            **persistent,
            "weight copies": copies["top"],
            "gradients": accum or head_grad,
            "activations": acts["top"],
            "attention masks": masks["top"],
            "backward buffers": bwd_extra,
        },
        "first layer backward": {
            **persistent,
            "weight copies": copies["bottom"],
            "gradients": max(accum, grads_all - (0 if m.tied else emb_grad)),
            "activations": acts["bottom"],
            "attention masks": masks["bottom"],
            "backward buffers": bwd_extra,
        },
        "embedding backward": {**persistent, "gradients": grads_all, "backward buffers": tied_tmp},
        "optimizer step": {**persistent, "gradients": grads_all, "optimizer step": step_tmp},
    }
    return phases, notes


def plan_memory(
    shape: ModelShape,
    context: Union[int, str],
    *,
    gpus: int = 1,
    gpu_memory: Optional[Union[int, str]] = None,
    train: str = "all",
    lora: bool = False,
    lora_rank: int = 16,
    sequence_parallel: int = 1,
    sharding: str = "none",
    batch_size: int = 1,
    grad_accum: int = 1,
    gradient_checkpointing: bool = True,
    distill: bool = False,
    teacher: Optional[ModelShape] = None,
    dtype: str = "bf16",
    attention: str = "flash",
    loss: str = "chunked",
    chunk_tokens: Optional[int] = None,
    tokens_per_s: Optional[float] = None,
    tokens: Optional[Union[int, str]] = None,
    advise: bool = True,
) -> MemoryPlan:
    """Per-GPU memory of one uptraining step of `shape` at `context` tokens (or "128K"), by part, at its peak.

    gpus: GPUs in the job; sequence_parallel: Ulysses SP degree (divides the GPUs; data parallel over
    the rest); sharding: none (DDP) | optimizer (ZeRO-1) | gradients (ZeRO-2) | full (ZeRO-3 / FSDP),
    also by those names; gpu_memory: bytes per GPU (or "80GB"), to say whether it fits; teacher: the
    distillation teacher's shape (default: the model's); dtype: bf16 (CUDA autocast) | fp32 (CPU);
    attention: flash (flash-attn's varlen kernel, no mask) | packed (train/attention.py's sdpa_packed:
    SDPA per document, no mask) | sdpa (stock: a dense T x T mask per layer, as transformers builds
    for packed documents); chunk_tokens: the loss chunk (default train/loss.py's); tokens_per_s: the
    whole job's training throughput (uptrain.json records it), with `tokens` the budget (or "2B"),
    for a time; grad_accum: micro-batches per step (the gradients then live through the forward);
    loss: chunked (train/loss.py) | unchunked (whole [T, V] logits); advise: say what to change when
    it does not fit (plan_memory calls itself once per candidate change).
    """
    s = _setup(
        shape,
        context,
        gpus=gpus,
        train=train,
        lora=lora,
        lora_rank=lora_rank,
        sequence_parallel=sequence_parallel,
        sharding=sharding,
        batch_size=batch_size,
        grad_accum=grad_accum,
        gradient_checkpointing=gradient_checkpointing,
        distill=distill,
        teacher=teacher,
        dtype=dtype,
        attention=attention,
        loss=loss,
        chunk_tokens=chunk_tokens,
    )
    mem = parse_gpu_memory(gpu_memory) if gpu_memory is not None else None
    if tokens_per_s is not None and (isinstance(tokens_per_s, bool) or not tokens_per_s > 0):
        raise ConfigError(f"tokens/s must be a positive number, not {tokens_per_s!r}")
    if tokens is not None:
        tokens = parse_count(tokens, what="--tokens")

    phases, notes = _phases(s)
    totals = {k: int(sum(v.values())) for k, v in phases.items()}
    peak_phase = max(totals, key=lambda k: totals[k])
    phase_parts = {ph: {k: int(v[k]) for k in PARTS if v.get(k)} for ph, v in phases.items()}
    parts = {k: int(phases[peak_phase].get(k, 0)) for k in PARTS}
    total = sum(parts.values())

    def act_at_peak(ckpt: bool) -> int:
        other, _ = _phases(replace(s, ckpt=ckpt))
        ph = max(other, key=lambda k: sum(other[k].values()))
        return int(sum(other[ph].get(k, 0) for k in ("activations", "attention masks", "backward buffers")))

    settings = {
        "model": asdict(s.shape),
        "context": s.context,
        "gpus": s.gpus,
        "train": s.train,
        "lora": s.lora,
        "lora_rank": s.lora_rank,
        "sequence_parallel": s.sp,
        "sharding": s.sharding,
        "batch_size": s.batch,
        "grad_accum": s.grad_accum,
        "gradient_checkpointing": s.ckpt,
        "distill": s.distill,
        "teacher": asdict(s.teacher) if s.distill else None,
        "dtype": s.dtype,
        "attention": s.attention,
        "loss": s.loss,
        "chunk_tokens": s.chunk,
        "precision": s.precision,
    }
    plan = MemoryPlan(
        settings=settings,
        parts=parts,
        total_bytes=total,
        peak_phase=peak_phase,
        phases=totals,
        phase_parts=phase_parts,
        activations_checkpointed=act_at_peak(True),
        activations_full=act_at_peak(False),
        notes=notes,
    )
    plan.tokens_per_step = s.context * s.batch * s.grad_accum * (s.gpus // s.sp)
    if tokens is not None:
        plan.steps = tokens // plan.tokens_per_step
        if plan.steps < 1:
            raise ConfigError(f"budget --tokens {tokens:,} is smaller than one step of {plan.tokens_per_step:,} tokens")
    if tokens_per_s is not None:
        plan.tokens_per_s = float(tokens_per_s)
        if tokens is not None:
            plan.time_s = (plan.steps or 0) * plan.tokens_per_step / float(tokens_per_s)
    if s.sp > 1:
        plan.notes.append(
            "sequence parallelism as DeepSpeed-Ulysses holds it (uptrain --sequence-parallel, docs/parallel.md)"
            + (
                f"; uptrain runs it with ZeRO stage 0 (nothing sharded): --sharding {s.sharding} with SP is planned here, not run"
                if s.sharding != "none"
                else ""
            )
        )
    if s.attention == "sdpa" and s.context >= 8192:
        plan.notes.append(
            f"SDPA with packed documents builds a {s.context:,} x {s.context:,} mask per layer "
            f"({_fmt(_mask_bytes(s))} each); flash-attn's varlen kernel has none"
        )
    if mem is not None:
        plan.gpu_memory = mem
        plan.usable_bytes = usable_bytes(mem)
        plan.fits = total <= plan.usable_bytes
        if not plan.fits and advise:
            plan.advice = _advise(s, plan.usable_bytes)
    return plan


def _mask_bytes(s: _Setup) -> int:
    """One layer's SDPA mask as SDPA converts it (the query's dtype)."""
    return s.batch * s.context * s.context * (2 if s.dtype == "bf16" else 4)


def usable_bytes(gpu_memory: int) -> int:
    """What the estimate may use of a GPU: less FRAGMENTATION of it and RESERVED_BYTES."""
    return int(gpu_memory * (1 - FRAGMENTATION)) - RESERVED_BYTES


# ----------------------------------------------------------------------------- what to change


def _kwargs(s: _Setup) -> dict:
    return {
        "gpus": s.gpus,
        "train": s.train,
        "lora": s.lora,
        "lora_rank": s.lora_rank,
        "sequence_parallel": s.sp,
        "sharding": s.sharding,
        "batch_size": s.batch,
        "grad_accum": s.grad_accum,
        "gradient_checkpointing": s.ckpt,
        "distill": s.distill,
        "teacher": s.teacher,
        "dtype": s.dtype,
        "attention": s.attention,
        "loss": s.loss,
        "chunk_tokens": s.chunk,
    }


def _candidates(s: _Setup, recipe: bool = True) -> list[tuple[dict, str]]:
    """Single setting changes that can lower memory, least disruptive first; with `recipe`, also those
    that change what is trained (the teacher, the trained parameters, LoRA)."""
    out: list[tuple[dict, str]] = []
    if not s.ckpt:
        out.append(({"gradient_checkpointing": True}, "enable gradient checkpointing (--gradient-checkpointing)"))
    if s.attention == "sdpa":
        out.append(({"attention": "packed"}, "use --attn packed (SDPA per document: no T x T mask)"))
        out.append(
            ({"attention": "flash"}, "use flash-attn's varlen kernel (no mask; pip install flash-attn, --attn flash)")
        )
    if s.loss == "unchunked":
        out.append(({"loss": "chunked"}, "use the chunked loss"))
    if s.chunk > default_chunk(s.shape.vocab):
        out.append(
            (
                {"chunk_tokens": default_chunk(s.shape.vocab)},
                f"use the default loss chunk of {default_chunk(s.shape.vocab)} tokens",
            )
        )
    if s.gpus > 1:
        for level in SHARDING[SHARDING.index(s.sharding) + 1 :]:
            what = {
                "optimizer": "optimizer states (ZeRO-1)",
                "gradients": "gradients and optimizer states (ZeRO-2)",
                "full": "weights, gradients and optimizer states (ZeRO-3 / FSDP)",
            }[level]
            out.append(({"sharding": level}, f"shard {what} over the {s.gpus} GPUs (--sharding {level})"))
        for sp in valid_sequence_parallel(s.shape, s.gpus):
            if sp > s.sp and s.context % sp == 0:
                out.append(({"sequence_parallel": sp}, f"use --sequence-parallel {sp} (each GPU holds T/{sp} tokens)"))
    if s.batch > 1:
        out.append(
            (
                {"batch_size": 1, "grad_accum": s.grad_accum * s.batch},
                f"use --batch-size 1 --grad-accum {s.grad_accum * s.batch} (the same tokens per step)",
            )
        )
    if not recipe:
        return out
    if s.distill:
        out.append(({"distill": False}, "train without the distillation teacher"))
    if s.train == "all":
        out.append(({"train": "attention"}, "train attention only (--train attention)"))
    if s.train in ("all", "attention"):
        out.append(({"train": "kv"}, "train the regrouped K/V projections only (--train kv)"))
    if not s.lora:
        out.append(({"lora": True}, f"use LoRA (--lora, rank {s.lora_rank})"))
    return out


def _advise(s: _Setup, usable: int, depth: int = 4) -> list[Advice]:
    """Every single change that makes it fit, least disruptive first. If none does: a greedy
    combination (at most `depth` changes; each time the least disruptive one that makes it fit, else
    the one that saves most), trying changes of the parallel layout and kernels before changes of
    what is trained."""

    def total(kw: dict) -> int:
        return plan_memory(s.shape, s.context, **kw, advise=False).total_bytes

    base = _kwargs(s)
    singles = [
        Advice(change, text, t, t <= usable) for change, text in _candidates(s) for t in [total({**base, **change})]
    ]
    fitting = [adv for adv in singles if adv.fits]
    if fitting:
        return fitting
    best: Optional[Advice] = None
    for recipe in (False, True):
        combo: dict = {}
        texts: list[str] = []
        current, now = s, total(base)
        for _ in range(depth):
            options = [(total({**_kwargs(current), **c}), c, t) for c, t in _candidates(current, recipe)]
            if not options:
                break
            # the least disruptive change that makes it fit, else the one that saves most
            fit = [o for o in options if o[0] <= usable]
            lowest, change, text = fit[0] if fit else min(options, key=lambda o: o[0])
            if lowest >= now:
                break
            combo.update(change)
            texts.append(text)
            current, now = _setup(s.shape, s.context, **{**_kwargs(current), **change}), lowest
            if now <= usable:
                return [Advice(combo, " and ".join(texts), now, True)]
        if combo and (best is None or now < best.total_bytes):
            best = Advice(combo, " and ".join(texts) + "; still too large: more GPUs or a shorter context", now, False)
    return [best] if best else []


# ----------------------------------------------------------------------------- time, records, output


def tokens_per_s_from_run(folder: Union[str, Path]) -> Optional[float]:
    """The training throughput (tokens/s, whole job) an uptrain run recorded in its uptrain.json, if any."""
    from .records import UptrainRecord

    record = UptrainRecord.read(folder)
    return record.tokens_per_s if record is not None and record.tokens_per_s else None


def _fmt(n: float) -> str:
    if n >= 10 * GB:
        return f"{n / GB:,.1f} GB"
    if n >= GB:
        return f"{n / GB:.2f} GB"
    return f"{n / 1e6:,.0f} MB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_memory_plan(plan: MemoryPlan) -> str:
    """The plan as a text table: per-GPU memory by part, the verdict, what to change, the time."""
    st = plan.settings
    m = st["model"]
    head = (
        f"uptraining memory per GPU: L={m['n_layers']} d={m['hidden']} heads {m['n_heads']}/{m['n_kv']} "
        f"V={m['vocab']:,}, context {st['context']:,}, {st['gpus']} GPU(s)"
    )
    how = [
        f"train {st['train']}" + (f" + LoRA r={st['lora_rank']}" if st["lora"] else ""),
        f"sharding {st['sharding']}",
        f"sequence parallel {st['sequence_parallel']}",
        f"batch {st['batch_size']}" + (f" x {st['grad_accum']} accum" if st["grad_accum"] > 1 else ""),
        "checkpointing " + ("on" if st["gradient_checkpointing"] else "off"),
        {"fp32": "fp32", "autocast": "bf16 autocast", "bf16": "bf16 parameters"}[st["precision"]],
        f"attention {st['attention']}",
        f"loss {st['loss']} ({st['chunk_tokens']} tokens/chunk)",
    ]
    if st["distill"]:
        how.append("distillation")
    lines = [head, "  " + ", ".join(how), ""]
    width = max(len(p) for p in PARTS) + 2
    lines.append(f"  {'part':<{width}}{'bytes':>12}")
    for part in PARTS:
        if plan.parts.get(part):
            lines.append(f"  {part:<{width}}{_fmt(plan.parts[part]):>12}")
    lines.append(f"  {'total':<{width}}{_fmt(plan.total_bytes):>12}   (peak during {plan.peak_phase})")
    lines.append(
        f"  activations at the peak: {_fmt(plan.activations_checkpointed)} with gradient checkpointing, "
        f"{_fmt(plan.activations_full)} without"
    )
    if plan.gpu_memory is not None:
        assert plan.usable_bytes is not None
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(
            f"  {verdict} in {_fmt(plan.gpu_memory)} per GPU (usable {_fmt(plan.usable_bytes)}: "
            f"{FRAGMENTATION:.0%} kept for fragmentation, {RESERVED_BYTES / 2**30:.0f} GiB for the CUDA context)"
        )
        for adv in plan.advice:
            mark = "fits" if adv.fits else "does not fit"
            lines.append(f"    - {adv.text}: {_fmt(adv.total_bytes)} ({mark})")
    lines.append(f"  tokens per optimizer step: {plan.tokens_per_step:,}")
    if plan.steps is not None:
        lines.append(f"  steps for the budget: {plan.steps:,}")
    if plan.time_s is not None:
        lines.append(f"  time at {plan.tokens_per_s:,.0f} tokens/s: {_duration(plan.time_s)}")
    elif plan.tokens_per_s is not None:
        lines.append(f"  throughput {plan.tokens_per_s:,.0f} tokens/s (give a token budget for a time)")
    for note in plan.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


__all__ = [
    "CHUNK_LOGITS",
    "FRAGMENTATION",
    "RESERVED_BYTES",
    "PARTS",
    "SHARDING",
    "Advice",
    "MemoryPlan",
    "plan_memory",
    "format_memory_plan",
    "parse_gpu_memory",
    "usable_bytes",
    "default_chunk",
    "valid_sequence_parallel",
    "check_sequence_parallel",
    "tokens_per_s_from_run",
]
