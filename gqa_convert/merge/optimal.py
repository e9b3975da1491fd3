"""The activation-optimal merge of one group, in closed form.

V: minimise Σ_i ‖(W_i − M_i W_new) x‖² over the calibration tokens, M_i any d×d map (absorbed
into o_proj). Stacking the group's blocks S = [W_1; …; W_g] (gd×D'), the minimiser is the best
rank-d approximation of S in the Σ-norm: U = top-d eigenvectors of S Σ Sᵀ, M_i = U_i (rows of
U for head i), W_new = Uᵀ S.

K: per RoPE plane only complex scalars are allowed (they commute with RoPE), so it is a rank-1
problem over the complex plane weights w_i: u = top eigenvector of the g×g Hermitian
C_ik = w_i Σ w_kᴴ, w_new = Σ_i conj(u_i) w_i, and w_i ≈ u_i w_new; query rows absorb conj(u_i).
Alignment-then-mean is a feasible point of both problems, so this is never worse on Σ.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .heads import GroupFactors, Planes, to_complex


def optimal_v(v: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(W_new [d, D'], M [g, d, d]) for V heads v [g, d, D']."""
    g, d, _ = v.shape
    stack = v.reshape(g * d, -1)
    cov = stack @ sigma @ stack.T
    _, vecs = torch.linalg.eigh((cov + cov.T) / 2)
    u = vecs[:, -d:].flip(-1)  # top-d, largest first
    return u.T @ stack, u.reshape(g, d, d)


def optimal_k(kc: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(w_new [P, D'], u [g, P]) for complex K planes kc [g, P, D']."""
    y = kc @ sigma.to(kc.dtype)
    cov = torch.einsum("ipd,kpd->pik", y, kc.conj())  # [P, g, g], C_ik = w_i Σ w_k^H
    _, vecs = torch.linalg.eigh((cov + cov.conj().transpose(1, 2)) / 2)
    u = vecs[:, :, -1]  # [P, g] top eigenvector per plane
    # fix the free phase so that u is real-positive on the first head: keeps merged planes
    # close to the old ones, which only matters for readability of the weights.
    first = u[:, :1]
    ph = torch.where(first.abs() > 0, first / first.abs().clamp_min(1e-300), torch.ones_like(first))
    u = u / ph
    w_new = torch.einsum("pi,ipd->pd", u.conj(), kc)
    return w_new, u.T


def optimal_factors(k: Tensor, v: Tensor, sigma_k: Tensor, sigma_v: Tensor, planes: Planes) -> GroupFactors:
    """Factors of the activation-optimal merge for one group (k, v: [g, d, D'] augmented blocks)."""
    v_new, maps = optimal_v(v, sigma_v)
    k_new, u = optimal_k(to_complex(k, planes), sigma_k)
    return GroupFactors(v_new=v_new, v_maps=maps, k_new=k_new, k_scalars=u)
