"""`gqa-convert law optimize | table | fit | eval`: the cost-optimal GQA law from the command line.

The law's modules (numpy, scipy) are imported when an action runs, not for `--help`.
"""

from __future__ import annotations

import argparse
import json
import math

from ..errors import ConfigError
from ..units import parse_count


def _loss_value(text: str, what: str = "--loss") -> float:
    try:
        v = float(text)
    except ValueError:
        raise ConfigError(f"{what} must be a number like 2.6, not {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{what} must be a positive loss in nats, not {text!r}")
    return v


def _split(values: list[str]) -> list[str]:
    return [v for item in values for v in str(item).replace(",", " ").split()]


def _ctx_label(t: int) -> str:
    return f"{t // 1024}K" if t % 1024 == 0 else str(t)


def _law(args, which: str):
    """--law, else the shipped law for this action: "design" (Table 4's) or "conversion" (monotone)."""
    from ..law.loss import CONVERSION_LAW, DESIGN_LAW, load_law

    return load_law(getattr(args, "law", None) or (DESIGN_LAW if which == "design" else CONVERSION_LAW))


def _optimize(args) -> int:
    from ..law.recipe import optimize

    law = _law(args, "design")
    target = _loss_value(args.loss)
    context = parse_count(args.context, what="--context", binary_k=True)
    opt = optimize(target, context, law)
    if args.json:
        print(json.dumps(opt.to_dict(), indent=2))
        return 0
    b, s = opt.best, opt.shape
    print(f"Target loss {target:g} at expected context {context:,} tokens")
    print(f"Cost-optimal heads: n_h={int(b.n_heads)}, n_kv={b.n_kv}")
    print(
        f"  N* = {b.n_params:,.0f} non-embedding parameters; shape L={b.n_layers:.1f}, d={b.hidden:.0f} (real-valued)"
    )
    print(
        f"  buildable: L={s.n_layers}, d={s.hidden}, d_ff={s.d_ff}, d_h={s.head_dim} -> N={s.non_embedding_params:,}, "
        f"predicted loss {opt.shape_loss:.4f}"
    )
    print(
        f"  M_infer = {b.memory_values:,.0f} values (KV cache {b.kv_cache_values:,.0f}); "
        f"C_infer = {b.flops_per_token:,.0f} FLOPs/token; Z = {b.z:.6g}"
    )
    if opt.llama3:
        l3 = opt.llama3
        print(
            f"Llama-3 heads at the same loss: n_h=d/d_h={l3.n_heads:.1f}, n_kv=8, N* = {l3.n_params:,.0f}, "
            f"L={l3.n_layers:.1f}, d={l3.hidden:.0f}"
        )
        print(
            f"  M_infer = {l3.memory_values:,.0f} values; C_infer = {l3.flops_per_token:,.0f} FLOPs/token; Z = {l3.z:.6g}"
        )
        print(f"Saved against Llama-3 heads: memory {opt.memory_saved_pct:.1f}%, FLOPs {opt.flops_saved_pct:.1f}%")
    print("Candidates by Z (lowest first):")
    for c in sorted(opt.candidates, key=lambda c: c.z)[: args.top]:
        print(f"  ({int(c.n_heads):>2},{c.n_kv:>2})  N*={c.n_params:>16,.0f}  L={c.n_layers:6.1f}  Z={c.z:.6g}")
    for note in opt.notes:
        print(f"note: {note}")
    return 0


def _table(args) -> int:
    from ..law.recipe import TABLE4, TABLE4_CONTEXTS, TABLE4_LOSSES, table, table4_match

    law = _law(args, "design")
    losses = [_loss_value(v, "--losses") for v in _split(args.losses)] if args.losses else TABLE4_LOSSES
    contexts = (
        [parse_count(v, what="--contexts", binary_k=True) for v in _split(args.contexts)]
        if args.contexts
        else TABLE4_CONTEXTS
    )
    grid = table(law, losses, contexts)
    paper = losses == TABLE4_LOSSES and contexts == TABLE4_CONTEXTS
    if args.json:
        out = {
            "losses": losses,
            "contexts": contexts,
            "grid": [[{"n_heads": h, "n_kv": k} for h, k in row] for row in grid],
        }
        if paper:
            out["paper_table4_cells_matched"] = table4_match(grid)
        print(json.dumps(out, indent=2))
        return 0
    width = 16 if paper else 8
    print("L* \\ T  " + "".join(f"{_ctx_label(t):>{width}}" for t in contexts))
    for i, loss in enumerate(losses):
        cells = []
        for j, (h, k) in enumerate(grid[i]):
            cell = f"{h},{k}"
            if paper and (h, k) != TABLE4[loss][j]:
                cell += f" (p {TABLE4[loss][j][0]},{TABLE4[loss][j][1]})"
            cells.append(f"{cell:>{width}}")
        print(f"{loss:<8g}" + "".join(cells))
    if paper:
        print(f"{table4_match(grid)}/40 cells equal the paper's Table 4; (p h,kv) = the paper's cell where it differs")
    return 0


def _fit(args) -> int:
    from ..law.fit import fit_law, read_runs
    from ..law.loss import save_law

    result = fit_law(read_runs(args.runs))
    law = result.law
    print(
        f"fitted {len(law.heads)} head configurations on {result.n_runs} runs: R² = {result.r2:.5f}, "
        f"residual std {result.residual_std:.4g}"
    )
    print(f"E = {law.E:.4f} ± {law.stderr['E']:.4f}")
    for (h, k), (a, b) in sorted(law.heads.items()):
        se = law.stderr[f"{h},{k}"]
        print(f"  H=({h},{k}): a_H = {a:.4g} ± {se['a']:.2g}, b_H = {b:.4f} ± {se['b']:.4f}")
    if args.output:
        save_law(law, args.output)
        print(f"law written to {args.output}; use it with --law {args.output}")
    return 0


def _eval(args) -> int:
    law = _law(args, "conversion")
    h, k = args.heads, args.kv_heads
    if h <= 0 or k <= 0 or h % k:
        raise ConfigError(f"--heads {h} / --kv-heads {k}: need positive counts with kv dividing heads")
    out = {"n_heads": h, "n_kv": k}
    if args.params:
        n = float(parse_count(args.params, what="--params"))
        out.update(n_params=n, loss=law.loss(n, h, k))
    if args.loss:
        out.update(target_loss=_loss_value(args.loss), n_star=law.n_star(_loss_value(args.loss), h, k))
    a, b = law.coefficients(h, k)
    out.update(a_H=a, b_H=b, E=law.E)
    print(
        json.dumps(out, indent=2)
        if args.json
        else "  ".join(f"{key}={val:.6g}" if isinstance(val, float) else f"{key}={val}" for key, val in out.items())
    )
    return 0


def _top(text: str) -> int:
    """--top: 0 listed nothing and -1 all but the last, both with exit 0."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 1000:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 1000, not {text[:20]!r}")
    return n


def register(sub) -> None:
    p = sub.add_parser("law", help="the cost-optimal GQA law: optimize, table, fit, eval")
    lsub = p.add_subparsers(dest="law_command", metavar="ACTION")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    def law_arg(q):
        q.add_argument(
            "--law",
            help="law file from `gqa-convert law fit`, or shipped:default (the default: one law for every "
            "action) | shipped:table4 (0.1's retired design law); docs/law.md",
        )

    q = lsub.add_parser("optimize", help="cost-optimal (N, n_h, n_kv, layers, width) for a target loss and context")
    q.add_argument("--loss", required=True, help="target loss L* (nats)")
    q.add_argument("--context", required=True, help="expected context: 8K, 128k or 131072")
    q.add_argument("--top", type=_top, default=5, help="candidates to list (default 5)")
    q.add_argument("--json", action="store_true")
    law_arg(q)
    q.set_defaults(func=_optimize)

    q = lsub.add_parser("table", help="grid of optimal (n_h, n_kv) like the paper's Table 4")
    q.add_argument("--losses", nargs="+", help="target losses (default: Table 4's 3.0 … 2.35)")
    q.add_argument("--contexts", nargs="+", help="contexts (default: 8K 16K 32K 64K 128K)")
    q.add_argument("--json", action="store_true")
    law_arg(q)
    q.set_defaults(func=_table)

    q = lsub.add_parser("fit", help="fit a_H, b_H, E to your own runs (CSV or JSON of N, n_h, n_kv, loss)")
    q.add_argument("runs", help="runs file: CSV with columns N,n_h,n_kv,loss or a JSON list")
    q.add_argument("-o", "--output", help="write the fitted law here (YAML) for --law")
    q.set_defaults(func=_fit)

    q = lsub.add_parser("eval", help="the law at one point: loss for N, or N* for a target loss")
    q.add_argument("--heads", type=int, required=True)
    q.add_argument("--kv-heads", type=int, required=True)
    q.add_argument("--params", help="non-embedding parameters, e.g. 1.2B")
    q.add_argument("--loss", help="target loss: print N*")
    q.add_argument("--json", action="store_true")
    law_arg(q)
    q.set_defaults(func=_eval)
