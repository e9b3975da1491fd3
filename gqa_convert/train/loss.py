"""Next-token loss that never holds the [T, V] logits: cross-entropy and distillation KL from the
final hidden states, through the output head a chunk of tokens at a time.

    ce, kl, n = packed_losses(model, batch, teacher)     # in place of packed_forward + token_losses
    (ce / n).backward()

Why: full logits in float32 are T x V x 4 bytes per sequence -- 4.2 GB for Llama-3 (V = 128,256) at
8K tokens, 67 GB at 128K -- and the softmax and its gradient hold as much again. Here at most
`chunk_tokens` x V logits exist at a time, forward and backward: each chunk runs under
torch.utils.checkpoint, so its logits are dropped after the forward and recomputed, one chunk at a
time, in the backward. The cost is one more head matmul per chunk (about 1/3 of the head's FLOPs).

Semantics are those of the unchunked computation (`token_losses` in train/uptrain.py): targets are
the labels shifted by one, IGNORE targets are skipped, KL(teacher || student) = sum q (log q - log p)
over the kept targets, all in float32, returned as sums with the target count.

Hidden states come from the model's own forward call (so peft, accelerate's autocast wrapper and
DDP's hooks all run), with the output head fed a zero-length sequence: see `final_hidden`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError, UnsupportedModelError
from .data import IGNORE

CHUNK_LOGITS = 1 << 25  # default chunk: ~32M logits (128 MB in float32), e.g. 256 tokens at V = 128,256
IMPLS = ("chunked", "liger", "auto")

# What each model type does to lm_head's output before the loss (transformers 5.x modeling code).
# A type not listed here is refused rather than silently scored without its post-processing.
PLAIN = {
    "llama",
    "mistral",
    "ministral",
    "mixtral",
    "qwen2",
    "qwen3",
    "gemma",
    "phi3",
    "olmo2",
    "falcon",
    "starcoder2",
    "stablelm",
}
SOFTCAP = {"gemma2", "gemma3", "gemma3_text"}  # cap * tanh(logits / cap), cap = final_logit_softcapping
DIVIDE = {"granite", "granitemoe", "granitemoeshared", "granitemoehybrid"}  # logits / logits_scaling
MULTIPLY = {"cohere", "cohere2"}  # logits * logit_scale


# ----------------------------------------------------------------------------- hidden states


def unwrap(model):
    """The module itself under DDP / accelerate / DeepSpeed (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        # DeepSpeedEngine by name: importing deepspeed (an optional extra) costs seconds
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) or (
            type(model).__name__ == "DeepSpeedEngine" and hasattr(model, "module")
        ):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def final_hidden(model, input_ids: torch.Tensor, *, position_ids=None, attention_mask=None) -> torch.Tensor:
    """Final hidden states [B, T, H] (after the last norm) of a causal LM, without computing logits.

    The model is called as usual -- so peft adapters, accelerate's autocast wrapper and DDP's
    gradient-sync hooks all take part -- while a pre-hook on the output head keeps its input and
    hands the head a zero-length sequence instead: the [B, 0, V] logits cost nothing.
    """
    head = unwrap(model).get_output_embeddings()
    if head is None:
        raise UnsupportedModelError(f"{type(unwrap(model)).__name__} has no output embeddings (lm_head) to score with")
    kept: list[torch.Tensor] = []

    def keep(module, args):
        kept.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(keep)
    try:
        model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    if len(kept) != 1:
        name = type(unwrap(model)).__name__
        raise UnsupportedModelError(f"{name} called its output head {len(kept)} times, not once")
    return kept[0]


def packed_hidden(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`packed_forward` (train/data.py) without the head: the same call -- position ids that restart
    at each document, no attention mask, use_cache=False -- so attention stays inside each document."""
    return final_hidden(model, batch["input_ids"], position_ids=batch["position_ids"])


# ----------------------------------------------------------------------------- the output head


@dataclass(frozen=True)
class Head:
    """lm_head plus the model's logit post-processing, applied to a chunk of hidden states."""

    weight: torch.Tensor  # [V, H]
    bias: Optional[torch.Tensor] = None
    scale: float = 1.0  # logits * scale
    softcap: Optional[float] = None  # then softcap * tanh(logits / softcap)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        # The matmul runs in the weights' dtype (or autocast's); everything after it in float32.
        z = F.linear(h.to(self.weight.dtype), self.weight, self.bias).float()
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z

    def detached(self) -> "Head":
        return replace(self, weight=self.weight.detach(), bias=None if self.bias is None else self.bias.detach())


def output_head(model) -> Head:
    """The model's output head as a per-chunk function; UnsupportedModelError for an unknown model type."""
    m = unwrap(model)
    cfg = m.config.get_text_config() if hasattr(m.config, "get_text_config") else m.config
    kind = cfg.model_type
    lin = m.get_output_embeddings()
    if kind in SOFTCAP:
        return Head(lin.weight, lin.bias, softcap=getattr(cfg, "final_logit_softcapping", None))
    if kind in DIVIDE:
        return Head(lin.weight, lin.bias, scale=1.0 / cfg.logits_scaling)
    if kind in MULTIPLY:
        return Head(lin.weight, lin.bias, scale=float(cfg.logit_scale))
    if kind in PLAIN:
        return Head(lin.weight, lin.bias)
    raise UnsupportedModelError(
        f"the chunked loss does not know how model type {kind!r} post-processes its logits; "
        "add it to gqa_convert/train/loss.py (PLAIN, SOFTCAP, DIVIDE or MULTIPLY) after reading its modeling code"
    )


# ----------------------------------------------------------------------------- the loss


def chunk_size(chunk_tokens: Optional[int], vocab: Optional[int]) -> int:
    """Tokens per chunk: as given, or ~CHUNK_LOGITS logits (a multiple of 64 tokens, for the matmul)."""
    if chunk_tokens is None:
        if vocab is None:
            raise ValueError("give chunk_tokens when the head is a plain function (its vocabulary is unknown)")
        return max(64, CHUNK_LOGITS // vocab // 64 * 64)
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ConfigError(f"the loss chunk must be a positive number of tokens, e.g. 1024, not {chunk_tokens!r}")
    return chunk_tokens


def _vocab(head) -> Optional[int]:
    return head.weight.shape[0] if isinstance(head, Head) else None


def _chunk_losses(h, y, th, head, teacher_head):
    """(CE sum, KL sum) of one chunk of rows, float32, IGNORE targets skipped; its logits live only in this call."""
    logp = F.log_softmax(head(h), dim=-1)
    ce = F.nll_loss(logp, y, ignore_index=IGNORE, reduction="sum")
    if th is None:
        return ce, ce.new_zeros(())
    with torch.no_grad():  # the teacher is a constant target, as in the unchunked loss
        logq = F.log_softmax(teacher_head(th), dim=-1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    return ce, kl[y != IGNORE].sum()


def _use_liger(impl: str, hidden: torch.Tensor, head, distill: bool) -> bool:
    """Whether to take liger-kernel's fused linear cross-entropy; 'liger' says why it cannot."""
    if impl not in IMPLS:
        raise ConfigError(f"loss implementation must be one of {', '.join(IMPLS)}, not {impl!r}")
    if impl == "chunked":
        return False
    why = None
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        why = "liger-kernel is not installed (pip install liger-kernel)"
    if why is None and hidden.device.type != "cuda":
        why = f"liger-kernel runs on CUDA only, and the hidden states are on {hidden.device.type}"
    if why is None and distill:
        why = "the liger path computes cross-entropy only, not the distillation KL"
    if why is None and not isinstance(head, Head):
        why = "the liger path needs an output Head (weight, bias, scale, softcap), not an arbitrary function"
    if why is not None and impl == "liger":
        raise ConfigError(f"--loss liger is not available: {why}; use chunked (the default)")
    return why is None


def _liger_ce(h: torch.Tensor, y: torch.Tensor, head: Head) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    # A logit scale folds into the weights: (h W^T + b) * s = h (s W)^T + s b.
    w = head.weight if head.scale == 1.0 else head.weight * head.scale
    b = head.bias if head.bias is None or head.scale == 1.0 else head.bias * head.scale
    out = liger_fused_linear_cross_entropy(
        h.to(w.dtype), w, y, b, ignore_index=IGNORE, reduction="sum", softcap=head.softcap
    )
    return (out[0] if isinstance(out, tuple) else out).float()


def chunked_token_losses(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    *,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    chunk_tokens: Optional[int] = None,
    impl: str = "chunked",
    shifted: bool = False,
):
    """(sum of CE, sum of KL(teacher||student), number of targets) over the shifted targets.

    hidden [B, T, H] and labels [B, T] (IGNORE where no loss); teacher_hidden [B, T, H'] with its
    own head for distillation. At most `chunk_tokens` x V logits exist at once, in the forward and
    in the backward. impl: "chunked" (default), "liger" (fused kernel; CUDA, no teacher) or "auto"
    (liger where it can run, else chunked).
    """
    if teacher_hidden is not None and teacher_head is None:
        raise ValueError("teacher_hidden needs teacher_head")
    # Row t predicts label t+1. For one row (the usual micro-batch at long context) these are views, no copy.
    # `shifted`: labels are already each position's target (a sequence-parallel slice of a row, whose
    # last token predicts the first token of the next rank's slice: train/sequence_parallel.shard).
    cut = None if shifted else -1
    h = hidden[:, :cut].reshape(-1, hidden.shape[-1])
    y = (labels if shifted else labels[:, 1:]).reshape(-1)
    n = int((y != IGNORE).sum())
    if _use_liger(impl, hidden, head, teacher_hidden is not None):
        assert isinstance(head, Head)  # _use_liger checked it
        return _liger_ce(h, y, head), torch.zeros((), device=hidden.device), n
    size = chunk_size(chunk_tokens, _vocab(head))
    # One split (not many slices): the backward then gathers the chunks' gradients into one [N, H]
    # tensor instead of making a zero-filled [N, H] gradient per chunk.
    hs, ys = h.split(size), y.split(size)
    ths: tuple = (None,) * len(hs)
    if teacher_hidden is not None:
        ths = teacher_hidden[:, :cut].reshape(-1, teacher_hidden.shape[-1]).split(size)
    ce = kl = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for hc, yc, tc in zip(hs, ys, ths):
        if torch.is_grad_enabled():  # drop this chunk's logits now, recompute them when the backward reaches it
            c, k = checkpoint(_chunk_losses, hc, yc, tc, head, teacher_head, use_reentrant=False)
        else:
            c, k = _chunk_losses(hc, yc, tc, head, teacher_head)
        ce, kl = ce + c, kl + k
    return ce, kl, n


def packed_losses(
    model, batch: dict[str, torch.Tensor], teacher=None, *, chunk_tokens: Optional[int] = None, impl: str = "chunked"
):
    """(CE sum, KL sum, targets) of a packed batch: drop-in for packed_forward + token_losses.

    The teacher runs under no_grad and its head is detached, so it only ever provides targets.
    Wrap the call in the same autocast as the model's forward (accelerator.autocast()) to keep the
    head's matmul in the mixed-precision dtype, as the unchunked path had it.
    """
    hidden = packed_hidden(model, batch)
    t_hidden = t_head = None
    if teacher is not None:
        with torch.no_grad():
            t_hidden = packed_hidden(teacher, batch)
        t_head = output_head(teacher).detached()
    return chunked_token_losses(
        hidden,
        output_head(model),
        batch["labels"],
        teacher_hidden=t_hidden,
        teacher_head=t_head,
        chunk_tokens=chunk_tokens,
        impl=impl,
    )


def token_nll(
    h: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    *,
    chunk_tokens: Optional[int] = None,
) -> torch.Tensor:
    """Per-token cross-entropy [n] (float32, no grad) of hidden rows h [n, H] against targets [n]."""
    size = chunk_size(chunk_tokens, _vocab(head))
    with torch.no_grad():
        parts = [F.cross_entropy(head(hc), yc, reduction="none") for hc, yc in zip(h.split(size), targets.split(size))]
    return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)


def loss_peak_bytes(
    vocab: int, *, chunk_tokens: Optional[int] = None, teacher: bool = False, tokens: Optional[int] = None
) -> int:
    """Peak bytes of the chunked loss's vocabulary-sized tensors in forward + backward (for planning).

    Measured with train/memtrace.py (tests/test_chunked_loss.py checks it): 3 float32 chunk x V
    buffers alive at once (logits, log-softmax, its gradient), 5 with a teacher (its log-probs and
    probabilities). Not included: the head's weight gradient [V, H] and the [T, H] hidden-state
    gradient, which any loss has.
    """
    chunk = chunk_size(chunk_tokens, vocab)
    if tokens is not None:
        chunk = min(chunk, tokens)
    return (5 if teacher else 3) * chunk * vocab * 4


__all__ = [
    "CHUNK_LOGITS",
    "IMPLS",
    "Head",
    "unwrap",
    "final_hidden",
    "packed_hidden",
    "output_head",
    "chunk_size",
    "chunked_token_losses",
    "packed_losses",
    "token_nll",
    "loss_peak_bytes",
]
