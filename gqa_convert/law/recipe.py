"""The paper's three-step recipe: candidates → shape search → minimum Z.

For a target loss L* and an expected context T, every candidate H = (n_h, n_kv) gets the
smallest model that reaches L* (N*(H), eq. 8), a shape (L, d) with the aspect ratio d/L of the
nearest predefined configurations (Tables 7 and 9) found by binary search on L, and its cost Z at
T. The H with the lowest Z wins; the shape is rounded to a buildable model at the end.

Everything here is vectorised over (targets, contexts, candidates) so a whole Table-4 grid is one
call (the calibration script evaluates thousands of them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Optional, Sequence

import numpy as np

from ..errors import ConfigError, LawError
from .cost import CostSettings, infer_flops, infer_memory, z_of
from .loss import DESIGN_LAW, LossLaw, candidates, load_law
from .shapes import ModelShape

# Predefined shapes (layers, width): Table 9 (scaling-fit models, < 1.2B) and Table 7 (≥ 1.2B).
TABLE9 = [(4, 256), (6, 512), (12, 768), (12, 1024), (16, 1024), (24, 1280), (24, 1536), (36, 1536)]
TABLE7 = [(36, 1536), (36, 2048), (48, 2560), (54, 3072), (64, 4096), (72, 6144), (80, 8192)]
# Anchors of the aspect ratio, two readings of the same shapes: (N, d/L) with N = 12·L·d² (the
# paper's parameter count of a multi-head model: "formula") or N = the size label the tables print
# ("label": 3M, 19M, …, 1.2B, …, 64B; 1.2B is 1.02e9 by the formula, 4B is 3.77e9).
ANCHORS = sorted({(12 * L * d * d, d / L) for L, d in TABLE9 + TABLE7})
TABLE_LABELS = [3e6, 19e6, 85e6, 150e6, 200e6, 470e6, 680e6, 1.2e9, 1.8e9, 4e9, 6e9, 13e9, 33e9, 64e9]
LABEL_ANCHORS = [(n, d / L) for n, (L, d) in zip(TABLE_LABELS, TABLE9 + TABLE7[1:])]

# Table 4 of the paper: optimal (n_h, n_kv) by target loss and context.
TABLE4_LOSSES = [3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 2.4, 2.35]
TABLE4_CONTEXTS = [8192, 16384, 32768, 65536, 131072]
TABLE4 = {
    3.0: [(32, 1), (16, 1), (8, 1), (4, 1), (4, 1)],
    2.9: [(32, 1), (16, 1), (16, 1), (8, 1), (4, 1)],
    2.8: [(32, 2), (16, 1), (16, 1), (8, 1), (8, 1)],
    2.7: [(32, 4), (16, 2), (16, 1), (16, 1), (8, 1)],
    2.6: [(32, 8), (16, 4), (16, 2), (16, 2), (8, 1)],
    2.5: [(32, 16), (16, 8), (16, 4), (16, 2), (16, 2)],
    2.4: [(32, 32), (32, 32), (32, 8), (32, 8), (32, 4)],
    2.35: [(32, 32), (32, 32), (32, 32), (32, 16), (32, 8)],
}
# Llama-3 reference: H = (d/d_h, 8) reaches these losses at these shapes in the paper's setting
# (layers, width, FFN width of Llama-3.2-1B, -3B and Llama-3.1-8B; d_h = 64 as in the paper).
LLAMA3_REFERENCE = {"1B": ((16, 2048, 8192), 2.615), "3B": ((28, 3072, 8192), 2.448), "8B": ((32, 4096, 14336), 2.362)}


@dataclass(frozen=True)
class RecipeSettings:
    """Choices the paper leaves open, made explicit (defaults: the calibrated ones)."""

    head_dim: int = 64
    max_heads: int = 32  # candidates are powers of two up to this
    # aspect ratio d/L: "linear"/"log" = the paper's interpolation between the two nearest
    # predefined shapes in N or log N; "power" = one power law d/L = c·N^g fitted through all of them
    interpolation: Literal["linear", "log", "power"] = "linear"
    # N of the anchors: "formula" = 12·L·d², "label" = the size the paper's tables print
    anchors: Literal["formula", "label"] = "formula"
    vocab: int = 50304  # embeddings counted in the costs when cost.embeddings (tied, GPT-2 tokenizer)
    cost: CostSettings = field(default_factory=CostSettings)

    def __post_init__(self) -> None:
        if self.interpolation not in ("linear", "log", "power"):
            raise ConfigError(f"interpolation must be 'linear', 'log' or 'power', not {self.interpolation!r}")
        if self.anchors not in ("formula", "label"):
            raise ConfigError(f"anchors must be 'formula' or 'label', not {self.anchors!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "RecipeSettings":
        d = dict(d or {})
        try:
            cost = CostSettings(**(d.pop("cost", None) or {}))
            return cls(cost=cost, **d)
        except TypeError as err:
            raise ConfigError(
                f"law settings: {err}; allowed keys are head_dim, max_heads, interpolation, anchors, vocab, cost"
            ) from None


def settings_of(law: LossLaw) -> RecipeSettings:
    return RecipeSettings.from_dict(law.settings)


# --------------------------------------------------------------------------- shape search
def aspect_ratio(n_params, interpolation: str = "linear", anchors: str = "formula"):
    """d/L interpolated between the two nearest predefined shapes (clamped outside them), or a
    power law through all of them (`power`: smooth in N, so the shape does not wiggle)."""
    nodes = LABEL_ANCHORS if anchors == "label" else ANCHORS
    ns, rs = np.array([a[0] for a in nodes]), np.array([a[1] for a in nodes])
    n = np.asarray(n_params, dtype=float)
    if interpolation == "log":
        return np.interp(np.log(n), np.log(ns), rs)
    if interpolation == "power":
        g, c = np.polyfit(np.log(ns), np.log(rs), 1)
        return np.exp(c + g * np.log(n))
    return np.interp(n, ns, rs)


def params_of(n_layers, hidden, n_heads, n_kv, head_dim: int = 64):
    """Non-embedding parameters of the paper's architecture: attention 2·d·d_h·(n_h+n_kv), SwiGLU 8·d²."""
    return n_layers * (2 * hidden * head_dim * (n_heads + n_kv) + 8 * hidden**2)


def solve_layers(n_params, n_heads, n_kv, ratio, head_dim: int = 64, iters: int = 200):
    """Binary search for the (real) number of layers L with params_of(L, ratio·L, H) = N."""
    n = np.asarray(n_params, dtype=float)
    shape = np.broadcast(n, n_heads, n_kv, ratio).shape
    lo, hi = np.full(shape, 1e-3), np.full(shape, 1e4)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        big = params_of(mid, ratio * mid, n_heads, n_kv, head_dim) > n
        hi, lo = np.where(big, mid, hi), np.where(big, lo, mid)
        if np.all(hi - lo <= 1e-9 * hi):
            break
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------- the recipe, vectorised
@dataclass
class Grid:
    """Recipe quantities for every (target, context, candidate)."""

    losses: np.ndarray  # [nL]
    contexts: np.ndarray  # [nT]
    heads: np.ndarray  # [K, 2] (n_h, n_kv)
    n_star: np.ndarray  # [nL, K] non-embedding parameters
    layers: np.ndarray  # [nL, K] real-valued
    width: np.ndarray  # [nL, K]
    z: np.ndarray  # [nL, nT, K]

    @property
    def best(self) -> np.ndarray:
        """[nL, nT] index of the lowest-Z candidate."""
        return np.argmin(self.z, axis=-1)

    def choices(self) -> list[list[tuple[int, int]]]:
        return [[(int(self.heads[k][0]), int(self.heads[k][1])) for k in row] for row in self.best]


def recipe_grid(
    law: LossLaw,
    losses: Sequence[float],
    contexts: Sequence[int],
    settings: Optional[RecipeSettings] = None,
    heads: Optional[Sequence[tuple[int, int]]] = None,
) -> Grid:
    """Steps 1–3 for every target loss and context at once."""
    s = settings or settings_of(law)
    H = np.array([h for h in (heads or candidates(s.max_heads)) if law.has(*h)], dtype=float)
    if not len(H):
        raise LawError(f"the law has none of the candidate head configurations (powers of two ≤ {s.max_heads})")
    t = np.asarray(losses, dtype=float)[:, None]
    T = np.asarray(contexts, dtype=float)
    if np.any(T <= 0):
        raise ConfigError(f"contexts must be positive token counts, not {list(contexts)}")
    nh, nkv = H[:, 0][None, :], H[:, 1][None, :]
    n_star = law.n_star(t, nh, nkv)  # [nL, K]
    ratio = aspect_ratio(n_star, s.interpolation, s.anchors)
    layers = solve_layers(n_star, nh, nkv, ratio, s.head_dim)
    width = ratio * layers
    n_cost = n_star + (s.vocab * width if s.cost.embeddings else 0.0)
    z = z_of(
        n_cost[:, None, :], layers[:, None, :], s.head_dim, nh[:, None, :], nkv[:, None, :], T[None, :, None], s.cost
    )
    return Grid(np.asarray(losses, float), T, H, n_star, layers, width, z)


def table(
    law: Optional[LossLaw] = None,
    losses: Sequence[float] = TABLE4_LOSSES,
    contexts: Sequence[int] = TABLE4_CONTEXTS,
    settings: Optional[RecipeSettings] = None,
) -> list[list[tuple[int, int]]]:
    """The optimal (n_h, n_kv) for each target loss (rows) and context (columns), like Table 4."""
    law = law or load_law(DESIGN_LAW)
    return recipe_grid(law, losses, contexts, settings).choices()


def table4_match(grid: list[list[tuple[int, int]]]) -> int:
    """How many cells of a grid over TABLE4_LOSSES × TABLE4_CONTEXTS equal the paper's Table 4."""
    return sum(
        grid[i][j] == TABLE4[loss][j] for i, loss in enumerate(TABLE4_LOSSES) for j in range(len(TABLE4_CONTEXTS))
    )


# --------------------------------------------------------------------------- one optimum, explained
def round_shape(layers: float, width: float, n_heads: int, n_kv: int, s: RecipeSettings) -> ModelShape:
    """Nearest buildable model: whole layers, width and SwiGLU width (8d/3) multiples of d_h."""
    L = max(1, int(round(layers)))
    d = max(s.head_dim, int(round(width / s.head_dim)) * s.head_dim)
    d_ff = max(s.head_dim, int(round(8 * d / 3 / s.head_dim)) * s.head_dim)
    return ModelShape(L, d, int(n_heads), int(n_kv), s.head_dim, d_ff, s.vocab, tied=True)


@dataclass
class Design:
    """One model the recipe designs: H, N*, real-valued shape and its paper costs at T."""

    n_heads: float
    n_kv: int
    n_params: float  # N*(H), non-embedding
    n_layers: float
    hidden: float
    memory_values: float  # M_infer(T), eq. 4
    flops_per_token: float  # C_infer(T), eq. 3
    z: float
    kv_cache_values: float

    def to_dict(self) -> dict:
        return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in asdict(self).items()}


def _design(law: LossLaw, s: RecipeSettings, target: float, context: int, n_heads: float, n_kv: int) -> Design:
    n = float(law.n_star(target, n_heads, n_kv))
    ratio = float(aspect_ratio(n, s.interpolation, s.anchors))
    L = float(solve_layers(n, n_heads, n_kv, ratio, s.head_dim))
    d = ratio * L
    n_cost = n + (s.vocab * d if s.cost.embeddings else 0.0)
    return Design(
        n_heads=float(n_heads),
        n_kv=int(n_kv),
        n_params=n,
        n_layers=L,
        hidden=d,
        memory_values=infer_memory(n_cost, L, s.head_dim, n_kv, context),
        flops_per_token=infer_flops(n_cost, L, s.head_dim, n_heads, context),
        z=float(z_of(n_cost, L, s.head_dim, n_heads, n_kv, context, s.cost)),
        kv_cache_values=2 * context * L * s.head_dim * n_kv,
    )


def llama3_design(law: LossLaw, target: float, context: int, settings: Optional[RecipeSettings] = None) -> Design:
    """The Llama-3 head configuration (d/d_h query heads, 8 KV heads) reaching `target`.

    n_h depends on the width, which depends on N*(n_h): a fixed point, found by iteration
    (n_h kept real-valued; needs a smooth or grid law).
    """
    s = settings or settings_of(law)
    if not law.continuous:
        raise LawError("the Llama-3 comparison needs a smooth or grid law (n_h = d/d_h is not a fitted configuration)")
    n_heads = 32.0
    for _ in range(100):
        des = _design(law, s, target, context, n_heads, 8)
        new = max(8.0, des.hidden / s.head_dim)
        if abs(new - n_heads) < 1e-6:
            break
        n_heads = new
    return des


@dataclass
class Optimum:
    target_loss: float
    context: int
    best: Design
    shape: ModelShape  # rounded, buildable
    shape_loss: float  # law's loss of the rounded shape
    candidates: list[Design]
    llama3: Optional[Design]
    memory_saved_pct: Optional[float]  # vs llama3, M_infer at T
    flops_saved_pct: Optional[float]  # vs llama3, C_infer at T
    notes: list[str]

    def to_dict(self) -> dict:
        return {
            "target_loss": self.target_loss,
            "context": self.context,
            "n_heads": int(self.best.n_heads),
            "n_kv": self.best.n_kv,
            "best": self.best.to_dict(),
            "shape": self.shape.to_dict(),
            "shape_non_embedding_params": self.shape.non_embedding_params,
            "shape_predicted_loss": self.shape_loss,
            "llama3": self.llama3.to_dict() if self.llama3 else None,
            "memory_saved_pct": self.memory_saved_pct,
            "flops_saved_pct": self.flops_saved_pct,
            "candidates": [c.to_dict() for c in self.candidates],
            "notes": self.notes,
        }


def optimize(
    target_loss: float, context: int, law: Optional[LossLaw] = None, settings: Optional[RecipeSettings] = None
) -> Optimum:
    """The cost-optimal (N, n_h, n_kv, layers, width) for `target_loss` at expected context `context`."""
    law = law or load_law(DESIGN_LAW)
    s = settings or settings_of(law)
    if isinstance(context, bool) or not isinstance(context, (int, np.integer)) or context <= 0:
        raise ConfigError(f"context must be a positive number of tokens, not {context!r}")
    if law.continuous:
        law.n_star(target_loss, 1, 1)  # early, clear error when L* ≤ E
    cands = [_design(law, s, target_loss, context, h, k) for h, k in candidates(s.max_heads) if law.has(h, k)]
    if not cands:
        raise LawError(f"the law has none of the candidate head configurations (powers of two ≤ {s.max_heads})")
    best = min(cands, key=lambda c: c.z)
    shape = round_shape(best.n_layers, best.hidden, int(best.n_heads), best.n_kv, s)
    shape_loss = float(law.loss(shape.non_embedding_params, shape.n_heads, shape.n_kv))
    llama = llama3_design(law, target_loss, context, s) if law.continuous else None
    mem = flops = None
    if llama:
        mem = 100 * (1 - best.memory_values / llama.memory_values)
        flops = 100 * (1 - best.flops_per_token / llama.flops_per_token)
    notes = law.extrapolation_notes(best.n_params, int(best.n_heads), best.n_kv, context)
    return Optimum(float(target_loss), int(context), best, shape, shape_loss, cands, llama, mem, flops, notes)
