"""Re-derive the shipped default coefficients (gqa_convert/law/coefficients.yaml).

The paper (Chen et al. 2025) never published a_H, b_H, E. This script reconstructs them: a
smooth law — ln A_H and b_H cubic polynomials of x = log2 n_h, y = log2 n_kv, plus a shared E —
that is MONOTONE in the heads (at equal N, doubling n_kv or n_h never raises the loss, for every N
in 1e5..1e12 and every power-of-two configuration up to 64 heads: a set of linear constraints on
the coefficients, enforced by projection) and, within that, calibrated so that
  (1) the three-step recipe reproduces as much of Table 4 (40 cells) as it can, and
  (2) the Llama-3 head configuration (d/64, 8) reaches 2.615 / 2.448 / 2.362 at the 1B / 3B / 8B
      shapes (solved exactly for E and the two constant terms).

Default run (140–250 s on one busy core): from the earlier unconstrained law (UNCONSTRAINED,
`shipped:table4`) to the nearest monotone law (SLSQP), then a seeded evolution strategy.
`--from-scratch` also re-derives UNCONSTRAINED (the better part of an hour). Deterministic (fixed
seeds, single thread).

    python scripts/calibrate_law.py                 # print the result
    python scripts/calibrate_law.py -o gqa_convert/law/coefficients.yaml
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
from scipy.optimize import least_squares, minimize

from gqa_convert.law.cost import CostSettings
from dataclasses import replace

from gqa_convert.law.loss import LossLaw, candidates, save_law
from gqa_convert.law.recipe import (
    LLAMA3_REFERENCE, TABLE4, TABLE4_CONTEXTS, TABLE4_LOSSES, RecipeSettings, recipe_grid, table4_match,
)
from gqa_convert.law.shapes import ModelShape

MONOMIALS_A = ["1", "x", "y", "xx", "xy", "yy", "xxx", "xxy", "xyy", "yyy"]
MONOMIALS_B = ["1", "x", "y", "xx", "xy", "yy", "xxx", "xxy", "xyy", "yyy"]
# Degree-2 start of --from-scratch (an earlier run of stage 1 from E=1.9, ln A=ln 0.7, b=0.3; 24/40 cells).
INIT2 = {"E": 2.0106, "log_A": {"1": -0.35267, "x": -0.026032, "y": -0.0059834, "xx": 0.0022581, "xy": -0.0051822, "yy": 0.00051235},
         "b": {"1": 0.21190, "x": -0.0040289, "y": 0.0068787, "xx": 0.00029847, "xy": -0.00066278, "yy": 0.0075361}}
# Start of the default run: the result of an earlier, exploratory run of the --from-scratch stages
# (2-5, then polish under power interpolation: 32/40 cells, 2 trend violations on the fine grid),
# so that re-deriving the shipped file takes minutes, not the better part of an hour.
UNCONSTRAINED = {"E": 2.085595285870736,
        "log_A": {'1': -0.389071340833, 'x': -0.0481510257873, 'y': -0.00181630271556, 'xx': -0.00105985425492, 'xy': -0.00353525998446, 'yy': 0.00731328252453, 'xxx': 0.00108362802027, 'xxy': -0.00197762808927, 'xyy': 0.00216179634453, 'yyy': -0.00316590927581},
        "b": {'1': 0.24516947933, 'x': -0.0295375686766, 'y': 0.109472310388, 'xx': 0.0139500041529, 'xy': -0.00443767006541, 'yy': -0.0455588715148, 'xxx': -0.00174618815001, 'xxy': -0.0023478895474, 'xyy': 0.00982486626282, 'yyy': 0.000577166007596}}
N0 = 1e9


PROVENANCE = """Reconstructed, not published: Chen et al. (2025) never released a_H, b_H or E.
Calibrated by `python scripts/calibrate_law.py {args}` under a hard constraint: at equal N,
doubling n_kv (n_kv <= n_h) or n_h never raises the loss, for every N in 1e5..1e12 non-embedding
parameters and every power-of-two configuration up to 64 heads (the paper: more query heads lower
loss more than more KV heads). Within it, the paper's three-step recipe (settings below) reproduces
{cells}/40 cells of its Table 4 ({far} more than one doubling off; {trend} trend violations on a fine grid),
and the Llama-3 head configuration (d/64, 8) reaches the paper's reference losses at the
Llama-3.2-1B, -3B and Llama-3.1-8B shapes (predicted {refs}; paper 2.615, 2.448, 2.362).
stories260K-sized conversion (226,560 params, 8 q / 4 KV heads -> 2, 1 KV heads): delta {small} nats.
Form: ln A_H and b_H cubic polynomials of x = log2 n_h, y = log2 n_kv, A_H = (a_H/1e9)^b_H,
E shared. The earlier, unconstrained reconstruction (32/40 cells, but fewer heads predicted
BETTER below ~5e8 parameters) ships as `--law shipped:table4` (docs/law.md).
The paper's own fits covered 3M-1.2B parameters at 8K context (SlimPajama, GPT-2 tokenizer);
anything beyond is extrapolation. Fit your own with `gqa-convert law fit RUNS -o law.yaml`.
"""


def llama_shapes() -> dict[str, ModelShape]:
    return {k: ModelShape(L, d, d // 64, 8, 64, ff, 50304, tied=True) for k, ((L, d, ff), _) in LLAMA3_REFERENCE.items()}


def unpack(theta: np.ndarray, settings: RecipeSettings, ma=MONOMIALS_A, mb=MONOMIALS_B) -> LossLaw:
    E = theta[0]
    log_A = dict(zip(ma, theta[1:1 + len(ma)]))
    b = dict(zip(mb, theta[1 + len(ma):]))
    return LossLaw(E=float(E), form="smooth", reference_params=N0, log_A=log_A, b=b,
                   settings=settings.to_dict())


# A finer grid than Table 4 on which the trends must hold (head counts never rise with T, never
# fall as L* is lowered): violations are penalised so the calibrated law keeps them everywhere.
TREND_LOSSES = list(np.round(np.arange(3.4, 2.259, -0.02), 4))
TREND_CONTEXTS = [int(2048 * 2 ** (i / 2)) for i in range(19)]  # 2K ... 1M in steps of √2


def trend_violations(law: LossLaw, settings: RecipeSettings) -> int:
    g = recipe_grid(law, TREND_LOSSES, TREND_CONTEXTS, settings).choices()
    bad = 0
    for i in range(len(g)):
        for j in range(len(g[i])):
            if j and (g[i][j][0] > g[i][j - 1][0] or g[i][j][1] > g[i][j - 1][1]):
                bad += 1
            if i and (g[i][j][0] < g[i - 1][j][0] or g[i][j][1] < g[i - 1][j][1]):
                bad += 1
    return bad


def _hinge(grid, target_idx, margin) -> float:
    """Σ over cells and rival candidates of max(0, log Z_paper − log Z_rival + margin)."""
    logz = np.log(grid.z)  # [8, 5, 21]
    tz = np.take_along_axis(logz, target_idx[..., None], axis=-1)
    hinge = np.maximum(0.0, tz - logz + margin)
    hinge[np.arange(8)[:, None], np.arange(5)[None, :], target_idx] = 0.0
    return float(hinge.sum()) if np.all(np.isfinite(hinge)) else 1e6


def _ref_penalty(law, weight) -> float:
    pen = 0.0
    for key, shape in llama_shapes().items():
        try:
            pred = law.loss(shape.non_embedding_params, shape.n_heads, shape.n_kv)
        except Exception:
            return 1e6
        pen += weight * (pred - LLAMA3_REFERENCE[key][1]) ** 2
    return pen


def objective(theta, settings, target_idx, margin=0.002, ref_weight=3e3, trend_weight=0.05):
    try:
        law = unpack(theta, settings)
        if law.E >= 2.3 or law.E < 0.5:
            return 1e6
        grid = recipe_grid(law, TABLE4_LOSSES, TABLE4_CONTEXTS, settings)
    except Exception:
        return 1e6
    if not np.all(np.isfinite(grid.z)):
        return 1e6
    pen = _hinge(grid, target_idx, margin) + _ref_penalty(law, ref_weight)
    if trend_weight:
        try:
            pen += trend_weight * trend_violations(law, settings)
        except Exception:  # E above the fine grid's lowest loss
            return 1e6
    return pen


def evaluate(law: LossLaw, settings: RecipeSettings) -> tuple[int, dict]:
    grid = recipe_grid(law, TABLE4_LOSSES, TABLE4_CONTEXTS, settings).choices()
    refs = {k: law.loss(s.non_embedding_params, s.n_heads, s.n_kv) for k, s in llama_shapes().items()}
    return table4_match(grid), refs


def _targets(settings: RecipeSettings) -> np.ndarray:
    index = {h: i for i, h in enumerate(candidates(settings.max_heads))}
    return np.array([[index[c] for c in TABLE4[l]] for l in TABLE4_LOSSES])


def _vector(init: dict, ma=MONOMIALS_A, mb=MONOMIALS_B) -> np.ndarray:
    return np.r_[init["E"], [init["log_A"].get(m, 0.0) for m in ma], [init["b"].get(m, 0.0) for m in mb]]


def refine(theta, settings, maxfev, margins=(0.004, 0.002, 0.001, 0.0005), trend_weight=0.05, log=print):
    """Powell on the hinge objective, margins shrinking (stage 3/5)."""
    for margin in margins:
        res = minimize(objective, theta, args=(settings, _targets(settings), margin, 3e3, trend_weight), method="Powell",
                       options={"maxfev": maxfev, "xtol": 1e-7, "ftol": 1e-10})
        theta = res.x
        law = unpack(theta, settings)
        cells, refs = evaluate(law, settings)
        log(f"  margin {margin}: objective {res.fun:.4f}, {cells}/40 cells, trend violations "
            f"{trend_violations(law, settings)}, refs " + " ".join(f"{v:.3f}" for v in refs.values()))
    return theta


def free_stage(theta2, settings, maxfev, log=print):
    """Stage 2: one free (ln A_H, b_H) per candidate and Llama-3 configuration, from the degree-2 law."""
    law2 = unpack(theta2, settings, MONOMIALS_A[:6], MONOMIALS_B[:6])
    heads = candidates(settings.max_heads) + [(48, 8), (64, 8)]
    la = [law2.coefficients(*h)[1] * np.log(law2.coefficients(*h)[0] / N0) for h in heads]
    bs = [law2.coefficients(*h)[1] for h in heads]
    x = np.r_[law2.E, la, bs]
    k = len(heads)

    def law_of(th):
        return LossLaw(E=float(th[0]), form="per_head",
                       heads={h: (N0 * np.exp(th[1 + i] / th[1 + k + i]), th[1 + k + i]) for i, h in enumerate(heads)})

    def obj(th, margin):
        if np.any(th[1 + k:] <= 0.01) or not 0.5 < th[0] < 2.3:
            return 1e6
        law = law_of(th)
        try:
            grid = recipe_grid(law, TABLE4_LOSSES, TABLE4_CONTEXTS, settings, heads=candidates(settings.max_heads))
        except Exception:
            return 1e6
        return _hinge(grid, _targets(settings), margin) + _ref_penalty(law, 3e3)

    for margin in (0.004, 0.002, 0.001, 0.0005):
        x = minimize(obj, x, args=(margin,), method="Powell", options={"maxfev": maxfev, "xtol": 1e-7, "ftol": 1e-10}).x
        log(f"  free stage, margin {margin}: {table4_match(recipe_grid(law_of(x), TABLE4_LOSSES, TABLE4_CONTEXTS, settings, heads=candidates(settings.max_heads)).choices())}/40 cells")
    return heads, x


def project(heads, x) -> np.ndarray:
    """Stage 3: least-squares projection of the free (ln A_H, b_H) onto the cubic basis, leaving out
    configurations the free stage priced out of every cell (ln A_H > 1)."""
    k = len(heads)
    keep = [i for i in range(k) if x[1 + i] < 1.0]
    X = np.log2([heads[i][0] for i in keep])
    Y = np.log2([heads[i][1] for i in keep])
    basis = lambda ms: np.stack([np.ones_like(X) if m == "1" else X ** m.count("x") * Y ** m.count("y") for m in ms], 1)
    ca = np.linalg.lstsq(basis(MONOMIALS_A), x[1 + np.array(keep)], rcond=None)[0]
    cb = np.linalg.lstsq(basis(MONOMIALS_B), x[1 + k + np.array(keep)], rcond=None)[0]
    return np.r_[x[0], ca, cb]


TREND_WEIGHT = 10  # one trend violation (or far cell) costs as much as ten exact cells


def far_cells(grid) -> int:
    """Cells more than one doubling of n_h or n_kv away from the paper's."""
    return sum(abs(np.log2(h / TABLE4[l][j][0])) > 1 or abs(np.log2(k / TABLE4[l][j][1])) > 1
               for i, l in enumerate(TABLE4_LOSSES) for j, (h, k) in enumerate(grid[i]))


# Monotonicity (issue 3): at equal N, doubling n_kv (n_kv ≤ n_h) or n_h never raises the loss, for
# every N in [1e5, 1e12] and every power-of-two configuration up to 64 heads (the 21 candidates plus
# the Llama-3 8B head count). With u = ln(N0/N), ln(L − E) = ln A_H + b_H·u is linear in u, so the
# condition holds on the whole interval iff it holds at its two ends — and it is LINEAR in the
# polynomial coefficients: G·θ ≤ −MONOTONE_MARGIN. Every candidate θ is projected onto that polytope
# (a small QP), so the calibrated law is monotone by construction, not by penalty. b_H ≥ B_MIN keeps
# the loss falling with N.
MONOTONE_PARAMS = (1e5, 1e12)
MONOTONE_MAX_HEADS = 64
MONOTONE_MARGIN = 1e-3  # ln(L − E) falls by at least 0.1% per doubling of heads (strict, robust sign)
B_MIN = 0.05
# E ≤ 2.15 (the unconstrained law had 2.086): with the reference losses solved exactly, a higher E
# forces a steeper b_H, and with it an absurd reducible loss (tens of nats) far below 3M parameters.
E_MAX = 2.15
# A small model the law is read off for (the offline demo converts stories260K, 8 q / 4 KV heads):
# the deltas 4 -> 2 and 4 -> 1 KV heads should stay small; each nat above SMALL_DELTA costs
# SMALL_WEIGHT exact cells in the score.
SMALL_MODEL = ModelShape(5, 64, 8, 4, 8, 172, 512, tied=True)
SMALL_DELTA, SMALL_WEIGHT = 0.1, 20.0
SCALE = np.r_[0.01, [0.01] * len(MONOMIALS_A), [0.003] * len(MONOMIALS_B)]  # typical step per coefficient


def _monomials(ms, h, k) -> np.ndarray:
    x, y = np.log2(h), np.log2(k)
    return np.array([1.0 if m == "1" else x ** m.count("x") * y ** m.count("y") for m in ms])


def monotone_constraints() -> tuple[np.ndarray, np.ndarray]:
    """(G, g): the law is monotone (and b_H ≥ B_MIN) iff G·θ + g ≤ 0."""
    powers = [2 ** i for i in range(int(np.log2(MONOTONE_MAX_HEADS)) + 1)]
    configs = [(h, k) for h in powers for k in powers if k <= h]
    steps = [((h, k), (2 * h, k)) for h, k in configs if 2 * h <= MONOTONE_MAX_HEADS]
    steps += [((h, k), (h, 2 * k)) for h, k in configs if 2 * k <= h]
    rows, g = [], []
    for lo, hi in steps:
        d_a = _monomials(MONOMIALS_A, *hi) - _monomials(MONOMIALS_A, *lo)
        d_b = _monomials(MONOMIALS_B, *hi) - _monomials(MONOMIALS_B, *lo)
        for n in MONOTONE_PARAMS:
            rows.append(np.r_[0.0, d_a, np.log(N0 / n) * d_b])
            g.append(MONOTONE_MARGIN)
    for h, k in configs:
        rows.append(np.r_[0.0, np.zeros(len(MONOMIALS_A)), -_monomials(MONOMIALS_B, h, k)])
        g.append(B_MIN)
    return np.array(rows), np.array(g)


_G, _g = monotone_constraints()


def monotone(theta) -> bool:
    return bool(np.all(_G @ theta + _g <= 1e-9))


def project_monotone(theta: np.ndarray) -> np.ndarray:
    """The nearest monotone θ (distance in units of SCALE), by SLSQP; θ itself when already monotone."""
    if monotone(theta):
        return theta
    z0 = theta / SCALE
    cons = {"type": "ineq", "fun": lambda z: -(_G @ (z * SCALE) + _g), "jac": lambda z: -(_G * SCALE)}
    res = minimize(lambda z: 0.5 * np.sum((z - z0) ** 2), z0, jac=lambda z: z - z0, constraints=[cons],
                   method="SLSQP", options={"maxiter": 200, "ftol": 1e-12})
    return res.x * SCALE


def fit_references(theta: np.ndarray, settings: RecipeSettings) -> np.ndarray:
    """Re-solve E, ln A_H's and b_H's constant terms so that the Llama-3 reference losses hold. The
    constants cancel in every monotonicity difference, so this never breaks monotonicity."""
    shapes = llama_shapes()
    ref = np.array([LLAMA3_REFERENCE[k][1] for k in shapes])
    ia, ib = 1, 1 + len(MONOMIALS_A)

    def residual(p):
        t = theta.copy()
        t[0], t[ia], t[ib] = p
        try:
            law = unpack(t, settings)
            return np.array([law.loss(s.non_embedding_params, s.n_heads, s.n_kv) for s in shapes.values()]) - ref
        except Exception:
            return np.full(3, 10.0)

    lo, hi = [1.0, -5.0, -1.0], [E_MAX, 5.0, 2.0]
    p0 = np.clip([theta[0], theta[ia], theta[ib]], np.add(lo, 0.01), np.subtract(hi, 0.01))
    out = theta.copy()
    out[0], out[ia], out[ib] = least_squares(residual, p0, bounds=(lo, hi)).x
    return out


def feasible(theta: np.ndarray, settings: RecipeSettings) -> np.ndarray:
    """Monotone (projection) and on the Llama-3 reference losses (constant terms re-solved)."""
    theta = fit_references(project_monotone(theta), settings)
    return theta if monotone(theta) else project_monotone(theta)


def monotone_start(theta_free: np.ndarray, settings: RecipeSettings, log=print) -> np.ndarray:
    """Stage 7: the monotone law closest to an unconstrained one, measured on what the recipe sees —
    ln N*(H) of the 21 candidates at Table 4's losses — plus the reference losses; SLSQP under the
    linear monotonicity constraints (and b_H ≤ 0.8), from a shared-exponent law (monotone by
    construction: ln A_H falls with n_h and n_kv, b_H the same for all H)."""
    free = unpack(theta_free, settings)
    cands = candidates(settings.max_heads)
    hs, ks = (np.array(v, float) for v in zip(*cands))
    losses = np.array(TABLE4_LOSSES)[:, None]
    target = np.log(free.n_star(losses, hs[None], ks[None]))
    shapes = llama_shapes()
    ref = np.array([LLAMA3_REFERENCE[k][1] for k in shapes])

    def distance(theta):
        try:
            law = unpack(theta, settings)
            a, b = law.coefficients(hs, ks)
            ln_n = np.log(a)[None] - np.log(losses - law.E) / b[None]
            r = np.array([law.loss(s.non_embedding_params, s.n_heads, s.n_kv) for s in shapes.values()]) - ref
            v = float(np.mean((ln_n - target) ** 2) + 100 * np.sum(r ** 2))
            return v if np.isfinite(v) else 1e3
        except Exception:
            return 1e3

    powers = [2 ** i for i in range(int(np.log2(MONOTONE_MAX_HEADS)) + 1)]
    b_rows = np.array([np.r_[0.0, np.zeros(len(MONOMIALS_A)), _monomials(MONOMIALS_B, h, k)]
                       for h in powers for k in powers if k <= h])
    cons = [{"type": "ineq", "fun": lambda t: -(_G @ t + _g), "jac": lambda t: -_G},
            {"type": "ineq", "fun": lambda t: 0.8 - b_rows @ t, "jac": lambda t: -b_rows}]
    start = _vector({"E": 2.0, "log_A": {"1": -0.4, "x": -0.05, "y": -0.02}, "b": {"1": 0.3}})
    res = minimize(distance, start, method="SLSQP", constraints=cons, bounds=[(1.6, E_MAX)] + [(None, None)] * 20,
                   options={"maxiter": 500, "ftol": 1e-12})
    theta = feasible(res.x, settings)
    cells, refs = evaluate(unpack(theta, settings), settings)
    log(f"  monotone start: distance {res.fun:.4f}, {cells}/40 cells, refs " + " ".join(f"{v:.3f}" for v in refs.values()))
    return theta


def small_model_deltas(law: LossLaw) -> list[float]:
    """L(N'; 8, k) − L(N; 8, 4) for SMALL_MODEL converted to k = 2 and 1 KV heads."""
    n = SMALL_MODEL.non_embedding_params
    return [law.delta(n, (8, 4), SMALL_MODEL.with_heads(8, k).non_embedding_params, (8, k)) for k in (2, 1)]


def score(theta, settings) -> tuple:
    """Monotone and reference losses within 0.015 first; then exact cells − 10·(trend violations +
    cells more than one doubling off); then the hinge."""
    try:
        law = unpack(theta, settings)
        if not monotone(theta) or law.E > E_MAX + 1e-9:
            return (False, -1e9)
        grid = recipe_grid(law, TABLE4_LOSSES, TABLE4_CONTEXTS, settings)
        cells, refs = evaluate(law, settings)
        worst = max(abs(refs[k] - LLAMA3_REFERENCE[k][1]) for k in refs)
        if worst > 0.015 or not np.all(np.isfinite(grid.z)):
            return (False, -worst)
        bad = trend_violations(law, settings) + far_cells(grid.choices())
        small = SMALL_WEIGHT * sum(max(0.0, d - SMALL_DELTA) for d in small_model_deltas(law))
        return (True, cells - TREND_WEIGHT * bad - small, -bad, cells, -_hinge(grid, _targets(settings), 0.001) - worst)
    except Exception:
        return (False, -1e9)


def polish(theta, settings, iterations: int, seed: int, log=print):
    """Stage 8: a (1+1) evolution strategy on the lexicographic score (the exact-cell count and the
    trend count are step functions Powell cannot see); every trial is made feasible first (monotone,
    reference losses). Seeded, fixed number of iterations."""
    rng = np.random.default_rng(seed)
    theta = feasible(theta, settings)
    best, sigma = score(theta, settings), 1.0
    for it in range(iterations):
        step = rng.normal(0, 1, theta.shape) * SCALE * sigma * (rng.random(theta.shape) < 0.3)
        trial = feasible(theta + step, settings)
        s = score(trial, settings)
        if s >= best:
            if s > best and s[0]:
                log(f"  polish {it}: trend violations + far cells {-s[2]}, cells {s[3]}/40")
            theta, best, sigma = trial, s, sigma * 1.5
        else:
            sigma *= 0.95
        sigma = min(max(sigma, 0.05), 5.0)
    return theta


def _polish_free(theta, settings, iterations: int, seed: int, log=print):
    """Stage 6: the unconstrained (1+1) evolution strategy that produced UNCONSTRAINED (the law
    shipped before monotonicity was required): exact cells − 10·(trend violations + far cells)."""
    def free_score(t):
        try:
            law = unpack(t, settings)
            grid = recipe_grid(law, TABLE4_LOSSES, TABLE4_CONTEXTS, settings)
            cells, refs = evaluate(law, settings)
            worst = max(abs(refs[k] - LLAMA3_REFERENCE[k][1]) for k in refs)
            if worst > 0.015 or not np.all(np.isfinite(grid.z)):
                return (False,)
            bad = trend_violations(law, settings) + far_cells(grid.choices())
            return (True, cells - TREND_WEIGHT * bad, -bad, cells, -_hinge(grid, _targets(settings), 0.001) - worst)
        except Exception:
            return (False,)

    rng = np.random.default_rng(seed)
    best, sigma = free_score(theta), 1.0
    for it in range(iterations):
        trial = theta + rng.normal(0, 1, theta.shape) * SCALE * sigma * (rng.random(theta.shape) < 0.3)
        s = free_score(trial)
        if s >= best:
            theta, best, sigma = trial, s, sigma * 1.5
        else:
            sigma *= 0.95
        sigma = min(max(sigma, 0.05), 5.0)
    log(f"  unconstrained polish: {best[3] if best[0] else '?'}/40 cells")
    return theta


def calibrate(settings: RecipeSettings, maxfev: int, from_scratch: bool, iterations: int = 5000, seed: int = 0,
              log=print) -> LossLaw:
    if from_scratch:
        linear = replace(settings, interpolation="linear")
        theta2 = _vector(INIT2, MONOMIALS_A[:6], MONOMIALS_B[:6])  # stage 1 (stored)
        log("stage 2: free per-configuration calibration (linear interpolation)")
        heads, x = free_stage(theta2, linear, 4 * maxfev, log)
        log("stage 3: projection onto the cubic form; stage 4: refine (linear interpolation)")
        theta = refine(project(heads, x), linear, maxfev, margins=(0.004, 0.002, 0.001), trend_weight=0.0, log=log)
        log(f"stage 5: refine under the chosen settings ({settings.interpolation}), trends penalised")
        theta = refine(theta, settings, maxfev, margins=(0.002, 0.0005), log=log)
        log("stage 6: unconstrained polish (the previous shipped law, UNCONSTRAINED below)")
        theta = _polish_free(theta, settings, 2000, seed + 1, log)
    else:
        theta = _vector(UNCONSTRAINED)
    log("stage 7: nearest monotone law (SLSQP under the linear monotonicity constraints)")
    theta = monotone_start(theta, settings, log)
    log("stage 8: polish (evolution strategy on exact cells and trends, monotone by projection)")
    theta = polish(theta, settings, iterations, seed, log)
    return unpack(theta, settings)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", help="write the law file here")
    p.add_argument("--maxfev", type=int, default=6000, help="Powell evaluations per margin")
    p.add_argument("--iterations", type=int, default=5000, help="polish iterations (stage 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-scratch", action="store_true",
                   help="also re-derive the start point (free per-configuration stage and projection; ~30 min)")
    p.add_argument("--memory-unit", default="values", choices=["values", "bytes"])
    p.add_argument("--compute", default="per_sequence", choices=["per_sequence", "per_token"])
    p.add_argument("--embeddings", action="store_true")
    p.add_argument("--interpolation", default="power", choices=["linear", "log", "power"])
    args = p.parse_args(argv)
    settings = RecipeSettings(interpolation=args.interpolation,
                              cost=CostSettings(memory_unit=args.memory_unit, compute=args.compute, embeddings=args.embeddings))
    t0 = time.time()
    law = calibrate(settings, args.maxfev, args.from_scratch, args.iterations, args.seed)
    cells, refs = evaluate(law, settings)
    print(f"best: {cells}/40 cells, {trend_violations(law, settings)} trend violations, refs {refs}, "
          f"small-model deltas {small_model_deltas(law)}, {time.time() - t0:.0f}s")
    law.fitted = {"params_min": 3e6, "params_max": 1.2e9, "max_heads": 32, "context": 8192}
    grid = recipe_grid(law, TABLE4_LOSSES, TABLE4_CONTEXTS, settings).choices()
    law.provenance = PROVENANCE.format(
        cells=cells, far=far_cells(grid), small=" / ".join(f"{d:+.3f}" for d in small_model_deltas(law)), refs=", ".join(f"{k} {v:.3f}" for k, v in refs.items()), trend=trend_violations(law, settings), args=f"--seed {args.seed} --iterations {args.iterations}" + (" --from-scratch" if args.from_scratch else ""))
    print(law.to_dict())
    if args.output:
        save_law(law, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
