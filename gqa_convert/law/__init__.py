"""The cost-optimal GQA law (Chen et al., 2025): cost model, loss law, recipe, fitting.

    from gqa_convert.law import load_law, optimize, cost_report, load_shape
    optimize(2.6, 131072).best          # cost-optimal (N, n_h, n_kv, L, d) for loss 2.6 at 128K
    cost_report(load_shape("path/to/model"), 131072, "bf16").kv_cache_bytes
"""  # fmt: skip

from .cost import CostSettings, cost_report, forward_flops, kv_cache_bytes, kv_cache_values
from .fit import fit_law, read_runs
from .loss import LossLaw, candidates, load_law, save_law
from .recipe import RecipeSettings, optimize, table
from .shapes import ModelShape, load_shape, shape_from_config

__all__ = [
    "CostSettings",
    "cost_report",
    "forward_flops",
    "kv_cache_bytes",
    "kv_cache_values",
    "fit_law",
    "read_runs",
    "LossLaw",
    "candidates",
    "load_law",
    "save_law",
    "RecipeSettings",
    "optimize",
    "table",
    "ModelShape",
    "load_shape",
    "shape_from_config",
]
