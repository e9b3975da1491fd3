"""The head math: regroup one layer's key/value heads into fewer, contiguous groups.

Every family's attention tensors are first split (by `architectures`) into one canonical,
unfused `AttentionBlock`; a merge method maps a block with `shape.n_kv` KV heads to one with
`new_kv` heads; the family then joins it back into its own tensor names and layout. Rows of
q/k/v are head-major: head i owns rows [i*d_h, (i+1)*d_h). Query head h reads KV head h // r,
r = n_heads / n_kv, so a regrouping pools contiguous runs of old KV heads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class HeadShape:
    """The attention shape of one model (all layers alike)."""

    n_heads: int  # query heads
    n_kv: int  # key/value heads
    head_dim: int
    hidden: int

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv


@dataclass
class AttentionBlock:
    """One layer's attention tensors in canonical, unfused form (stored dtype kept).

    k_norm/q_norm are None when the family has none; their length tells their kind: head_dim
    (one norm shared by all heads, Qwen3/Gemma3) or n_kv*head_dim (OLMo-2, whole projection).
    """

    q_w: Tensor  # [n_heads*d_h, hidden]
    k_w: Tensor  # [n_kv*d_h, hidden]
    v_w: Tensor  # [n_kv*d_h, hidden]
    o_w: Tensor  # [hidden, n_heads*d_h]
    q_b: Optional[Tensor] = None
    k_b: Optional[Tensor] = None
    v_b: Optional[Tensor] = None
    q_norm: Optional[Tensor] = None
    k_norm: Optional[Tensor] = None


# A merge method: (layer index, block with shape.n_kv heads, shape, new_kv) -> block with new_kv.
LayerMethod = Callable[[int, AttentionBlock, HeadShape, int], AttentionBlock]


def valid_kv_counts(n_heads: int, n_kv: int) -> list[int]:
    """KV-head counts reachable by contiguous pooling: divisors of n_kv (they divide n_heads too)."""
    return [k for k in range(1, n_kv + 1) if n_kv % k == 0 and n_heads % k == 0]


def pool_heads(t: Tensor, n_kv: int, new_kv: int) -> Tensor:
    """Mean of contiguous groups of heads along dim 0 (rows head-major), in float32, cast back."""
    g = n_kv // new_kv
    grouped = t.reshape(new_kv, g, t.shape[0] // n_kv, *t.shape[1:])
    return grouped.float().mean(dim=1).reshape(new_kv * (t.shape[0] // n_kv), *t.shape[1:]).to(t.dtype)


def mean_pool(layer: int, block: AttentionBlock, shape: HeadShape, new_kv: int) -> AttentionBlock:
    """Ainslie et al.'s conversion: each new K/V head is the mean of its group; Q and O unchanged."""
    if new_kv == shape.n_kv:
        return block

    def pool(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else pool_heads(t, shape.n_kv, new_kv)

    k_norm = block.k_norm
    if k_norm is not None and k_norm.shape[0] == shape.n_kv * shape.head_dim:
        k_norm = pool_heads(k_norm, shape.n_kv, new_kv)
    return replace(
        block,
        k_w=pool(block.k_w),
        v_w=pool(block.v_w),
        k_b=pool(block.k_b),
        v_b=pool(block.v_b),
        k_norm=k_norm,
    )


METHODS: dict[str, LayerMethod] = {"mean": mean_pool}
