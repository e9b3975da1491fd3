"""Re-derive the shipped law (gqa_convert/law/coefficients.yaml), the one law of every command.

The paper (Chen et al. 2025) never published a_H, b_H, E. This script reconstructs them as a
`grid` law: one (ln A_H, b_H) per power-of-two head configuration 1 ≤ n_kv ≤ n_h ≤ 64 (28 points,
A_H = (a_H/1e9)^b_H, bilinear in log2 of the head counts in between) and a shared E, such that

  (1) the loss never falls when heads are removed: at equal N, doubling n_h or n_kv lowers
      ln(L − E) by at least MONOTONE_MARGIN, for every N in 1e5 … 1e12 (HARD: linear constraints,
      every candidate is projected onto them);
  (2) the Llama-3 head configuration (d/64, 8) reaches 2.615 / 2.448 / 2.362 at the 1B / 3B / 8B
      scale within REF_TOL, under both readings of "scale": N = 12·L·d² (the paper's size label)
      and the real non-embedding count of Llama-3.2-1B / -3B / Llama-3.1-8B at d_h 64;
  (3) within that, the paper's three-step recipe reproduces as much of Table 4 as it can, every
      cell within one doubling of n_h and n_kv, and the table's trends (head counts never rise with
      T, never fall as L* is lowered) hold on Table 4's grid, on a wide grid and on two fine ones.

Stages (deterministic: fixed seeds, single thread; 2–6 min on one busy core):
  1. start: the previous shipped (cubic-polynomial, monotone, 13/40) law read at the 28 points;
  2. SLSQP on a softplus margin objective over the 40 cells + the reference losses + a smoothness
     penalty (second differences of ln A_H and b_H along n_h, n_kv and the diagonal), under (1),
     E in [E_MIN, E_MAX] and b_H in [B_MIN, B_MAX];
  3. a seeded (1+1) evolution strategy on the lexicographic score: exact cells − 10·(cells more
     than one doubling off + trend violations on Table 4's and the wide grid) − trend violations
     on the fine grids; every trial is projected onto (1) and re-solved for (2) (E and constant
     shifts of all ln A_H or all b_H cancel in every monotonicity difference).

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
from gqa_convert.law.loss import LossLaw, candidates, save_law
from gqa_convert.law.recipe import (
    LLAMA3_REFERENCE,
    TABLE4,
    TABLE4_CONTEXTS,
    TABLE4_LOSSES,
    RecipeSettings,
    recipe_grid,
    table4_match,
)
from gqa_convert.law.shapes import ModelShape

N0 = 1e9
MAX_HEADS = 64
LATTICE = candidates(MAX_HEADS)  # 28 points (n_h, n_kv), powers of two, n_kv ≤ n_h ≤ 64
K = len(LATTICE)
INDEX = {h: i for i, h in enumerate(LATTICE)}
MONOTONE_PARAMS = (1e5, 1e12)
MONOTONE_MARGIN = 2e-4  # ln(L − E) falls by at least 0.02% per doubling of heads: a strict, robust sign
E_MIN, E_MAX = 1.5, 2.34
B_MIN, B_MAX = 0.1, 0.9  # b_H ≥ 0.1: the loss keeps falling with N at a plausible rate
REF_TOL = 0.016  # both readings of the Llama-3 reference losses (the criterion is 0.02)
SMOOTH_U, SMOOTH_B = 1.0, 10.0  # stage-2 weights of the second differences of ln A_H and b_H
SETTINGS = RecipeSettings(interpolation="power", cost=CostSettings(memory_unit="values", compute="per_sequence"))

# Stage-1 start: the previous shipped law (cubic polynomials of x = log2 n_h, y = log2 n_kv).
START_E = 2.1499999999999995
START_LOG_A = {"1": -0.4274711975944978, "x": -0.06815037959005864, "y": -0.09728704625715678,
               "xx": 0.00923758687912017, "xy": 0.017238837871539868, "yy": 0.01901488950766586,
               "xxx": -0.0005400985816810058, "xxy": -0.004982721056316776, "xyy": 0.005275590294739221,
               "yyy": -0.006526305615622083}  # fmt: skip
START_B = {"1": 0.32641736673304567, "x": 0.007008723251773, "y": 0.010414356900293721,
           "xx": -0.0009013015947976489, "xy": -0.0018044909810622715, "yy": -0.0020747814880747247,
           "xxx": 4.515342617890365e-05, "xxy": 0.000539358513513715, "xyy": -0.0006320411639799786,
           "yyy": 0.0007493795748075596}  # fmt: skip

# Trend grids: Table 4's, a wide one, and two fine ones (the tests use the same wide and fine grids).
WIDE = ([3.4, 3.2, 3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 2.4, 2.35, 2.3], [2048 * 2**i for i in range(9)])
FINE = (list(np.round(np.arange(3.3, 2.279, -0.01), 4)), sorted({int(2048 * 2 ** (i / 4)) for i in range(33)}))
FINE2 = (list(np.round(np.arange(3.4, 2.259, -0.02), 4)), [int(2048 * 2 ** (i / 2)) for i in range(19)])

PROVENANCE = """Reconstructed, not published: Chen et al. (2025) never released a_H, b_H or E.
Calibrated by `python scripts/calibrate_law.py {args}`: one (ln A_H, b_H) per power-of-two head
configuration up to 64 heads (bilinear in log2 n_h, log2 n_kv in between), E shared. Monotone in both
head counts by construction: at equal N, doubling n_h or n_kv never raises the loss, for every N in
1e5..1e12 non-embedding parameters. Within that, the paper's three-step recipe (settings below)
reproduces {cells}/40 cells of its Table 4 ({far} more than one doubling off; {trend} trend violations on
Table 4's, a wide and two fine grids), and the Llama-3 head configuration (d/64, 8) reaches the paper's
reference losses (2.615, 2.448, 2.362) at the 1B, 3B and 8B scale: predicted {refs}.
stories260K-sized conversion (226,560 params, 8 q / 4 KV heads -> 8/2, 8/1, 4/4, 4/2): delta {small} nats.
One law for every command (`law optimize`, `law table`, `plan`, `verify`); it replaces the two earlier
reconstructions (the unconstrained one still loads as `--law shipped:table4`; docs/law.md).
The paper's own fits covered 3M-1.2B parameters at 8K context (SlimPajama, GPT-2 tokenizer);
anything beyond is extrapolation. Fit your own with `gqa-convert law fit RUNS -o law.yaml`.
"""


# --------------------------------------------------------------------------- the law of a vector
# θ = [E, ln A_H for the 28 lattice points, b_H for the 28 lattice points]
def law_of(theta: np.ndarray) -> LossLaw:
    grid = {h: (float(theta[1 + i]), float(theta[1 + K + i])) for i, h in enumerate(LATTICE)}
    return LossLaw(E=float(theta[0]), form="grid", reference_params=N0, grid=grid, settings=SETTINGS.to_dict())


def start_vector() -> np.ndarray:
    old = LossLaw(E=START_E, form="smooth", log_A=START_LOG_A, b=START_B)
    ab = [old.coefficients(*h) for h in LATTICE]
    return np.r_[START_E, [b * np.log(a / N0) for a, b in ab], [b for _, b in ab]]


def monotone_constraints() -> tuple[np.ndarray, np.ndarray]:
    """(G, g): monotone iff G·θ + g ≤ 0. ln(L − E) = ln A_H + b_H·ln(N0/N) is linear in ln N, so a
    doubling that lowers it at N = 1e5 and at N = 1e12 lowers it everywhere in between."""
    rows, g = [], []
    for h, k in LATTICE:
        for bigger in ((2 * h, k), (h, 2 * k)):
            if bigger not in INDEX:
                continue
            i, j = INDEX[(h, k)], INDEX[bigger]
            for n in MONOTONE_PARAMS:
                s = np.log(N0 / n)
                r = np.zeros(1 + 2 * K)
                r[1 + j], r[1 + i], r[1 + K + j], r[1 + K + i] = 1.0, -1.0, s, -s
                rows.append(r)
                g.append(MONOTONE_MARGIN)
    return np.array(rows), np.array(g)


def second_differences() -> np.ndarray:
    rows = []
    for h, k in LATTICE:
        for dh, dk in ((2, 1), (1, 2), (2, 2)):
            t = [(h, k), (h * dh, k * dk), (h * dh * dh, k * dk * dk)]
            if all(c in INDEX for c in t):
                r = np.zeros(K)
                for c, w in zip(t, (1, -2, 1)):
                    r[INDEX[c]] = w
                rows.append(r)
    return np.array(rows)


G, GMARGIN = monotone_constraints()
D2 = second_differences()
LOWER = np.r_[E_MIN, [-50.0] * K, [B_MIN] * K]
UPPER = np.r_[E_MAX, [50.0] * K, [B_MAX] * K]
STEP = np.r_[0.005, [0.004] * K, [0.001] * K]  # typical ES step per coordinate


def monotone(theta: np.ndarray) -> bool:
    return bool(
        np.all(G @ theta + GMARGIN <= 1e-10) and np.all(theta >= LOWER - 1e-12) and np.all(theta <= UPPER + 1e-12)
    )


def project(theta: np.ndarray) -> np.ndarray:
    """The nearest θ (in units of STEP) meeting the monotonicity constraints and bounds (SLSQP)."""
    if monotone(theta):
        return theta
    z0 = theta / STEP
    cons = {"type": "ineq", "fun": lambda z: -(G @ (z * STEP) + GMARGIN), "jac": lambda z: -(G * STEP)}
    res = minimize(lambda z: 0.5 * np.sum((z - z0) ** 2), z0, jac=lambda z: z - z0, constraints=[cons],
                   bounds=list(zip(LOWER / STEP, UPPER / STEP)), method="SLSQP",
                   options={"maxiter": 200, "ftol": 1e-12})  # fmt: skip
    return res.x * STEP


# --------------------------------------------------------------------------- reference losses
def reference_points() -> list[tuple[str, float, int, float]]:
    """(name, N, n_h, target) for both readings of the 1B / 3B / 8B scale."""
    out = []
    for key, ((L, d, ff), ref) in LLAMA3_REFERENCE.items():
        real = ModelShape(L, d, d // 64, 8, 64, ff, 50304).non_embedding_params
        out += [(f"{key} 12Ld²", 12.0 * L * d * d, d // 64, ref), (f"{key} real", float(real), d // 64, ref)]
    return out


REFS = reference_points()


def reference_errors(law: LossLaw) -> np.ndarray:
    return np.array([law.loss(n, h, 8) - ref for _, n, h, ref in REFS])


def fit_references(theta: np.ndarray) -> np.ndarray:
    """Re-solve E and constant shifts of all ln A_H and all b_H (monotonicity unchanged) so that the
    reference losses hold as well as they can."""

    def shifted(p):
        t = theta.copy()
        t[0] = p[0]
        t[1 : 1 + K] += p[1]
        t[1 + K :] += p[2]
        return t

    def residual(p):
        try:
            return reference_errors(law_of(shifted(p)))
        except Exception:
            return np.full(len(REFS), 10.0)

    return shifted(least_squares(residual, [theta[0], 0.0, 0.0], bounds=([E_MIN, -2, -0.2], [E_MAX, 2, 0.2])).x)


def feasible(theta: np.ndarray) -> np.ndarray:
    theta = fit_references(project(theta))
    return theta if monotone(theta) else project(theta)


# --------------------------------------------------------------------------- Table 4
INDEX32 = {h: i for i, h in enumerate(candidates(32))}
TARGET = np.array([[INDEX32[c] for c in TABLE4[loss]] for loss in TABLE4_LOSSES])


def choices(law: LossLaw, losses, contexts) -> list[list[tuple[int, int]]]:
    return recipe_grid(law, losses, contexts, SETTINGS, heads=candidates(32)).choices()


def trend_violations(grid) -> int:
    bad = 0
    for i in range(len(grid)):
        for j in range(len(grid[i])):
            if j and (grid[i][j][0] > grid[i][j - 1][0] or grid[i][j][1] > grid[i][j - 1][1]):
                bad += 1
            if i and (grid[i][j][0] < grid[i - 1][j][0] or grid[i][j][1] < grid[i - 1][j][1]):
                bad += 1
    return bad


def far_cells(grid) -> int:
    """Cells more than one doubling of n_h or n_kv away from the paper's."""
    return sum(abs(np.log2(h / TABLE4[loss][j][0])) > 1 or abs(np.log2(k / TABLE4[loss][j][1])) > 1
               for i, loss in enumerate(TABLE4_LOSSES) for j, (h, k) in enumerate(grid[i]))  # fmt: skip


def softplus_objective(theta: np.ndarray, margin: float = 0.002, tau: float = 0.002) -> float:
    if not E_MIN <= theta[0] <= E_MAX or np.any(theta[1 + K :] < 0.02):
        return 1e3
    try:
        law = law_of(theta)
        grid = recipe_grid(law, TABLE4_LOSSES, TABLE4_CONTEXTS, SETTINGS, heads=candidates(32))
        logz = np.log(grid.z)
        target = np.take_along_axis(logz, TARGET[..., None], axis=-1)
        sp = tau * np.logaddexp(0.0, (target - logz + margin) / tau)
        sp[np.arange(8)[:, None], np.arange(5)[None, :], TARGET] = 0.0
        ref = 1e4 * np.sum(np.maximum(0.0, np.abs(reference_errors(law)) - 0.015) ** 2)
        smooth = SMOOTH_U * np.sum((D2 @ theta[1 : 1 + K]) ** 2) + SMOOTH_B * np.sum((D2 @ theta[1 + K :]) ** 2)
        out = float(sp.sum() + ref + smooth)
        return out if np.isfinite(out) else 1e3
    except Exception:
        return 1e3


def evaluate(law: LossLaw) -> dict:
    grid = choices(law, TABLE4_LOSSES, TABLE4_CONTEXTS)
    return {
        "cells": table4_match(grid),
        "far": far_cells(grid),
        "hard_trends": trend_violations(grid) + trend_violations(choices(law, *WIDE)),
        "fine_trends": trend_violations(choices(law, *FINE)) + trend_violations(choices(law, *FINE2)),
        "refs": reference_errors(law),
    }


def score(theta: np.ndarray) -> tuple:
    """Monotone and reference losses within REF_TOL first; then exact cells − 10·(far cells + trend
    violations on Table 4's and the wide grid) − trend violations on the fine grids."""
    try:
        if not monotone(theta):
            return (False, -1e9)
        law = law_of(theta)
        worst = float(np.abs(reference_errors(law)).max())
        if worst > REF_TOL:
            return (False, -worst)
        e = evaluate(law)
        main = e["cells"] - 10 * (e["far"] + e["hard_trends"]) - e["fine_trends"]
        return (True, main, e["cells"], -e["far"], -e["hard_trends"], -e["fine_trends"], -worst)
    except Exception:
        return (False, -1e9)


# --------------------------------------------------------------------------- stages
def smooth_stage(theta: np.ndarray, maxiter: int, log=print) -> np.ndarray:
    cons = [{"type": "ineq", "fun": lambda t: -(G @ t + GMARGIN), "jac": lambda t: -G}]
    res = minimize(softplus_objective, project(theta), method="SLSQP", constraints=cons,
                   bounds=list(zip(LOWER, UPPER)), options={"maxiter": maxiter, "ftol": 1e-11})  # fmt: skip
    e = evaluate(law_of(res.x))
    log(
        f"  stage 2: objective {res.fun:.4f}, {e['cells']}/40 cells, {e['far']} far, trends {e['hard_trends']}+{e['fine_trends']}"
    )
    return res.x


def polish(theta: np.ndarray, iterations: int, seed: int, log=print) -> np.ndarray:
    rng = np.random.default_rng(seed)
    theta = feasible(theta)
    best, sigma = score(theta), 1.0
    log(f"  stage 3 start: {best[:6]}")
    for it in range(iterations):
        step = rng.normal(0, 1, theta.shape) * STEP * sigma * (rng.random(theta.shape) < 0.2)
        trial = feasible(theta + step)
        s = score(trial)
        if s >= best:
            if s[:2] > best[:2]:
                log(f"  polish {it}: cells {s[2]}/40, far {-s[3]}, trend violations {-s[4]} + {-s[5]}")
            theta, best, sigma = trial, s, sigma * 1.5
        else:
            sigma *= 0.95
        sigma = min(max(sigma, 0.05), 5.0)
    return theta


def small_model_deltas(law: LossLaw) -> list[float]:
    shape = ModelShape(5, 64, 8, 4, 8, 172, 512, tied=True)  # stories260K
    n = shape.non_embedding_params
    return [
        law.delta(n, (8, 4), shape.with_heads(q, k).non_embedding_params, (q, k))
        for q, k in ((8, 2), (8, 1), (4, 4), (4, 2))
    ]


def calibrate(iterations: int, seed: int, maxiter: int, log=print) -> LossLaw:
    log("stage 1: the previous shipped law at the 28 lattice points")
    theta = start_vector()
    log("stage 2: SLSQP, softplus margins on Table 4 + reference losses + smoothness, monotone by constraint")
    theta = smooth_stage(theta, maxiter, log)
    log("stage 3: polish (evolution strategy on exact cells and trends, monotone by projection)")
    theta = polish(theta, iterations, seed, log)
    return law_of(theta)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", help="write the law file here")
    p.add_argument("--iterations", type=int, default=3000, help="polish iterations (stage 3)")
    p.add_argument("--maxiter", type=int, default=500, help="SLSQP iterations (stage 2)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.time()
    law = calibrate(args.iterations, args.seed, args.maxiter)
    e = evaluate(law)
    refs = e["refs"]
    print(f"best: {e['cells']}/40 cells, {e['far']} far, trend violations {e['hard_trends']} + {e['fine_trends']}, "
          f"reference errors {np.round(refs, 4).tolist()}, small-model deltas {np.round(small_model_deltas(law), 4).tolist()}, "
          f"{time.time() - t0:.0f}s")  # fmt: skip
    law.fitted = {"params_min": 3e6, "params_max": 1.2e9, "max_heads": 32, "context": 8192}
    pred = {k: law.loss(n, h, 8) for k, n, h, _ in REFS}
    law.provenance = PROVENANCE.format(
        args=f"--seed {args.seed} --iterations {args.iterations} --maxiter {args.maxiter}",
        cells=e["cells"],
        far=e["far"],
        trend=e["hard_trends"] + e["fine_trends"],
        refs=", ".join(f"{k} {v:.3f}" for k, v in pred.items()),
        small=" / ".join(f"{d:+.3f}" for d in small_model_deltas(law)),
    )
    if args.output:
        save_law(law, args.output)
        print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
