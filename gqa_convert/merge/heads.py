"""The head algebra shared by every merge: factors, function-preserving transforms, absorption.

A merge of one group of g old KV heads into one new head is described by `GroupFactors`:

- V: a merged block W_new (d×D') and per-head maps M_i (d×d) with W_i ≈ M_i W_new. M_i is
  absorbed exactly into the o_proj columns of every query head h reading head i: Wo_h ← Wo_h M_i.
- K: per RoPE plane p (rows a_p, b_p; the key component k_a + i·k_b is one complex number), a
  merged complex plane weight w_new and per-head complex scalars u_i with w_i ≈ u_i w_new. A
  complex scalar commutes with RoPE; the query rows of head h absorb it as q ← q·conj(u_i), so
  q·k is what it would be with the approximated key.

Weights are "augmented" by their bias column when the block has that bias (D' = D+1), so the
calibration covariance Σ over [x; 1] weighs bias errors too; without a bias D' = D and the
merged head gets no bias. Mean pooling is the special case M_i = I, u_i = 1, W_new = mean.
All maths in float64; results are cast back to the stored dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from ..regroup import AttentionBlock, HeadShape, mean_pool


@dataclass(frozen=True)
class Planes:
    """Row pairs of one head that RoPE rotates together, (a[p], b[p]); rotate_half pairs j, j + r/2.

    Dimensions past the rotary part are not rotated; pairing them (r, r+1), ... is still a valid
    complex plane (a complex scalar is an invertible 2×2 map there too). An odd last one is left alone.
    """

    a: Tensor
    b: Tensor

    @staticmethod
    def for_head(head_dim: int, rotary_dim: Optional[int] = None) -> "Planes":
        r = head_dim if rotary_dim is None else int(rotary_dim)
        r -= r % 2
        a = list(range(r // 2)) + list(range(r, head_dim - 1, 2))
        b = list(range(r // 2, r)) + list(range(r + 1, head_dim, 2))
        return Planes(torch.tensor(a), torch.tensor(b))


@dataclass
class GroupFactors:
    """One group's merge: V (W_new [d, D'], M [g, d, d]) and K (w_new complex [P, D'], u [g, P])."""

    v_new: Tensor
    v_maps: Tensor
    k_new: Tensor
    k_scalars: Tensor


# --- augmented weights -------------------------------------------------------------------------


def augmented(w: Tensor, b: Optional[Tensor]) -> Tensor:
    """[W b] in float64 (or just W when there is no bias)."""
    w = w.to(torch.float64)
    return w if b is None else torch.cat([w, b.to(torch.float64)[:, None]], dim=1)


def sigma_for(sigma: Tensor, with_bias: bool) -> Tensor:
    """Σ over [x; 1] when the projection has a bias, else its x block."""
    return sigma if with_bias else sigma[:-1, :-1]


def to_complex(rows: Tensor, planes: Planes) -> Tensor:
    """Real head rows [..., d, D'] -> complex plane weights [..., P, D']: row a + i·row b."""
    return torch.complex(rows[..., planes.a, :], rows[..., planes.b, :])


def from_complex(c: Tensor, planes: Planes, template: Tensor) -> Tensor:
    """Inverse of to_complex; rows outside every plane are taken from template."""
    out = template.clone()
    out[..., planes.a, :] = c.real
    out[..., planes.b, :] = c.imag
    return out


def mean_factors(k: Tensor, v: Tensor, planes: Planes) -> GroupFactors:
    """Mean pooling as factors (k, v: [g, d, D'] augmented head blocks)."""
    g, d = v.shape[0], v.shape[1]
    kc = to_complex(k, planes)
    return GroupFactors(
        v_new=v.mean(0),
        v_maps=torch.eye(d, dtype=torch.float64).expand(g, d, d).clone(),
        k_new=kc.mean(0),
        k_scalars=torch.ones(g, kc.shape[1], dtype=torch.complex128),
    )


# --- reconstruction error ---------------------------------------------------------------------------


def v_approx(f: GroupFactors) -> Tensor:
    """[g, d, D']: M_i W_new, what each old V head becomes."""
    return f.v_maps @ f.v_new


def k_approx(f: GroupFactors, k: Tensor, planes: Planes) -> Tensor:
    """[g, d, D']: u_i w_new per plane (rows outside the planes: their mean over the group)."""
    template = k.mean(0, keepdim=True).expand_as(k)
    return from_complex(f.k_scalars[..., None] * f.k_new[None], planes, template)


def rel_error(w: Tensor, approx: Tensor, sigma: Tensor) -> tuple[float, float]:
    """(Σ_i ‖(W_i − Ŵ_i)x‖², Σ_i ‖W_i x‖²) over the calibration tokens, as quadratic forms in Σ."""
    e = (w - approx).reshape(-1, w.shape[-1])
    w2 = w.reshape(-1, w.shape[-1])
    return float(((e @ sigma) * e).sum()), float(((w2 @ sigma) * w2).sum())


# --- applying factors to a block -------------------------------------------------------------------


def _heads(t: Tensor, n: int) -> Tensor:
    return t.reshape(n, t.shape[0] // n, *t.shape[1:])


def _rotate_q(q: Tensor, planes: Planes, c: Tensor) -> Tensor:
    """Multiply each query plane (q_a + i q_b) by complex c [P]; q: [d, ...] float64."""
    qa, qb = q[planes.a], q[planes.b]
    shape = (-1,) + (1,) * (q.dim() - 1)
    cr, ci = c.real.reshape(shape), c.imag.reshape(shape)
    out = q.clone()
    out[planes.a] = cr * qa - ci * qb
    out[planes.b] = ci * qa + cr * qb
    return out


def absorb_into_q_o(
    block: AttentionBlock, shape: HeadShape, maps: Tensor, scalars: Tensor, planes: Planes, do_k: bool, do_v: bool
) -> AttentionBlock:
    """q rows ← q·conj(u_i) (K) and o columns ← Wo_h M_i (V) for every query head h reading old head i.

    maps: [n_kv, d, d]; scalars: [n_kv, P] complex. Tensors not touched stay the same objects.
    """
    H, d, r = shape.n_heads, shape.head_dim, shape.group_size
    out = replace(block)
    if do_k:
        q = _heads(block.q_w.to(torch.float64).clone(), H)
        qb = None if block.q_b is None else _heads(block.q_b.to(torch.float64).clone(), H)
        for h in range(H):
            c = scalars[h // r].conj()
            q[h] = _rotate_q(q[h], planes, c)
            if qb is not None:
                qb[h] = _rotate_q(qb[h], planes, c)
        out.q_w = q.reshape(block.q_w.shape).to(block.q_w.dtype)
        if qb is not None and block.q_b is not None:  # qb exists exactly when block.q_b does
            out.q_b = qb.reshape(block.q_b.shape).to(block.q_b.dtype)
    if do_v:
        o = block.o_w.to(torch.float64).reshape(shape.hidden, H, d).clone()
        for h in range(H):
            o[:, h] = o[:, h] @ maps[h // r]
        out.o_w = o.reshape(block.o_w.shape).to(block.o_w.dtype)
    return out


def _split_aug(w: Tensor, with_bias: bool, dtype_w: torch.dtype, dtype_b: Optional[torch.dtype]):
    if with_bias:
        return w[..., :-1].to(dtype_w), w[..., -1].to(dtype_b)
    return w.to(dtype_w), None


def merged_block(
    block: AttentionBlock,
    shape: HeadShape,
    new_kv: int,
    groups: list[GroupFactors],
    planes: Planes,
    do_k: bool = True,
    do_v: bool = True,
) -> AttentionBlock:
    """The regrouped block: new K/V heads from the factors, their maps absorbed into q and o.

    Starts from mean pooling (so k_norm regrouping and anything a side does not handle is the
    paper's), then replaces the K side and/or V side.
    """
    g, d = shape.n_kv // new_kv, shape.head_dim
    out = mean_pool(0, block, shape, new_kv)
    k_old = _heads(augmented(block.k_w, block.k_b), shape.n_kv)
    maps = torch.cat([f.v_maps for f in groups])
    scalars = torch.cat([f.k_scalars for f in groups])
    out = absorb_into_q_o(out, shape, maps, scalars, planes, do_k, do_v)
    if do_v:
        v = torch.stack([f.v_new for f in groups]).reshape(new_kv * d, -1)
        out.v_w, out.v_b = _split_aug(
            v, block.v_b is not None, block.v_w.dtype, None if block.v_b is None else block.v_b.dtype
        )
    if do_k:
        k = torch.stack(
            [from_complex(f.k_new, planes, k_old[j * g : (j + 1) * g].mean(0)) for j, f in enumerate(groups)]
        ).reshape(new_kv * d, -1)
        out.k_w, out.k_b = _split_aug(
            k, block.k_b is not None, block.k_w.dtype, None if block.k_b is None else block.k_b.dtype
        )
    return out


def expanded_block(
    block: AttentionBlock,
    shape: HeadShape,
    groups: list[GroupFactors],
    planes: Planes,
    do_k: bool = True,
    do_v: bool = True,
) -> AttentionBlock:
    """The un-merged approximation: still n_kv heads, head i's K/V replaced by u_i w_new / M_i W_new.

    q and o are untouched. A model built from it must give the same logits as the merged one:
    that is what makes the absorption exact (a test oracle, not used for conversion).
    """
    k_old = _heads(augmented(block.k_w, block.k_b), shape.n_kv)
    g = shape.n_kv // len(groups)
    out = replace(block)
    if do_v:
        v = torch.cat([v_approx(f) for f in groups]).reshape(shape.n_kv * shape.head_dim, -1)
        out.v_w, out.v_b = _split_aug(
            v, block.v_b is not None, block.v_w.dtype, None if block.v_b is None else block.v_b.dtype
        )
    if do_k:
        k = torch.cat([k_approx(f, k_old[j * g : (j + 1) * g], planes) for j, f in enumerate(groups)])
        k = k.reshape(shape.n_kv * shape.head_dim, -1)
        out.k_w, out.k_b = _split_aug(
            k, block.k_b is not None, block.k_w.dtype, None if block.k_b is None else block.k_b.dtype
        )
    return out


def transformed_block(
    block: AttentionBlock, shape: HeadShape, maps: Tensor, scalars: Tensor, planes: Planes
) -> AttentionBlock:
    """A function-preserving change of basis per old KV head, before any merging.

    V_i ← M_i⁻¹ V_i (o columns ← Wo_h M_i); K planes of head i ← k / u_i (q planes ← q·conj(u_i)).
    The logits are unchanged for any invertible M_i and nonzero u_i (alignment is this with
    orthogonal M_i and unit u_i).
    """
    n, d = shape.n_kv, shape.head_dim
    out = absorb_into_q_o(block, shape, maps, scalars, planes, True, True)
    v = _heads(augmented(block.v_w, block.v_b), n)
    v = torch.linalg.solve(maps, v).reshape(n * d, -1)
    out.v_w, out.v_b = _split_aug(
        v, block.v_b is not None, block.v_w.dtype, None if block.v_b is None else block.v_b.dtype
    )
    k = _heads(augmented(block.k_w, block.k_b), n)
    kc = to_complex(k, planes) / scalars[..., None]
    k = from_complex(kc, planes, k).reshape(n * d, -1)
    out.k_w, out.k_b = _split_aug(
        k, block.k_b is not None, block.k_w.dtype, None if block.k_b is None else block.k_b.dtype
    )
    return out
