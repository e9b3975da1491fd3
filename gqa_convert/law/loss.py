"""The loss law of Chen et al. (2025), eq. 7/8, and the law files that carry its coefficients.

    L(N; H) = (a_H / N)^b_H + E          N = non-embedding parameters, H = (n_h, n_kv)
    N*(H)   = a_H / (L* − E)^(1/b_H)     smallest model of config H that reaches loss L*

Three forms of (a_H, b_H):
- `per_head`: one fitted pair per head configuration (what `gqa-convert law fit` produces);
- `grid`: one pair (ln A_H, b_H) per power-of-two configuration 1 ≤ n_kv ≤ n_h ≤ max (the shipped
  default), interpolated bilinearly in (log2 n_h, log2 n_kv) for the counts in between (12, 24,
  48 heads, ...): the paper fits (a_H, b_H) per configuration, and a piecewise-bilinear surface
  keeps the lattice's ordering — if removing heads never lowers the loss at the lattice points,
  it never does in between (each interpolated ln(L − E) is a convex combination of corner values
  that are ordered along both axes). n_kv above n_h reads as n_kv = n_h (a KV head no query head
  reads adds nothing); counts above the lattice read as the largest (flat: extrapolation);
- `smooth`: a_H and b_H as low-order polynomials of x = (log2 n_h − c)/s, y = (log2 n_kv − c)/s
  (the shipped, reconstructed default; c = `variables.center`, s = `variables.scale`, 0 and 1
  unless the file says otherwise). Written with A_H = (a_H/N0)^b_H, the reducible loss at N0
  parameters:
      ln A_H = Σ p_ij x^i y^j,   b_H = g(Σ q_ij x^i y^j),   a_H = N0 · A_H^(1/b_H),
  g the identity (`b_link: identity`) or lo + (hi − lo)·σ(·), σ the logistic function
  (`b_link: logistic`, `b_range: [lo, hi]`), which keeps every exponent inside (lo, hi).
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
# Laws shipped in the package, by the name `--law shipped:NAME` takes. "default" is THE shipped law:
# monotone in both head counts and calibrated to Table 4 and the Llama-3 reference losses at once
# (docs/law.md), used by every command. "table4" is a retired, earlier reconstruction (32/40 Table 4
# cells but NOT monotone in the heads: fewer heads predicted better below ~5e8 parameters); it stays
# loadable by name only so that `--law shipped:table4` in existing scripts and recipes keeps working.
SHIPPED = {"default": DEFAULT_LAW, "table4": "coefficients_table4.yaml"}
RETIRED = {"table4"}
# Which shipped law each use reads when no --law is given: the same one for designing a model from
# scratch (the paper's recipe: `law optimize`, `law table`) and for predicting what a conversion
# costs in loss (`plan`, `verify`). Both names are kept for the callers that import them.
DESIGN_LAW = "shipped:default"
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
    form: str = "smooth"  # "smooth" | "per_head" | "grid"
    reference_params: float = 1e9  # N0 of the smooth form
    log_A: dict[str, float] = field(default_factory=dict)  # smooth: ln A_H polynomial
    b: dict[str, float] = field(default_factory=dict)  # smooth: b_H polynomial (before the link)
    b_link: str = "identity"  # smooth: "identity" | "logistic" (b_H = lo + (hi − lo)·σ(poly))
    b_range: tuple[float, float] = (0.0, 1.0)  # smooth, logistic link: (lo, hi)
    variables: tuple[float, float] = (0.0, 1.0)  # smooth: (center, scale) of x and y
    heads: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)  # per_head: (a_H, b_H)
    grid: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)  # grid: (ln A_H, b_H)
    _tables: Any = field(default=None, init=False, repr=False, compare=False)  # grid, as [log2 n_h, log2 n_kv] arrays
    stderr: dict[str, Any] = field(default_factory=dict)  # parameter standard errors of a fit
    fitted: dict[str, Any] = field(default_factory=dict)  # range of the data: params, heads, context
    settings: dict[str, Any] = field(default_factory=dict)  # cost/recipe unit choices (see recipe.py)
    provenance: str = ""
    fit: dict[str, Any] = field(default_factory=dict)  # r2, runs, residual std

    def __post_init__(self) -> None:
        if self.form not in ("smooth", "per_head", "grid"):
            raise ConfigError(f"law form must be 'smooth', 'per_head' or 'grid', not {self.form!r}")
        if self.form == "smooth" and not (self.log_A and self.b):
            raise ConfigError("smooth law needs both log_A and b polynomials")
        if self.form == "per_head" and not self.heads:
            raise ConfigError("per_head law needs at least one head configuration")
        if self.b_link not in ("identity", "logistic"):
            raise ConfigError(f"law b_link must be 'identity' or 'logistic', not {self.b_link!r}")
        lo, hi = self.b_range
        if self.b_link == "logistic" and not 0 <= lo < hi:
            raise ConfigError(f"law b_range must be [lo, hi] with 0 <= lo < hi, not {list(self.b_range)}")
        if not self.variables[1] > 0:
            raise ConfigError(f"law variables.scale must be positive, not {self.variables[1]!r}")
        if self.form == "grid":
            self._check_grid()

    def _check_grid(self) -> None:
        top = max((h for h, _ in self.grid), default=0)
        if top < 1 or top & (top - 1):
            raise ConfigError("grid law: the largest n_heads must be a power of two (the lattice is 1, 2, 4, ...)")
        want = set(candidates(top))
        if set(self.grid) != want:
            missing = ", ".join(f"({h},{k})" for h, k in sorted(want - set(self.grid)))
            extra = ", ".join(f"({h},{k})" for h, k in sorted(set(self.grid) - want))
            raise ConfigError(
                f"grid law: needs every power-of-two (n_heads, n_kv), n_kv <= n_heads <= {top}"
                + (f"; missing {missing}" if missing else "")
                + (f"; not on the lattice {extra}" if extra else "")
            )
        if any(not b > 0 for _, b in self.grid.values()):
            raise ConfigError("grid law: every exponent b must be positive")
        size = int(math.log2(top)) + 1
        u_tab, b_tab = np.empty((size, size)), np.empty((size, size))
        for (h, k), (u, b) in self.grid.items():
            u_tab[int(math.log2(h)), int(math.log2(k))] = u
            b_tab[int(math.log2(h)), int(math.log2(k))] = b
        for i in range(size):  # n_kv > n_h reads as n_kv = n_h
            u_tab[i, i + 1 :], b_tab[i, i + 1 :] = u_tab[i, i], b_tab[i, i]
        self._tables = (u_tab, b_tab)

    @property
    def continuous(self) -> bool:
        """Whether the law answers for any head counts (smooth, grid), not only fitted ones."""
        return self.form in ("smooth", "grid")

    @property
    def max_heads(self) -> Optional[int]:
        """The largest n_h a grid law has points for (above: read as that many); None otherwise."""
        return max(h for h, _ in self.grid) if self.form == "grid" else None

    def _grid_coefficients(self, n_heads, n_kv) -> tuple[Any, Any]:
        """Bilinear interpolation of (ln A_H, b_H) in (log2 n_h, log2 n_kv) on the lattice."""
        u_tab, b_tab = self._tables
        top = u_tab.shape[0] - 1
        x = np.clip(np.log2(np.asarray(n_heads, dtype=float)), 0, top)
        y = np.clip(np.log2(np.asarray(n_kv, dtype=float)), 0, top)
        y = np.minimum(y, x)
        last = max(top - 1, 0)
        x0, y0 = np.minimum(np.floor(x), last).astype(int), np.minimum(np.floor(y), last).astype(int)
        x1, y1 = np.minimum(x0 + 1, top), np.minimum(y0 + 1, top)
        tx, ty = x - x0, y - y0

        def at(tab):
            return (
                (1 - tx) * (1 - ty) * tab[x0, y0]
                + tx * (1 - ty) * tab[x1, y0]
                + (1 - tx) * ty * tab[x0, y1]
                + tx * ty * tab[x1, y1]
            )

        u, b = at(u_tab), at(b_tab)
        return (float(u), float(b)) if np.ndim(u) == 0 else (u, b)

    # ------------------------------------------------------------------ coefficients
    def variables_of(self, n_heads, n_kv) -> tuple[Any, Any]:
        """(x, y) of the smooth form: (log2 n_h − center)/scale, (log2 n_kv − center)/scale."""
        c, s = self.variables
        x = (np.log2(np.asarray(n_heads, dtype=float)) - c) / s
        y = (np.log2(np.asarray(n_kv, dtype=float)) - c) / s
        return x, y

    def has(self, n_heads: int, n_kv: int) -> bool:
        return self.continuous or (int(n_heads), int(n_kv)) in self.heads

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
        if self.form == "grid":
            log_A, b = self._grid_coefficients(n_heads, n_kv)
        else:
            x, y = self.variables_of(n_heads, n_kv)
            log_A, b = poly(self.log_A, x, y), poly(self.b, x, y)
            if self.b_link == "logistic":
                lo, hi = self.b_range
                b = lo + (hi - lo) / (1 + np.exp(-b))
        if np.any(b <= 0):
            raise LawError(f"law exponent b_H is not positive at n_h={n_heads}, n_kv={n_kv}; outside the law's range")
        a = self.reference_params * np.exp(log_A / b)
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
        top = self.max_heads
        if top and n_heads > top:
            notes.append(f"n_h={n_heads} is above the law's lattice (≤{top}): read as {top} query heads")
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
            if self.b_link != "identity":
                d.update(b_link=self.b_link, b_range=[float(v) for v in self.b_range])
            if tuple(self.variables) != (0.0, 1.0):
                d["variables"] = {"center": float(self.variables[0]), "scale": float(self.variables[1])}
        elif self.form == "grid":
            d["reference_params"] = float(self.reference_params)
            d["grid"] = [
                {"n_heads": h, "n_kv": k, "log_A": float(u), "b": float(b)}
                for (h, k), (u, b) in sorted(self.grid.items())
            ]
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
            grid = {
                (int(r["n_heads"]), int(r["n_kv"])): (float(r["log_A"]), float(r["b"])) for r in d.get("grid") or []
            }
            lo, hi = d.get("b_range") or (0.0, 1.0)
            var = d.get("variables") or {}
            reference_params = float(d.get("reference_params", 1e9))
            log_A = {str(k): float(v) for k, v in (d.get("log_A") or {}).items()}
            b = {str(k): float(v) for k, v in (d.get("b") or {}).items()}
            b_range = (float(lo), float(hi))
            variables = (float(var.get("center", 0.0)), float(var.get("scale", 1.0)))
            # NaN / inf coefficients (YAML's .nan, .inf) would reach int() in the optimizer as an
            # internal error, or print NaN losses with exit 0.
            pairs = [*heads.values(), *grid.values(), b_range, variables]
            numbers = [E, reference_params, *log_A.values(), *b.values(), *(x for pair in pairs for x in pair)]
            if not all(math.isfinite(x) for x in numbers) or reference_params <= 0:
                raise ConfigError(
                    f"{where}: E, reference_params and every coefficient must be finite numbers "
                    "(reference_params > 0); re-fit it with `gqa-convert law fit`"
                )
            return cls(
                E=E,
                form=form,
                reference_params=reference_params,
                log_A=log_A,
                b=b,
                b_link=str(d.get("b_link", "identity")),
                b_range=b_range,
                variables=variables,
                heads=heads,
                grid=grid,
                stderr=stderr,
                fitted=d.get("fitted") or {},
                settings=d.get("settings") or {},
                provenance=d.get("provenance", ""),
                fit=d.get("fit") or {},
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(
                f"{where}: malformed law ({repr(err)[:120]}); expected E, form and log_A/b, heads or grid"
            ) from None


def load_law(path: Union[str, Path, None] = None) -> LossLaw:
    """A law file (`--law law.yaml`), a shipped law (`shipped:default`; the retired `shipped:table4`
    still loads), or the shipped default when `path` is None."""
    if path is None or str(path).startswith("shipped:"):
        name = "default" if path is None else str(path)[len("shipped:") :]
        if name not in SHIPPED:
            raise ConfigError(
                f"no shipped law {name!r}; choose one of "
                + ", ".join(f"shipped:{k}" + (" (retired)" if k in RETIRED else "") for k in SHIPPED)
            )
        text = resources.files("gqa_convert.law").joinpath(SHIPPED[name]).read_text()
        return LossLaw.from_dict(yaml.safe_load(text), where=f"shipped {SHIPPED[name]}")
    p = Path(path)
    try:
        if p.is_file() and p.stat().st_size > 16 << 20:  # a real law file is a few KB
            raise ConfigError(f"law file {p} is {p.stat().st_size >> 20} MB, not a law (at most 16 MB)")
        data = yaml.safe_load(p.read_text())
    except UnicodeDecodeError:
        raise ConfigError(
            f"law file {p} is not UTF-8 text; give a YAML file written by `gqa-convert law fit`"
        ) from None
    except RecursionError:
        raise ConfigError(f"law file {p} is nested too deeply") from None
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
