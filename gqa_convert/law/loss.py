"""The loss law of Chen et al. (2025), eq. 7/8, and the law files that carry its coefficients.

    L(N; H) = (a_H / N)^b_H + E          N = non-embedding parameters, H = (n_h, n_kv)
    N*(H)   = a_H / (L* − E)^(1/b_H)     smallest model of config H that reaches loss L*

Two forms of (a_H, b_H):
- `per_head`: one fitted pair per head configuration (what `gqa-convert law fit` produces);
- `smooth`: a_H and b_H as low-order polynomials of x = log2 n_h, y = log2 n_kv (the shipped,
  reconstructed default). Written with A_H = (a_H/N0)^b_H, the reducible loss at N0 parameters:
      ln A_H = Σ p_ij x^i y^j,   b_H = Σ q_ij x^i y^j,   a_H = N0 · A_H^(1/b_H).
A monomial is named by its letters: "1", "x", "y", "xx", "xy", "yyy", ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np
import yaml

from ..errors import ConfigError, LawError
from ..fileio import write_text_atomic

FORMAT = "gqa-convert-law/1"
DEFAULT_LAW = "coefficients.yaml"
# Laws shipped in the package, by the name `--law shipped:NAME` takes. "table4" is the earlier,
# unconstrained reconstruction: 32/40 Table 4 cells but NOT monotone in the heads (docs/law.md).
SHIPPED = {"default": DEFAULT_LAW, "table4": "coefficients_table4.yaml"}
# Which shipped law each use reads when no --law is given. Designing a model from scratch (the
# paper's recipe: `law optimize`, `law table`) uses the calibration that reproduces Table 4;
# predicting what a conversion costs in loss (`plan`, `verify`) needs a law whose loss never falls
# when heads are removed, which the Table 4 calibration violates below ~5e8 parameters.
DESIGN_LAW = "shipped:table4"
CONVERSION_LAW = "shipped:default"


def _monomial(name: str, x, y):
    if name == "1":
        return np.ones_like(np.asarray(x, dtype=float))
    if set(name) - {"x", "y"}:
        raise ConfigError(f"law file: monomial {name!r} must be '1' or letters x/y like 'xy', 'xx'")
    return np.asarray(x, dtype=float) ** name.count("x") * np.asarray(y, dtype=float) ** name.count("y")


def poly(coeffs: dict[str, float], x, y):
    """Σ c·x^i·y^j over the named monomials."""
    return sum(float(c) * _monomial(m, x, y) for m, c in coeffs.items())


@dataclass
class LossLaw:
    """E shared by all head configurations; (a_H, b_H) per configuration or as a smooth form."""

    E: float
    form: str = "smooth"  # "smooth" | "per_head"
    reference_params: float = 1e9  # N0 of the smooth form
    log_A: dict[str, float] = field(default_factory=dict)  # smooth: ln A_H polynomial
    b: dict[str, float] = field(default_factory=dict)  # smooth: b_H polynomial
    heads: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)  # per_head: (a_H, b_H)
    stderr: dict[str, Any] = field(default_factory=dict)  # parameter standard errors of a fit
    fitted: dict[str, Any] = field(default_factory=dict)  # range of the data: params, heads, context
    settings: dict[str, Any] = field(default_factory=dict)  # cost/recipe unit choices (see recipe.py)
    provenance: str = ""
    fit: dict[str, Any] = field(default_factory=dict)  # r2, runs, residual std

    def __post_init__(self) -> None:
        if self.form not in ("smooth", "per_head"):
            raise ConfigError(f"law form must be 'smooth' or 'per_head', not {self.form!r}")
        if self.form == "smooth" and not (self.log_A and self.b):
            raise ConfigError("smooth law needs both log_A and b polynomials")
        if self.form == "per_head" and not self.heads:
            raise ConfigError("per_head law needs at least one head configuration")

    # ------------------------------------------------------------------ coefficients
    def has(self, n_heads: int, n_kv: int) -> bool:
        return self.form == "smooth" or (int(n_heads), int(n_kv)) in self.heads

    def coefficients(self, n_heads, n_kv) -> tuple[Any, Any]:
        """(a_H, b_H); arrays broadcast for the smooth form."""
        if self.form == "per_head":
            hs, ks = np.broadcast_arrays(np.asarray(n_heads), np.asarray(n_kv))
            a, b = np.empty(hs.shape), np.empty(hs.shape)
            for i in np.ndindex(hs.shape):
                key = (int(hs[i]), int(ks[i]))
                if key not in self.heads or key != (hs[i], ks[i]):
                    fitted = ", ".join(f"({h},{k})" for h, k in sorted(self.heads))
                    raise LawError(
                        f"the law has no coefficients for n_h={hs[i]:g}, n_kv={ks[i]:g}; it was fitted for {fitted}"
                    )
                a[i], b[i] = self.heads[key]
            return (float(a), float(b)) if a.ndim == 0 else (a, b)
        x, y = np.log2(np.asarray(n_heads, dtype=float)), np.log2(np.asarray(n_kv, dtype=float))
        b = poly(self.b, x, y)
        if np.any(b <= 0):
            raise LawError(f"law exponent b_H is not positive at n_h={n_heads}, n_kv={n_kv}; outside the law's range")
        a = self.reference_params * np.exp(poly(self.log_A, x, y) / b)
        return (float(a), float(b)) if np.ndim(a) == 0 else (a, b)

    # ------------------------------------------------------------------ eq. 7 / eq. 8
    def loss(self, n_params, n_heads, n_kv):
        """L(N; H): predicted loss of a model with N non-embedding parameters and heads H."""
        n = np.asarray(n_params, dtype=float)
        if np.any(n <= 0):
            raise ConfigError(f"parameter count must be positive, not {n_params!r}")
        a, b = self.coefficients(n_heads, n_kv)
        out = (a / n) ** b + self.E
        return float(out) if np.ndim(out) == 0 else out

    def n_star(self, target_loss, n_heads, n_kv):
        """N*(H): non-embedding parameters needed to reach `target_loss` with heads H."""
        t = np.asarray(target_loss, dtype=float)
        if np.any(~np.isfinite(t)) or np.any(t <= self.E):
            raise LawError(
                f"target loss {target_loss} is not above the law's irreducible loss E={self.E:.4f}; "
                f"choose a loss > {self.E:.4f}"
            )
        a, b = self.coefficients(n_heads, n_kv)
        out = a / (t - self.E) ** (1 / b)
        return float(out) if np.ndim(out) == 0 else out

    def delta(self, n_src: float, heads_src: tuple[int, int], n_new: float, heads_new: tuple[int, int]) -> float:
        """The law read as a change: L(N'; H') − L(N; H) (for a conversion of a trained model)."""
        return self.loss(n_new, *heads_new) - self.loss(n_src, *heads_src)

    def extrapolation_notes(self, n_params: float, n_heads: int, n_kv: int, context: Optional[int] = None) -> list[str]:
        """Where (N, H, T) lies outside the data the law was fitted or calibrated on."""
        notes = []
        lo, hi = self.fitted.get("params_min"), self.fitted.get("params_max")
        if hi and n_params > hi:
            notes.append(f"N={n_params:.3g} is above the largest fitted model ({hi:.3g}): extrapolation")
        if lo and n_params < lo:
            notes.append(f"N={n_params:.3g} is below the smallest fitted model ({lo:.3g}): extrapolation")
        mh = self.fitted.get("max_heads")
        if mh and n_heads > mh:
            notes.append(f"n_h={n_heads} is beyond the fitted head counts (≤{mh}): extrapolation")
        ctx = self.fitted.get("context")
        if context and ctx and context > ctx:
            notes.append(f"fits were made at T={ctx}; at T={context} only the costs change (law.md)")
        return notes

    # ------------------------------------------------------------------ file
    def to_dict(self) -> dict:
        d: dict[str, Any] = {"format": FORMAT, "form": self.form, "E": float(self.E)}
        if self.form == "smooth":
            d.update(
                reference_params=float(self.reference_params),
                log_A={k: float(v) for k, v in self.log_A.items()},
                b={k: float(v) for k, v in self.b.items()},
            )
        else:
            d["heads"] = [
                {
                    "n_heads": h,
                    "n_kv": k,
                    "a": float(a),
                    "b": float(b),
                    **{f"{p}_stderr": self.stderr.get(f"{h},{k}", {}).get(p) for p in ("a", "b")},
                }
                for (h, k), (a, b) in sorted(self.heads.items())
            ]
        if self.stderr.get("E") is not None:
            d["E_stderr"] = float(self.stderr["E"])
        for key in ("fit", "fitted", "settings"):
            if getattr(self, key):
                d[key] = getattr(self, key)
        if self.provenance:
            d["provenance"] = self.provenance
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "law") -> "LossLaw":
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a YAML mapping with E and coefficients")
        if d.get("format", FORMAT) != FORMAT:
            raise ConfigError(f"{where}: format {d.get('format')!r} is not {FORMAT}")
        try:
            E = float(d["E"])
            form = d.get("form", "smooth")
            heads: dict[tuple[int, int], tuple[float, float]] = {}
            stderr: dict[str, Any] = {}
            for row in d.get("heads") or []:
                h, k = int(row["n_heads"]), int(row["n_kv"])
                heads[(h, k)] = (float(row["a"]), float(row["b"]))
                stderr[f"{h},{k}"] = {"a": row.get("a_stderr"), "b": row.get("b_stderr")}
            if d.get("E_stderr") is not None:
                stderr["E"] = float(d["E_stderr"])
            return cls(
                E=E,
                form=form,
                reference_params=float(d.get("reference_params", 1e9)),
                log_A={str(k): float(v) for k, v in (d.get("log_A") or {}).items()},
                b={str(k): float(v) for k, v in (d.get("b") or {}).items()},
                heads=heads,
                stderr=stderr,
                fitted=d.get("fitted") or {},
                settings=d.get("settings") or {},
                provenance=d.get("provenance", ""),
                fit=d.get("fit") or {},
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{where}: malformed law ({err!r}); expected E, form and log_A/b or heads") from None


def load_law(path: Union[str, Path, None] = None) -> LossLaw:
    """A law file (`--law law.yaml`), a shipped law (`shipped:table4`), or the shipped default when
    `path` is None."""
    if path is None or str(path).startswith("shipped:"):
        name = "default" if path is None else str(path)[len("shipped:") :]
        if name not in SHIPPED:
            raise ConfigError(f"no shipped law {name!r}; choose one of " + ", ".join(f"shipped:{k}" for k in SHIPPED))
        text = resources.files("gqa_convert.law").joinpath(SHIPPED[name]).read_text()
        return LossLaw.from_dict(yaml.safe_load(text), where=f"shipped {SHIPPED[name]}")
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as err:
        raise ConfigError(
            f"cannot read law file {p}: {err.strerror}; give a YAML file written by `gqa-convert law fit`"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"law file {p} is not valid YAML ({str(err).splitlines()[0]})") from None
    return LossLaw.from_dict(data, where=f"law file {p}")


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (provenance) as readable `|` blocks."""


_Dumper.add_representer(
    str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None)
)


def save_law(law: LossLaw, path: Union[str, Path]) -> Path:
    """Write atomically: a temp file beside the target, renamed when complete."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(law.to_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    return write_text_atomic(p, text)


def candidates(max_heads: int = 32) -> list[tuple[int, int]]:
    """The paper's candidate set: n_h, n_kv powers of two up to max_heads, n_kv ≤ n_h (21 for 32)."""
    if max_heads < 1 or max_heads & (max_heads - 1):
        raise ConfigError(f"max_heads must be a power of two, not {max_heads}")
    powers = [2**i for i in range(int(math.log2(max_heads)) + 1)]
    return [(h, k) for h in powers for k in powers if k <= h]


def pairs(values: Iterable[tuple[int, int]]) -> np.ndarray:
    return np.asarray(list(values), dtype=float)
