"""Alignment, then pooling (Jin et al., 2024): bring each head of a group closest to a common
target with a function-preserving map, then take the mean.

V: an orthogonal R_i per head (the Procrustes solution: polar factor of T Σ W_iᵀ), absorbed as
Wo_h ← Wo_h R_iᵀ. K: per RoPE plane a unit complex scalar c_i (a rotation of that plane, which
commutes with RoPE), absorbed into the same plane of the query rows. The target is a
generalized Procrustes mean: start from the group's first head, fit every head to it,
re-average, repeat. Errors are measured on the calibration tokens (Σ-weighted).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .heads import GroupFactors, Planes, to_complex

ROUNDS = 8


def polar(a: Tensor) -> Tensor:
    """The orthogonal factor of a (nearest orthogonal matrix): U Vᵀ of its SVD."""
    u, _, vh = torch.linalg.svd(a)
    return u @ vh


def align_v(v: Tensor, sigma: Tensor, rounds: int = ROUNDS) -> tuple[Tensor, Tensor]:
    """(W_new, R) for V heads v [g, d, D']: R_i orthogonal with R_i W_i ≈ W_new = mean_i R_i W_i."""
    target = v[0]
    for _ in range(rounds):
        rot = torch.stack([polar(target @ sigma @ w.T) for w in v])
        target = (rot @ v).mean(0)
    return target, rot


def align_k(kc: Tensor, sigma: Tensor, rounds: int = ROUNDS) -> tuple[Tensor, Tensor]:
    """(w_new [P, D'], c [g, P]) for complex K planes kc [g, P, D']: |c|=1, c_i w_i ≈ w_new = mean c_i w_i."""
    sig = sigma.to(kc.dtype)
    target = kc[0]
    for _ in range(rounds):
        z = torch.einsum("ipd,de,pe->ip", kc, sig, target.conj())  # w_i Σ t^H per plane
        c = z.conj() / z.abs().clamp_min(1e-300)  # maximises Re(c·z)
        c = torch.where(z.abs() > 0, c, torch.ones_like(c))
        target = (c[..., None] * kc).mean(0)
    return target, c


def align_factors(k: Tensor, v: Tensor, sigma_k: Tensor, sigma_v: Tensor, planes: Planes) -> GroupFactors:
    """Factors of align-then-mean for one group (k, v: [g, d, D'] augmented head blocks).

    Old head i ≈ R_iᵀ W_new (so M_i = R_iᵀ) and its plane ≈ conj(c_i) w_new (u_i = conj(c_i)).
    """
    v_new, rot = align_v(v, sigma_v)
    k_new, c = align_k(to_complex(k, planes), sigma_k)
    return GroupFactors(v_new=v_new, v_maps=rot.transpose(1, 2), k_new=k_new, k_scalars=c.conj())
