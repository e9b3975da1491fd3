"""`gqa-convert plan`: which KV-head count (and, outside the paper, query-head count) to convert to.

For a source model and an expected context T, every reachable head configuration H' gets:
- the predicted loss change, the law read as a DELTA (law.md): L(N'; H') − L(N; H), N and N' the
  non-embedding parameters of the source and of the converted model (same L, d, d_h, FFN);
- KV-cache bytes at T, exact forward FLOPs per token at T, Z (as the law file's settings define
  it) and the savings against the source.

Recommendation rule: among the paper's options (query heads kept, KV heads a divisor of the
source's), the lowest Z whose predicted loss increase is at least 0 and at most
`max_loss_increase`; the source itself (delta 0) is always allowed, so there is always a
recommendation. The shipped law is monotone in the heads (docs/law.md), so its deltas for fewer heads
are never negative; a negative delta can still come from a law file (a fit, or `shipped:table4`) and
means that law is outside its reliable range there: such options are flagged, never recommended. Query-head reductions
are listed, marked as outside the paper (neither paper has a recipe for them), never recommended.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .errors import ConfigError, LawError
from .fileio import write_bytes_atomic
from .law.cost import cost_report, dtype_bytes
from .law.loss import LossLaw, load_law
from .law.recipe import settings_of
from .law.shapes import ModelShape, load_shape
from .regroup import valid_kv_counts
from .units import parse_count

DEFAULT_MAX_LOSS_INCREASE = 0.05  # nats: half a row of Table 4 (its rows are 0.1 apart)
COMMON_PARALLEL_DEGREE = 8  # tensor-parallel degree of one 8-GPU node


@dataclass
class PlanOption:
    q_heads: int
    kv_heads: int
    outside_paper: bool  # query heads reduced: no recipe in either paper
    is_source: bool
    non_embedding_params: int
    predicted_loss_delta: Optional[float]  # L(N';H') − L(N;H); None when the law lacks H'
    kv_cache_bytes: int
    flops_per_token: int
    z: float
    kv_cache_saved_pct: float
    flops_saved_pct: float
    z_saved_pct: float
    max_parallel_degree: int  # TP and Ulysses SP degree cannot exceed the KV-head count
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Plan:
    source: str
    shape: ModelShape
    context: int
    dtype: str
    max_loss_increase: float
    options: list[PlanOption]
    recommended: PlanOption
    warnings: list[str]
    law_provenance: str

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "shape": self.shape.to_dict(),
            "context": self.context,
            "dtype": self.dtype,
            "max_loss_increase": self.max_loss_increase,
            "rule": "lowest Z among KV-only options (query heads kept) with predicted_loss_delta <= max_loss_increase",
            "options": [o.to_dict() for o in self.options],
            "recommended": self.recommended.to_dict(),
            "warnings": self.warnings,
            "law": self.law_provenance,
        }


def _head_options(n_heads: int, n_kv: int, query_options: bool) -> list[tuple[int, int, bool]]:
    """(q, kv, outside_paper): KV-only regroupings, then query-head reductions (q | n_h, kv | n_kv, kv | q)."""
    out = [(n_heads, k, False) for k in sorted(valid_kv_counts(n_heads, n_kv), reverse=True)]
    if query_options:
        for q in sorted((q for q in range(1, n_heads) if n_heads % q == 0), reverse=True):
            out += [(q, k, True) for k in sorted(valid_kv_counts(n_heads, n_kv), reverse=True) if q % k == 0]
    return out


def _pct(new: float, old: float) -> float:
    return 100.0 * (1 - new / old) if old else 0.0


def plan_conversion(
    config: Union[Mapping[str, Any], ModelShape],
    context: int,
    *,
    max_loss_increase: float = DEFAULT_MAX_LOSS_INCREASE,
    dtype: str = "bf16",
    law: Optional[LossLaw] = None,
    query_options: bool = True,
    source: str = "",
) -> Plan:
    """Every feasible head configuration of a conversion of `config`, with costs and the law's delta."""
    shape = config if isinstance(config, ModelShape) else load_shape(config)
    if isinstance(context, str):
        context = parse_count(context, what="context", binary_k=True)
    if isinstance(context, bool) or not isinstance(context, int) or context <= 0:
        raise ConfigError(f"context must be a positive number of tokens, not {context!r}")
    if not (
        isinstance(max_loss_increase, (int, float)) and math.isfinite(max_loss_increase) and max_loss_increase >= 0
    ):
        raise ConfigError(f"max-loss-increase must be a number ≥ 0 (nats), not {max_loss_increase!r}")
    dtype_bytes(dtype)
    law = law or load_law()
    cost = settings_of(law).cost
    src_cost = cost_report(shape, context, dtype, cost)
    try:
        src_loss = law.loss(shape.non_embedding_params, shape.n_heads, shape.n_kv)
    except LawError:
        src_loss = None
    options = []
    for q, k, outside in _head_options(shape.n_heads, shape.n_kv, query_options):
        new = shape.with_heads(q, k)
        rep = cost_report(new, context, dtype, cost)
        notes = []
        delta = None
        if src_loss is not None and law.has(q, k):
            delta = law.loss(new.non_embedding_params, q, k) - src_loss
            if delta < 0:  # guard: impossible with the shipped (monotone) law, possible with a law file
                notes.append(
                    "the law predicts a LOWER loss with fewer heads here: outside its reliable range "
                    "(this law is not monotone in the heads at this size); not recommended"
                )
        else:
            notes.append("the law has no coefficients for this configuration")
        if k < min(COMMON_PARALLEL_DEGREE, shape.n_kv):
            notes.append(
                f"{k} KV head{'s cap' if k > 1 else ' caps'} tensor-parallel and Ulysses sequence-parallel "
                f"degree at {k}"
            )
        if outside:
            notes.append("query heads reduced: outside the paper (no recipe; expect a larger loss than predicted)")
        options.append(
            PlanOption(
                q_heads=q,
                kv_heads=k,
                outside_paper=outside,
                is_source=(q, k) == (shape.n_heads, shape.n_kv),
                non_embedding_params=new.non_embedding_params,
                predicted_loss_delta=delta,
                kv_cache_bytes=rep.kv_cache_bytes,
                flops_per_token=rep.flops_per_token,
                z=rep.z,
                kv_cache_saved_pct=_pct(rep.kv_cache_bytes, src_cost.kv_cache_bytes),
                flops_saved_pct=_pct(rep.flops_per_token, src_cost.flops_per_token),
                z_saved_pct=_pct(rep.z, src_cost.z),
                max_parallel_degree=k,
                notes=notes,
            )
        )
    allowed = [
        o
        for o in options
        if not o.outside_paper
        and (o.is_source or (o.predicted_loss_delta is not None and 0 <= o.predicted_loss_delta <= max_loss_increase))
    ]
    rec = min(allowed, key=lambda o: (o.z, -o.kv_heads))
    warnings = []
    if rec.kv_heads < min(COMMON_PARALLEL_DEGREE, shape.n_kv):
        warnings.append(
            f"recommended {rec.kv_heads} KV head{'s cap' if rec.kv_heads > 1 else ' caps'} tensor-parallel "
            f"and Ulysses sequence-parallel degree at {rec.kv_heads}"
        )
    n = shape.non_embedding_params
    warnings += law.extrapolation_notes(n, shape.n_heads, shape.n_kv, context)
    if any(o.predicted_loss_delta is not None and o.predicted_loss_delta < 0 for o in options if not o.is_source):
        warnings.append(
            f"the law predicts lower loss with fewer heads at N={n:,}: it is not monotone in the heads here "
            "and unreliable; use the shipped (monotone) law, fit your own (`gqa-convert law fit`) "
            "or treat deltas as unknown"
        )
    if src_loss is None:
        warnings.append(
            f"the law has no coefficients for the source heads ({shape.n_heads},{shape.n_kv}); no loss deltas"
        )
    warnings.append("predicted deltas assume uptraining after conversion (law.md: the law read as a delta)")
    return Plan(
        source,
        shape,
        context,
        dtype,
        float(max_loss_increase),
        options,
        rec,
        warnings,
        law.provenance.splitlines()[0] if law.provenance else "",
    )


def recommend_kv_heads(
    source_dir_or_config: Union[str, Path, Mapping[str, Any], ModelShape],
    context: int,
    *,
    max_loss_increase: float = DEFAULT_MAX_LOSS_INCREASE,
    dtype: str = "bf16",
    law: Optional[LossLaw] = None,
) -> int:
    """The KV-head count `--kv-heads auto` converts to (see the rule in this module's docstring)."""
    shape = load_shape(source_dir_or_config)
    plan = plan_conversion(
        shape, context, max_loss_increase=max_loss_increase, dtype=dtype, law=law, query_options=False
    )
    return plan.recommended.kv_heads


# --------------------------------------------------------------------------- output
def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**28 else f"{n / 2**20:,.2f} MiB"


def format_plan(plan: Plan) -> str:
    s = plan.shape
    lines = [
        f"Plan for {plan.source or 'model'}: L={s.n_layers} d={s.hidden} heads={s.n_heads} kv={s.n_kv} "
        f"d_h={s.head_dim} N_non-emb={s.non_embedding_params:,} | context {plan.context:,} tokens, {plan.dtype}",
        f"{'':2}{'q':>4} {'kv':>4} {'Δloss':>8} {'KV cache':>12} {'saved':>7} "
        f"{'FLOPs/token':>14} {'saved':>7} {'Z':>10} {'saved':>7}  notes",
    ]
    for o in plan.options:
        mark = "*" if o is plan.recommended else ("†" if o.outside_paper else " ")
        delta = "n/a" if o.predicted_loss_delta is None else f"{o.predicted_loss_delta:+.4f}"
        note = "; ".join((["source"] if o.is_source else []) + o.notes[: 1 if o.outside_paper else 2])
        lines.append(
            f"{mark:2}{o.q_heads:>4} {o.kv_heads:>4} {delta:>8} {_gib(o.kv_cache_bytes):>12} "
            f"{o.kv_cache_saved_pct:>6.1f}% {o.flops_per_token:>14,} {o.flops_saved_pct:>6.1f}% "
            f"{o.z:>10.4g} {o.z_saved_pct:>6.1f}%  {note}"
        )
    r = plan.recommended
    lines.append(
        f"Recommended: {r.q_heads} query heads, {r.kv_heads} KV heads (lowest Z with predicted loss increase ≤ "
        f"{plan.max_loss_increase:g}); † = query-head reduction, outside the paper."
    )
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def write_plot(plan: Plan, path: Union[str, Path]) -> Path:
    """PNG: predicted loss delta against KV-cache bytes and against FLOPs per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    opts = [o for o in plan.options if o.predicted_loss_delta is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, attr, label in (
        (axes[0], "kv_cache_bytes", f"KV-cache bytes at T={plan.context:,} ({plan.dtype})"),
        (axes[1], "flops_per_token", f"forward FLOPs per token at T={plan.context:,}"),
    ):
        for outside, marker, name in (
            (False, "o", "KV heads reduced"),
            (True, "x", "query heads reduced (outside paper)"),
        ):
            sel = [o for o in opts if o.outside_paper == outside]
            if sel:
                ax.scatter(
                    [getattr(o, attr) for o in sel], [o.predicted_loss_delta for o in sel], marker=marker, label=name
                )
                for o in sel:
                    ax.annotate(
                        f"{o.q_heads},{o.kv_heads}",
                        (getattr(o, attr), o.predicted_loss_delta),
                        fontsize=7,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
        src = next(o for o in plan.options if o.is_source)
        ax.scatter([getattr(src, attr)], [0.0], marker="*", s=200, c="k", label="source", zorder=3)
        r = plan.recommended
        if r.predicted_loss_delta is not None:
            ax.scatter(
                [getattr(r, attr)],
                [r.predicted_loss_delta],
                s=220,
                facecolors="none",
                edgecolors="r",
                linewidths=2,
                label="recommended",
                zorder=4,
            )
        ax.axhline(plan.max_loss_increase, color="grey", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("predicted loss change (nats)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{plan.source or 'model'}: conversion options (law read as a delta)")
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    write_bytes_atomic(p, buf.getvalue())
    return p
