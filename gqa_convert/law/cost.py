"""Inference and training cost of a decoder, two ways.

1. The paper's formulas (Chen et al. 2025, eq. 3/4 and the training estimates), in terms of a
   parameter count N — what the recipe minimises:

       C_infer(T) = 2·N + 4·T·L·d_h·n_h      FLOPs per token with T tokens in context
       M_infer(T) = N + 2·T·L·d_h·n_kv       stored values (weights + KV cache)
       C_train    = 6·D·(N + 2·L·(T/2)·d_h·n_h)
       M_train    = 4·N + T·d·L
       Z          = λ·M^α + (1−λ)·C^β

2. The exact per-component count of one forward token (`forward_flops`), matmuls only, to check
   against measurement: projections 4·L·d·d_h·(n_h+n_kv), attention 4·L·T·n_h·d_h (QKᵀ and AV,
   2 FLOPs per multiply-add), FFN 2 FLOPs per weight, output head 2·d·V. With N = non-embedding
   + V·d (the output head) it equals eq. 3 exactly.

Units are in the field names: `*_flops`, `*_values`, `*_bytes`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, TypeVar

import numpy as np

from ..errors import ConfigError
from .shapes import ModelShape

DTYPE_BYTES = {
    "fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2,
    "fp8": 1, "float8": 1, "int8": 1,
}  # fmt: skip


def dtype_bytes(dtype: str) -> int:
    """Bytes per stored value of a dtype name (`bf16`, `float32`, `torch.float16`, ...)."""
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16, fp8")
    return DTYPE_BYTES[key]


# The paper's formulas are plain arithmetic: the recipe evaluates them on whole numpy grids of
# (target, context, candidate) at once, and on single floats; they return what they are given.
Num = TypeVar("Num", float, np.ndarray)


def _positive(value: float, what: str) -> None:
    if not value > 0:
        raise ConfigError(f"{what} must be positive, not {value!r}")


# --------------------------------------------------------------------------- paper formulas
def infer_flops(n_params: Num, n_layers: Num, head_dim: int, n_heads: Num, context: Num) -> Num:
    """C_infer (eq. 3): FLOPs per generated token with `context` tokens already in context."""
    return 2 * n_params + 4 * context * n_layers * head_dim * n_heads


def infer_memory(n_params: Num, n_layers: Num, head_dim: int, n_kv: Num, context: Num) -> Num:
    """M_infer (eq. 4): stored values, weights plus the KV cache of `context` tokens."""
    return n_params + 2 * context * n_layers * head_dim * n_kv


def sequence_flops(n_params: Num, n_layers: Num, head_dim: int, n_heads: Num, context: Num) -> Num:
    """FLOPs to process a whole sequence of `context` tokens: T·C_infer(T/2) = 2NT + 2T²·L·d_h·n_h."""
    return context * infer_flops(n_params, n_layers, head_dim, n_heads, context / 2)


def train_flops(
    n_params: float, tokens: float, n_layers: float, head_dim: int, n_heads: int, train_context: float
) -> float:
    """C_train ≈ 6·D·(N + 2·L·T̄·d_h·n_h), T̄ = train_context/2 (mean tokens in context)."""
    return 6 * tokens * (n_params + 2 * n_layers * (train_context / 2) * head_dim * n_heads)


def train_memory(n_params: float, train_context: float, hidden: int, n_layers: float) -> float:
    """M_train ≈ 4·N + T·d·L values (weights, gradients, two Adam moments, one activation per layer)."""
    return 4 * n_params + train_context * hidden * n_layers


def z_cost(memory: Num, flops: Num, lam: float = 0.9, alpha: float = 0.5, beta: float = 1 / 3) -> Num:
    """Z = λ·M^α + (1−λ)·C^β (eq. 5)."""
    return lam * memory**alpha + (1 - lam) * flops**beta


@dataclass(frozen=True)
class CostSettings:
    """How M and C enter Z. The paper leaves these open; defaults are the calibrated choice."""

    memory_unit: Literal["values", "bytes"] = "values"  # M in stored values or bytes
    dtype: str = "bf16"  # bytes per value when memory_unit == "bytes"
    compute: Literal["per_sequence", "per_token"] = "per_sequence"  # T·C(T/2) or C(T)
    embeddings: bool = False  # count embedding parameters inside N for M and C
    lam: float = 0.9
    alpha: float = 0.5
    beta: float = 1 / 3

    def __post_init__(self) -> None:
        if self.memory_unit not in ("values", "bytes"):
            raise ConfigError(f"memory_unit must be 'values' or 'bytes', not {self.memory_unit!r}")
        if self.compute not in ("per_sequence", "per_token"):
            raise ConfigError(f"compute must be 'per_sequence' or 'per_token', not {self.compute!r}")
        if not 0 <= self.lam <= 1:
            raise ConfigError(f"lambda must be within [0, 1], not {self.lam!r}")
        _positive(self.alpha, "alpha")
        _positive(self.beta, "beta")
        dtype_bytes(self.dtype)

    def to_dict(self) -> dict:
        return asdict(self)


def z_of(
    n_params: Num,
    n_layers: Num,
    head_dim: int,
    n_heads: Num,
    n_kv: Num,
    context: Num,
    settings: CostSettings = CostSettings(),
) -> Num:
    """Z of a model with N parameters (as `settings` count them) at expected context T."""
    m = infer_memory(n_params, n_layers, head_dim, n_kv, context)
    if settings.memory_unit == "bytes":
        m *= dtype_bytes(settings.dtype)
    if settings.compute == "per_sequence":
        c = sequence_flops(n_params, n_layers, head_dim, n_heads, context)
    else:
        c = infer_flops(n_params, n_layers, head_dim, n_heads, context)
    return z_cost(m, c, settings.lam, settings.alpha, settings.beta)


# --------------------------------------------------------------------------- exact counts
def kv_cache_values(shape: ModelShape, context: int, batch: int = 1) -> int:
    """Values a KV cache holds for `context` tokens: keys and values, every layer and KV head."""
    return 2 * shape.n_layers * shape.n_kv * shape.head_dim * context * batch


def kv_cache_bytes(shape: ModelShape, context: int, dtype: str = "bf16", batch: int = 1) -> int:
    return kv_cache_values(shape, context, batch) * dtype_bytes(dtype)


@dataclass(frozen=True)
class FlopBreakdown:
    """Forward FLOPs of ONE token attending to `context` keys (matmuls; 2 FLOPs per multiply-add)."""

    projections_flops: int  # q, k, v, o: 4·L·d·d_h·(n_h + n_kv)
    attention_flops: int  # QKᵀ and AV: 4·L·T·n_h·d_h
    ffn_flops: int  # 2 per FFN weight
    lm_head_flops: int  # 2·d·V
    total_flops: int

    def to_dict(self) -> dict:
        return asdict(self)


def forward_flops(shape: ModelShape, context: int) -> FlopBreakdown:
    """Exact per-component forward FLOPs of one token attending to `context` keys."""
    L, d, dh = shape.n_layers, shape.hidden, shape.head_dim
    proj = 4 * L * d * dh * (shape.n_heads + shape.n_kv)
    attn = 4 * L * context * shape.n_heads * dh
    ffn = 2 * L * shape.ffn_params_per_layer
    head = 2 * d * shape.vocab
    return FlopBreakdown(proj, attn, ffn, head, proj + attn + ffn + head)


@dataclass(frozen=True)
class CostReport:
    """Costs of one model at context T, with units in every name."""

    context_tokens: int
    dtype: str
    non_embedding_params: int
    total_params: int
    flops_per_token: int  # exact forward count at T keys (incl. output head)
    paper_flops_per_token: float  # eq. 3 with N as `settings.embeddings` says
    flops_per_sequence: float  # T·C_infer(T/2)
    kv_cache_values: int
    kv_cache_bytes: int
    weight_bytes: int
    memory_values: float  # eq. 4: N + KV cache values
    memory_bytes: float
    train_flops_per_token: float  # C_train / D at training context T
    train_memory_values: float
    z: float

    def to_dict(self) -> dict:
        return asdict(self)


def cost_report(
    shape: ModelShape, context: int, dtype: str = "bf16", settings: CostSettings = CostSettings()
) -> CostReport:
    """All costs of `shape` at `context` tokens; Z as `settings` defines it."""
    if isinstance(context, bool) or not isinstance(context, int) or context <= 0:
        raise ConfigError(f"context must be a positive number of tokens, not {context!r}")
    nbytes = dtype_bytes(dtype)
    n = shape.total_params if settings.embeddings else shape.non_embedding_params
    L, dh = shape.n_layers, shape.head_dim
    kv = kv_cache_values(shape, context)
    mem = infer_memory(n, L, dh, shape.n_kv, context)
    return CostReport(
        context_tokens=context,
        dtype=dtype,
        non_embedding_params=shape.non_embedding_params,
        total_params=shape.total_params,
        flops_per_token=forward_flops(shape, context).total_flops,
        paper_flops_per_token=infer_flops(n, L, dh, shape.n_heads, context),
        flops_per_sequence=sequence_flops(n, L, dh, shape.n_heads, context),
        kv_cache_values=kv,
        kv_cache_bytes=kv * nbytes,
        weight_bytes=shape.total_params * nbytes,
        memory_values=mem,
        memory_bytes=mem * nbytes,
        train_flops_per_token=train_flops(n, 1, L, dh, shape.n_heads, context),
        train_memory_values=train_memory(n, context, shape.hidden, L),
        z=z_of(n, L, dh, shape.n_heads, shape.n_kv, context, settings),
    )
