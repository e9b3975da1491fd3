"""Fit the loss law to a user's own scaling runs: a_H, b_H per head configuration, E shared.

A runs file is CSV (header `N,n_h,n_kv,loss`; also `n_params`, `n_heads`, `num_key_value_heads`)
or JSON (a list of such objects, or {"runs": [...]}). N is the NON-embedding parameter count.
The fit is nonlinear least squares on the loss (scipy.optimize.least_squares) in the
well-conditioned parametrisation (ln A_H, b_H, E) with A_H = (a_H/N0)^b_H, N0 the geometric mean
of the runs' N; standard errors come from the Jacobian at the optimum (s²·(JᵀJ)⁻¹) and are
carried to a_H by the delta method.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from scipy.optimize import least_squares

from ..errors import ConfigError
from .loss import LossLaw, load_law

COLUMNS = {
    "n_params": ("N", "n", "n_params", "params", "non_embedding_params"),
    "n_heads": ("n_h", "n_heads", "num_attention_heads", "heads", "q_heads"),
    "n_kv": ("n_kv", "kv_heads", "num_key_value_heads"),
    "loss": ("loss", "L", "val_loss", "eval_loss"),
}


@dataclass(frozen=True)
class Run:
    n_params: float
    n_heads: int
    n_kv: int
    loss: float


def _pick(row: dict, key: str, where: str):
    lower = {str(k).strip().lower(): v for k, v in row.items()}
    for name in COLUMNS[key]:
        if name.lower() in lower and lower[name.lower()] not in (None, ""):
            return lower[name.lower()]
    raise ConfigError(
        f"{where}: missing column {COLUMNS[key][0]!r} (or {', '.join(COLUMNS[key][1:])}); runs need N, n_h, n_kv, loss"
    )


def parse_runs(rows: Sequence[dict], where: str = "runs") -> list[Run]:
    """Validated runs from row dicts."""
    runs = []
    for i, row in enumerate(rows, 1):
        at = f"{where}, run {i}"
        if not isinstance(row, dict):
            raise ConfigError(f"{at}: expected an object with N, n_h, n_kv, loss, got {type(row).__name__}")
        try:
            n = float(_pick(row, "n_params", at))
            h = float(_pick(row, "n_heads", at))
            k = float(_pick(row, "n_kv", at))
            loss = float(_pick(row, "loss", at))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{at}: not a number ({err}); N, n_h, n_kv and loss must be numbers") from None
        if not (math.isfinite(n) and n > 0):
            raise ConfigError(f"{at}: N must be a positive parameter count, not {n}")
        if h != int(h) or k != int(k) or h < 1 or k < 1 or int(h) % int(k):
            raise ConfigError(f"{at}: n_h={h:g}, n_kv={k:g} must be positive integers with n_kv dividing n_h")
        if not (math.isfinite(loss) and loss > 0):
            raise ConfigError(f"{at}: loss must be a positive number, not {loss}")
        runs.append(Run(n, int(h), int(k), loss))
    if not runs:
        raise ConfigError(f"{where}: no runs; give rows of N, n_h, n_kv, loss")
    return runs


def read_runs(path: Union[str, Path]) -> list[Run]:
    """Runs from a CSV or JSON file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read runs file {p}: {err.strerror}") from None
    if p.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"runs file {p} is not valid JSON ({err.msg} at line {err.lineno})") from None
        if isinstance(data, dict):
            data = data.get("runs")
        if not isinstance(data, list):
            raise ConfigError(f'runs file {p}: expected a JSON list of runs or {{"runs": [...]}}')
        return parse_runs(data, where=str(p))
    rows = list(csv.DictReader(text.splitlines()))
    return parse_runs(rows, where=str(p))


@dataclass
class FitResult:
    law: LossLaw
    r2: float
    residual_std: float
    n_runs: int


def fit_law(runs: Sequence[Run], template: Optional[LossLaw] = None) -> FitResult:
    """Least-squares fit of L(N; H) = (a_H/N)^b_H + E, E shared. Needs ≥ 2 runs per H and
    more runs than parameters (2 per H + 1)."""
    runs = list(runs)
    heads = sorted({(r.n_heads, r.n_kv) for r in runs})
    n_par = 2 * len(heads) + 1
    thin = [h for h in heads if sum((r.n_heads, r.n_kv) == h for r in runs) < 2]
    if thin:
        raise ConfigError(f"runs: head configuration(s) {thin} have fewer than 2 runs; each H needs ≥ 2 model sizes")
    if len(runs) <= n_par:
        raise ConfigError(
            f"runs: {len(runs)} runs cannot fit {n_par} parameters (2 per head configuration + E); add runs"
        )
    N = np.array([r.n_params for r in runs])
    y = np.array([r.loss for r in runs])
    hidx = np.array([heads.index((r.n_heads, r.n_kv)) for r in runs])
    n0 = float(np.exp(np.mean(np.log(N))))
    logn = np.log(N / n0)

    def predict(theta):
        E, lnA, b = theta[0], theta[1::2][hidx], theta[2::2][hidx]
        return E + np.exp(lnA - b * logn)

    # Start: scan E below the smallest loss, log-linear regression per H.
    best = None
    for E in np.linspace(0.0, y.min() - 1e-3, 60):
        theta = [E]
        for j in range(len(heads)):
            m = hidx == j
            slope, icpt = np.polyfit(logn[m], np.log(np.maximum(y[m] - E, 1e-9)), 1)
            theta += [icpt, max(-slope, 1e-3)]
        rss = float(np.sum((predict(np.array(theta)) - y) ** 2))
        if best is None or rss < best[0]:
            best = (rss, np.array(theta))
    assert best is not None  # the scan above has 60 starts
    lo = np.r_[0.0, np.tile([-np.inf, 1e-4], len(heads))]
    hi = np.r_[y.min() - 1e-6, np.tile([np.inf, 5.0], len(heads))]
    x0 = np.clip(best[1], lo + 1e-9, hi - 1e-9)
    res = least_squares(
        lambda t: predict(t) - y,
        x0,
        bounds=(lo, hi),
        method="trf",
        x_scale="jac",
        xtol=1e-14,
        ftol=1e-14,
        gtol=1e-14,
        max_nfev=20000,
    )
    theta, J = res.x, res.jac
    rss = float(np.sum(res.fun**2))
    dof = len(runs) - n_par
    s2 = rss / dof
    try:
        cov = np.linalg.inv(J.T @ J) * s2
    except np.linalg.LinAlgError:
        raise ConfigError(
            "runs: the fit is degenerate (sizes too close together?); spread model sizes over a wider range"
        ) from None
    se = np.sqrt(np.clip(np.diag(cov), 0, None))
    table: dict[tuple[int, int], tuple[float, float]] = {}
    stderr: dict[str, Any] = {"E": float(se[0])}
    for j, (h, k) in enumerate(heads):
        lnA, b = theta[1 + 2 * j], theta[2 + 2 * j]
        a = n0 * math.exp(lnA / b)
        # ln a = ln N0 + lnA/b: gradient (1/b, −lnA/b²) wrt (lnA, b)
        g = np.array([1 / b, -lnA / b**2])
        c = cov[np.ix_([1 + 2 * j, 2 + 2 * j], [1 + 2 * j, 2 + 2 * j])]
        table[(h, k)] = (a, float(b))
        stderr[f"{h},{k}"] = {"a": float(a * math.sqrt(max(g @ c @ g, 0.0))), "b": float(se[2 + 2 * j])}
    tss = float(np.sum((y - y.mean()) ** 2))
    r2 = 1 - rss / tss if tss > 0 else 1.0
    template = template or load_law()
    law = LossLaw(
        E=float(theta[0]),
        form="per_head",
        heads=table,
        stderr=stderr,
        fitted={"params_min": float(N.min()), "params_max": float(N.max()), "max_heads": int(max(h for h, _ in heads))},
        settings=template.settings,
        fit={"r2": float(r2), "residual_std": float(math.sqrt(s2)), "runs": len(runs), "parameters": n_par},
        provenance=f"fitted by gqa-convert law fit on {len(runs)} runs ({len(heads)} head configurations); "
        f"L(N;H) = (a_H/N)^b_H + E with shared E, scipy least_squares; standard errors from the Jacobian",
    )
    return FitResult(law, float(r2), float(math.sqrt(s2)), len(runs))
