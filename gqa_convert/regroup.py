"""The head math: regroup one layer's key/value heads into fewer, contiguous groups.

Every family's attention tensors are first split (by `architectures`) into one canonical,
unfused `AttentionBlock`; a merge method maps a block with `shape.n_kv` KV heads to one with
`new_kv` heads; the family then joins it back into its own tensor names and layout. Rows of
q/k/v are head-major: head i owns rows [i*d_h, (i+1)*d_h). Query head h reads KV head h // r,
r = n_heads / n_kv, so a regrouping pools contiguous runs of old KV heads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence, TypeGuard

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
        k_w=pool_heads(block.k_w, shape.n_kv, new_kv),
        v_w=pool_heads(block.v_w, shape.n_kv, new_kv),
        k_b=pool(block.k_b),
        v_b=pool(block.v_b),
        k_norm=k_norm,
    )


METHODS: dict[str, LayerMethod] = {"mean": mean_pool}


# --- query heads ---------------------------------------------------------------------------------


def valid_q_counts(n_heads: int, new_kv: int) -> list[int]:
    """Query-head counts reachable with new_kv KV heads: divisors of n_heads that new_kv divides
    (every new KV group keeps the same number of query heads)."""
    return [n for n in range(new_kv, n_heads + 1, new_kv) if n_heads % n == 0]


def head_rows(heads: Sequence[int], head_dim: int) -> Tensor:
    """Row indices of the given heads in a head-major projection."""
    return (torch.tensor(list(heads), dtype=torch.long)[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def keep_query_heads(
    block: AttentionBlock, shape: HeadShape, keep: Sequence[int], o_w: Tensor
) -> tuple[AttentionBlock, HeadShape]:
    """The block with only the query heads `keep` (ascending), o_proj = o_w [hidden, len(keep)*d_h],
    and its shape. Function-preserving for the kept heads: each still reads the keys and values it read.

    KV heads: when every old KV head is still read by the same number of kept heads, they stay as
    they are (the kept heads are contiguous groups again, shape (len(keep), n_kv)). Otherwise each
    kept head gets its own copy of the KV head it reads (an equivalent multi-head block, shape
    (len(keep), len(keep))): a later KV regrouping then pools KV heads in proportion to the query
    heads that still read them, and one nobody reads any more is dropped.
    q_norm/k_norm over head_dim (shared by all heads) are carried as they are; whole-projection
    norms are sliced with their heads.
    """
    d, r, n = shape.head_dim, shape.group_size, len(keep)
    if list(keep) != sorted(set(keep)) or not keep or keep[-1] >= shape.n_heads:
        raise ValueError(f"keep must be ascending distinct query heads below {shape.n_heads}, got {list(keep)}")
    q = head_rows(keep, d)
    out = replace(
        block,
        q_w=block.q_w[q],
        q_b=None if block.q_b is None else block.q_b[q],
        o_w=o_w.to(block.o_w.dtype),
        q_norm=block.q_norm[q] if _whole(block.q_norm, shape.n_heads * d) else block.q_norm,
    )
    readers = [h // r for h in keep]
    counts = [readers.count(j) for j in range(shape.n_kv)]
    if len(set(counts)) == 1:  # uniform (and nonzero: n > 0): KV untouched
        return out, HeadShape(n_heads=n, n_kv=shape.n_kv, head_dim=d, hidden=shape.hidden)
    kv = head_rows(readers, d)

    def pick(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t[kv]

    out = replace(out, k_w=block.k_w[kv], v_w=block.v_w[kv], k_b=pick(block.k_b), v_b=pick(block.v_b))
    if _whole(block.k_norm, shape.n_kv * d):
        out.k_norm = block.k_norm[kv]
    return out, HeadShape(n_heads=n, n_kv=n, head_dim=d, hidden=shape.hidden)


def _whole(norm: Optional[Tensor], rows: int) -> TypeGuard[Tensor]:
    """A norm spanning the whole projection (OLMo-2), as opposed to one over head_dim shared by heads."""
    return norm is not None and norm.shape[0] == rows and rows != 0
