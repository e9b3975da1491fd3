"""`gqa-convert plan`: which (query heads, KV heads) to convert to.

For a source model and an expected context T, every reachable head configuration H' = (n_h', n_kv')
gets:
- the predicted loss change, the law read as a DELTA (law.md): L(N'; H') − L(N; H), N and N' the
  non-embedding parameters of the source and of the converted model (same L, d, d_h, FFN);
- KV-cache bytes at T, the exact forward FLOPs per token at T (and the attention part of them,
  4·T·L·d_h·n_h'), Z (as the law file's settings define it) and the savings against the source.

Reachable: n_kv' a divisor of the source's n_kv (contiguous pooling, `regroup.valid_kv_counts`) and
n_h' a multiple of n_kv' that divides the source's n_h (every new KV group keeps the same number
of query heads, `regroup.valid_q_counts`). Families whose class cannot hold a head_dim decoupled
from hidden_size / n_h (architectures.yaml `q_heads_refused`: Falcon, StableLM, OLMo-2) get the
KV-only options, with the reason in the plan; so does `kv_only=True`.

Cost is Z, the law's own objective (eq. 5: λ·M^α + (1−λ)·C^β at T, units as the law file's
settings say). Recommendation rule: the lowest Z whose predicted loss increase is at least 0 and at
most `max_loss_increase`; the source itself (delta 0) is always allowed, so there is always a
recommendation; ties go to more KV heads, then more query heads. Two recommendations are made:
- `recommended`: among the KV-only options (query heads kept, the paper's conversion setting) —
  what `--kv-heads auto` converts to (`recommend_kv_heads`);
- `recommended_joint`: among all listed options, both counts — what `--kv-heads auto --q-heads
  auto` converts to (`recommend_heads`); the same as `recommended` for a KV-only plan.
A negative delta cannot come from the shipped law (monotone in both head counts, docs/law.md); from
a law file it means that law is outside its reliable range there: such options are flagged, never
recommended. Query-head reductions are marked outside the paper (it trains every configuration
from scratch; neither paper has a conversion recipe for them, docs/query-heads.md has measurements).
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .errors import ConfigError, LawError
from .fileio import write_bytes_atomic
from .law.cost import cost_report, dtype_bytes, forward_flops
from .law.loss import CONVERSION_LAW, LossLaw, load_law
from .law.recipe import settings_of
from .law.shapes import ModelShape, load_model_config, shape_from_config
from .regroup import valid_kv_counts, valid_q_counts
from .units import parse_count

DEFAULT_MAX_LOSS_INCREASE = 0.05  # nats: half a row of Table 4 (its rows are 0.1 apart)
COMMON_PARALLEL_DEGREE = 8  # tensor-parallel degree of one 8-GPU node
COST = "z"  # what "least cost" minimises: the law's Z at T (eq. 5, the law file's unit settings)


@dataclass
class PlanOption:
    q_heads: int
    kv_heads: int
    outside_paper: bool  # query heads reduced: no conversion recipe in either paper
    is_source: bool
    non_embedding_params: int
    predicted_loss_delta: Optional[float]  # L(N';H') − L(N;H); None when the law lacks H'
    kv_cache_bytes: int  # 2·L·n_kv'·d_h·T · bytes per value
    flops_per_token: int  # exact forward FLOPs of one token with T keys (law/cost.py forward_flops)
    attention_flops_per_token: int  # its attention part, QKᵀ and AV: 4·T·L·d_h·n_h'
    z: float
    kv_cache_saved_pct: float
    flops_saved_pct: float
    z_saved_pct: float
    max_parallel_degree: int  # the largest serving TP degree that splits the KV heads (beyond it they are replicated)
    notes: list[str] = field(default_factory=list)

    @property
    def heads(self) -> tuple[int, int]:
        return (self.q_heads, self.kv_heads)

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
    recommended: PlanOption  # KV-only: query heads kept (`--kv-heads auto`)
    warnings: list[str]
    law_provenance: str
    recommended_joint: Optional[PlanOption] = None  # both counts (`--kv-heads auto --q-heads auto`)
    kv_only: bool = False  # only KV-head options listed (asked for, or the family refuses)
    q_heads_refused: str = ""  # why this family's query-head count cannot change ("" = it can)

    def __post_init__(self) -> None:
        if self.recommended_joint is None:
            self.recommended_joint = self.recommended

    @property
    def joint(self) -> PlanOption:
        """The recommendation over both counts (`recommended_joint`, never None after init)."""
        assert self.recommended_joint is not None
        return self.recommended_joint

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "shape": self.shape.to_dict(),
            "context": self.context,
            "dtype": self.dtype,
            "max_loss_increase": self.max_loss_increase,
            "cost": "Z at the context (eq. 5, units as the law file's settings say)",
            "rule": "lowest Z among KV-only options (query heads kept) with 0 <= predicted_loss_delta <= "
            "max_loss_increase (the source always allowed); ties to more KV heads",
            "rule_joint": "lowest Z among all listed (q_heads, kv_heads) with 0 <= predicted_loss_delta <= "
            "max_loss_increase (the source always allowed); ties to more KV heads, then more query heads",
            "kv_only": self.kv_only,
            "q_heads_refused": self.q_heads_refused,
            "options": [o.to_dict() for o in self.options],
            "recommended": self.recommended.to_dict(),
            "recommended_joint": self.joint.to_dict(),
            "warnings": self.warnings,
            "law": self.law_provenance,
        }


def q_heads_refusal(config: Union[Mapping[str, Any], ModelShape]) -> str:
    """Why the converter cannot change this model's query-head count ("" = it can, or the family is
    not one the converter knows: planning then covers both counts)."""
    from .architectures import families

    model_type = config.model_type if isinstance(config, ModelShape) else str(config.get("model_type") or "")
    if not isinstance(config, ModelShape) and isinstance(config.get("text_config"), Mapping):
        model_type = str(config["text_config"].get("model_type") or model_type)
    for fam in families().values():
        if model_type and model_type in fam.model_types:
            return fam.q_heads_refused
    return ""


def head_options(n_heads: int, n_kv: int, kv_only: bool = False) -> list[tuple[int, int]]:
    """Every reachable (n_h', n_kv'): KV-only first (n_h kept, KV heads falling), then the query-head
    reductions by falling n_h', each with its KV counts falling."""
    kvs = sorted(valid_kv_counts(n_heads, n_kv), reverse=True)
    out = [(n_heads, k) for k in kvs]
    if not kv_only:
        qs = sorted({q for k in kvs for q in valid_q_counts(n_heads, k) if q < n_heads}, reverse=True)
        out += [(q, k) for q in qs for k in kvs if q in valid_q_counts(n_heads, k)]
    return out


def _tp_replication(kv_heads: int, kv_cache_bytes: int) -> str:
    """What serving with tensor parallelism beyond the KV-head count costs (vLLM and TGI replicate
    the KV heads there: every GPU keeps at least one head's cache). Ulysses sequence parallelism in
    uptraining replicates them too and is not limited by them (docs/parallel.md)."""
    tp = -(-COMMON_PARALLEL_DEGREE // kv_heads) * kv_heads  # vLLM wants TP a multiple of the KV heads
    per_head = kv_cache_bytes / kv_heads
    return (
        f"{kv_heads} KV head{'s' if kv_heads > 1 else ''}: serving with tensor parallelism over more than {kv_heads} "
        f"GPU(s) replicates them (vLLM, TGI): at TP {tp} every GPU holds one head's cache "
        f"({per_head / 1e9:.2g} GB per sequence at this context), {tp // kv_heads}x the model's KV cache in all"
    )


def _pct(new: float, old: float) -> float:
    return 100.0 * (1 - new / old) if old else 0.0


def _allowed(o: PlanOption, max_loss_increase: float) -> bool:
    return o.is_source or (o.predicted_loss_delta is not None and 0 <= o.predicted_loss_delta <= max_loss_increase)


def _best(options: list[PlanOption], max_loss_increase: float) -> PlanOption:
    allowed = [o for o in options if _allowed(o, max_loss_increase)]
    return min(allowed, key=lambda o: (o.z, -o.kv_heads, -o.q_heads))


def _shape_and_refusal(config: Union[Mapping[str, Any], ModelShape, str, Path]) -> tuple[ModelShape, str]:
    shape = config if isinstance(config, ModelShape) else shape_from_config(load_model_config(config))
    return shape, q_heads_refusal(shape)


def plan_conversion(
    config: Union[Mapping[str, Any], ModelShape, str, Path],
    context: Union[int, str],
    *,
    max_loss_increase: float = DEFAULT_MAX_LOSS_INCREASE,
    dtype: str = "bf16",
    law: Optional[LossLaw] = None,
    kv_only: bool = False,
    query_options: Optional[bool] = None,
    source: str = "",
) -> Plan:
    """Every feasible (query heads, KV heads) of a conversion of `config` (a config dict, a
    `ModelShape`, a folder, alias or hub id), with costs at `context` and the law's delta, and the
    two recommendations (module docstring). `kv_only=True` lists the KV-head options only
    (`query_options=False` is its older spelling)."""
    shape, refused = _shape_and_refusal(config)
    if isinstance(context, str):
        context = parse_count(context, what="context", binary_k=True)
    if isinstance(context, bool) or not isinstance(context, int) or context <= 0:
        raise ConfigError(f"context must be a positive number of tokens, not {context!r}")
    if not (
        isinstance(max_loss_increase, (int, float)) and math.isfinite(max_loss_increase) and max_loss_increase >= 0
    ):
        raise ConfigError(f"max-loss-increase must be a number ≥ 0 (nats), not {max_loss_increase!r}")
    dtype_bytes(dtype)
    if query_options is False:
        kv_only = True
    law = law or load_law(CONVERSION_LAW)
    cost = settings_of(law).cost
    src_cost = cost_report(shape, context, dtype, cost)
    try:
        src_loss = law.loss(shape.non_embedding_params, shape.n_heads, shape.n_kv)
    except LawError:
        src_loss = None
    options = []
    for q, k in head_options(shape.n_heads, shape.n_kv, kv_only=kv_only or bool(refused)):
        new = shape.with_heads(q, k)
        rep = cost_report(new, context, dtype, cost)
        outside = q != shape.n_heads
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
            notes.append(_tp_replication(k, rep.kv_cache_bytes))
        if outside:
            notes.append(
                "query heads reduced: outside the paper (no conversion recipe; measured losses in docs/query-heads.md)"
            )
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
                attention_flops_per_token=forward_flops(new, context).attention_flops,
                z=rep.z,
                kv_cache_saved_pct=_pct(rep.kv_cache_bytes, src_cost.kv_cache_bytes),
                flops_saved_pct=_pct(rep.flops_per_token, src_cost.flops_per_token),
                z_saved_pct=_pct(rep.z, src_cost.z),
                max_parallel_degree=k,
                notes=notes,
            )
        )
    rec = _best([o for o in options if not o.outside_paper], max_loss_increase)
    joint = _best(options, max_loss_increase)
    warnings = []
    if refused and not kv_only:
        warnings.append(f"KV-head options only: this family cannot change its query-head count ({refused})")
    for which, r in (("recommended", rec), ("recommended (both counts)", joint)):
        if r.kv_heads < min(COMMON_PARALLEL_DEGREE, shape.n_kv) and (r is rec or joint.kv_heads != rec.kv_heads):
            warnings.append(f"{which}: " + _tp_replication(r.kv_heads, r.kv_cache_bytes))
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
        recommended_joint=joint,
        kv_only=kv_only or bool(refused),
        q_heads_refused=refused,
    )


def recommend_kv_heads(
    source_dir_or_config: Union[str, Path, Mapping[str, Any], ModelShape],
    context: Union[int, str],
    *,
    max_loss_increase: float = DEFAULT_MAX_LOSS_INCREASE,
    dtype: str = "bf16",
    law: Optional[LossLaw] = None,
) -> int:
    """The KV-head count `--kv-heads auto` converts to, query heads kept (module docstring)."""
    plan = plan_conversion(
        source_dir_or_config, context, max_loss_increase=max_loss_increase, dtype=dtype, law=law, kv_only=True
    )
    return plan.recommended.kv_heads


def recommend_heads(
    source_dir_or_config: Union[str, Path, Mapping[str, Any], ModelShape],
    context: Union[int, str],
    *,
    max_loss_increase: float = DEFAULT_MAX_LOSS_INCREASE,
    dtype: str = "bf16",
    law: Optional[LossLaw] = None,
) -> tuple[int, int]:
    """(query heads, KV heads) that `--kv-heads auto --q-heads auto` converts to: the lowest Z over
    both counts within `max_loss_increase` (module docstring). For a family that cannot change its
    query-head count, (its query heads, `recommend_kv_heads`)."""
    plan = plan_conversion(source_dir_or_config, context, max_loss_increase=max_loss_increase, dtype=dtype, law=law)
    return plan.joint.heads


# --------------------------------------------------------------------------- output
def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**28 else f"{n / 2**20:,.2f} MiB"


def _heads(o: PlanOption) -> str:
    return f"{o.q_heads} query head{'s' if o.q_heads > 1 else ''}, {o.kv_heads} KV head{'s' if o.kv_heads > 1 else ''}"


def _mark(plan: Plan, o: PlanOption) -> str:
    if o is plan.joint:
        return "*" if o is plan.recommended else "**"
    return "+" if o is plan.recommended else ("†" if o.outside_paper else " ")


def format_plan(plan: Plan) -> str:
    s = plan.shape
    lines = [
        f"Plan for {plan.source or 'model'}: L={s.n_layers} d={s.hidden} heads={s.n_heads} kv={s.n_kv} "
        f"d_h={s.head_dim} N_non-emb={s.non_embedding_params:,} | context {plan.context:,} tokens, {plan.dtype}",
        f"{'':3}{'q':>4} {'kv':>4} {'Δloss':>8} {'KV cache':>12} {'saved':>7} "
        f"{'FLOPs/token':>16} {'attention':>16} {'saved':>7} {'Z':>10} {'saved':>7}  notes",
    ]
    for o in plan.options:
        delta = "n/a" if o.predicted_loss_delta is None else f"{o.predicted_loss_delta:+.4f}"
        note = "; ".join((["source"] if o.is_source else []) + o.notes[: 1 if o.outside_paper else 2])
        lines.append(
            f"{_mark(plan, o):3}{o.q_heads:>4} {o.kv_heads:>4} {delta:>8} {_gib(o.kv_cache_bytes):>12} "
            f"{o.kv_cache_saved_pct:>6.1f}% {o.flops_per_token:>16,} {o.attention_flops_per_token:>16,} "
            f"{o.flops_saved_pct:>6.1f}% {o.z:>10.4g} {o.z_saved_pct:>6.1f}%  {note}"
        )
    j, r = plan.joint, plan.recommended
    rule = f"lowest Z with predicted loss increase ≤ {plan.max_loss_increase:g}"
    if plan.kv_only:
        why = f": {plan.q_heads_refused}" if plan.q_heads_refused else ""
        lines.append(f"Recommended: {_heads(r)} ({rule}; KV-only options{why}).")
    else:
        lines.append(
            f"Recommended: {_heads(j)} ({rule}, both counts; "
            f"--kv-heads auto --q-heads auto) [{'*' if j is r else '**'}]"
        )
        lines.append(
            f"Recommended with the query heads kept: {_heads(r)} "
            f"(--kv-heads auto) [{'*' if j is r else '+'}]; † = query-head reduction, outside the paper."
        )
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def write_plot(plan: Plan, path: Union[str, Path]) -> Path:
    """PNG: predicted loss delta against KV-cache bytes and against FLOPs per token; KV-only options
    and query-head reductions marked apart, the source and both recommendations circled."""
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
            (False, "o", "KV heads reduced (query heads kept)"),
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
        marks = [(plan.joint, "r", 220, "recommended (both counts)" if not plan.kv_only else "recommended")]
        if plan.recommended is not plan.joint:
            marks.append((plan.recommended, "g", 320, "recommended, query heads kept"))
        for r, colour, size, name in marks:
            if r.predicted_loss_delta is not None:
                ax.scatter(
                    [getattr(r, attr)],
                    [r.predicted_loss_delta],
                    s=size,
                    facecolors="none",
                    edgecolors=colour,
                    linewidths=2,
                    label=name,
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
