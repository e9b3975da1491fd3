"""Merging KV heads better than the mean: calibrated, function-preserving merges.

`build_method(name, source_dir=..., calib_data=..., calib_tokens=..., cache_dir=...)` returns a
`regroup.LayerMethod` for the converter:

- "mean":    Ainslie et al. mean pooling (regroup.mean_pool), with the error report.
- "align":   per group, rotate each V head (orthogonal, absorbed into o_proj) and each K RoPE
             plane (unit complex scalar, absorbed into q_proj) onto a common target, then mean.
- "optimal": the activation-optimal closed form (V: top-d eigenvectors of the stacked
             covariance; K: per-plane top eigenvector), maps absorbed into q_proj / o_proj.

The calibrated methods read the per-layer covariance of the attention input (`calibrate`),
computed layer by layer and cached. The returned callable carries `.report`: per layer, the
calibration-weighted relative reconstruction error of K and V for the method and for mean
pooling, and writes a plot of it when the last layer is done. See docs/merging.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

from ..architectures import read_config
from ..errors import ConfigError
from ..regroup import AttentionBlock, HeadShape, mean_pool
from .align import align_factors
from .calibrate import DEFAULT_SEQ_LEN, Calibration, calibrate, calibration_chunks, check_enough_tokens
from .heads import Planes, augmented, k_approx, mean_factors, merged_block, rel_error, sigma_for, v_approx
from .optimal import optimal_factors
from .qheads import Q_METHODS, QueryHeadReducer, build_query_reducer  # fewer query heads (docs/query-heads.md)

METHOD_NAMES = ("mean", "align", "optimal")
FACTORS = {"mean": None, "align": align_factors, "optimal": optimal_factors}
DEFAULT_CALIB_TOKENS = 65536

__all__ = [
    "build_method", "MergeMethod", "METHOD_NAMES", "rotary_dim", "k_side_blocker",
    "build_query_reducer", "QueryHeadReducer", "Q_METHODS",
]  # fmt: skip


def rotary_dim(config: dict, head_dim: int) -> int:
    """How many dims of each head RoPE rotates (partial rotary: Phi, StableLM, NeoX-style configs)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    factor = config.get("partial_rotary_factor", rope.get("partial_rotary_factor") if isinstance(rope, dict) else None)
    if factor is None and "rotary_pct" in config:
        factor = config["rotary_pct"]
    return head_dim if factor is None else int(head_dim * float(factor))


def k_side_blocker(block: AttentionBlock) -> Optional[str]:
    """Why K cannot take per-head plane maps in this block, or None when it can.

    A k_norm (Qwen3/Gemma3 per head, OLMo-2 over the whole projection) normalises the key and
    scales each dim by its own weight: a per-plane complex scalar neither keeps the RMS (its
    modulus) nor commutes with unequal weights on the plane's two dims, and q_norm has the same
    problem on the query side, so such a change of K would not be absorbed exactly.
    """
    if block.k_norm is not None:
        kind = (
            "per-head"
            if block.q_norm is not None and block.k_norm.numel() == block.q_norm.numel()
            else "whole-projection"
        )
        return f"{kind} k_norm does not commute with per-plane key maps; K is mean-pooled, V uses the method"
    return None


class MergeMethod:
    """A LayerMethod with a report: (layer, block, shape, new_kv) -> merged block.

    Attributes:
        name: "mean", "align" or "optimal".
        report: {layer: {"k": {name: err, "mean": err}, "v": {...}, "k_side": ...}, "summary": {...}}
            with err = Σ_group ‖(W_i − Ŵ_i)x‖² / Σ_group ‖W_i x‖² over the calibration tokens.
        plot_path: where the PNG of the report goes after the last layer (None: no plot).
    """

    def __init__(self, name: str, calibration: Calibration, rotary: Optional[int], plot_path: Optional[Path]):
        self.name = name
        self.__name__ = name
        self.calibration = calibration
        self.rotary = rotary
        self.plot_path = plot_path
        self.report: dict = {
            "summary": {
                "method": name,
                "calibration_tokens": calibration.n_tokens,
                "calibration_cache": str(calibration.folder),
            }
        }

    def factors(self, layer: int, block: AttentionBlock, shape: HeadShape, new_kv: int):
        """(groups of the method, groups of mean pooling, planes, K blocker) for one layer."""
        g, d = shape.n_kv // new_kv, shape.head_dim
        sigma = self.calibration.sigma(layer)
        planes = Planes.for_head(d, self.rotary)
        k = augmented(block.k_w, block.k_b).reshape(shape.n_kv, d, -1)
        v = augmented(block.v_w, block.v_b).reshape(shape.n_kv, d, -1)
        sk, sv = sigma_for(sigma, block.k_b is not None), sigma_for(sigma, block.v_b is not None)
        fn = FACTORS[self.name]
        mine, mean = [], []
        for j in range(new_kv):
            kj, vj = k[j * g : (j + 1) * g], v[j * g : (j + 1) * g]
            mean.append(mean_factors(kj, vj, planes))
            mine.append(mean[-1] if fn is None else fn(kj, vj, sk, sv, planes))
        return mine, mean, planes, (k, v, sk, sv)

    def __call__(self, layer: int, block: AttentionBlock, shape: HeadShape, new_kv: int) -> AttentionBlock:
        if new_kv == shape.n_kv:
            return block
        mine, mean, planes, (k, v, sk, sv) = self.factors(layer, block, shape, new_kv)
        blocker = k_side_blocker(block)
        g = shape.n_kv // new_kv
        if self.name == "mean":
            out = mean_pool(layer, block, shape, new_kv)
        else:
            out = merged_block(block, shape, new_kv, mine, planes, do_k=blocker is None, do_v=True)
        errs: dict = {"k": {}, "v": {}}
        for label, groups in ((self.name, mine), ("mean", mean)):
            ks = [
                rel_error(k[j * g : (j + 1) * g], k_approx(f, k[j * g : (j + 1) * g], planes), sk)
                for j, f in enumerate(groups)
            ]
            vs = [rel_error(v[j * g : (j + 1) * g], v_approx(f), sv) for j, f in enumerate(groups)]
            errs["k"][label] = sum(e for e, _ in ks) / max(sum(n for _, n in ks), 1e-300)
            errs["v"][label] = sum(e for e, _ in vs) / max(sum(n for _, n in vs), 1e-300)
        if blocker is not None:  # K was mean-pooled after all
            errs["k"][self.name] = errs["k"]["mean"]
            errs["k_side"] = blocker
            self.report["summary"]["k_side"] = blocker
        self.report[layer] = errs
        if layer == self.calibration.n_layers - 1:
            self._finish()
        return out

    def _finish(self) -> None:
        layers = sorted(k for k in self.report if isinstance(k, int))
        summ = self.report["summary"]
        for side in ("k", "v"):
            for label in {self.name, "mean"}:
                vals = [self.report[i][side][label] for i in layers]
                summ[f"{side}_mean_rel_error_{label}"] = sum(vals) / len(vals)
        if self.plot_path is not None:
            from .report import plot_report

            plot_report(self.report, self.plot_path)
            summ["plot"] = str(self.plot_path)


def default_cache_dir() -> Path:
    """~/.cache/gqa-convert/calibration (XDG_CACHE_HOME respected) when the caller gives none."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "gqa-convert" / "calibration"


def build_method(
    name: str,
    *,
    source_dir: Union[str, Path],
    calib_data: Optional[Union[str, Path, Sequence[str]]] = None,
    calib_tokens: Optional[int] = None,
    cache_dir: Optional[Union[str, Path]] = None,
    plot_path: Optional[Union[str, Path]] = None,
    seq_len: int = DEFAULT_SEQ_LEN,
) -> MergeMethod:
    """A calibrated LayerMethod for the converter; all checks and the calibration happen here,
    before the converter writes anything.

    Args:
        name: "mean", "align" or "optimal".
        source_dir: the source checkpoint folder (safetensors).
        calib_data: a text file, folder, dataset name, or a list of documents.
        calib_tokens: calibration token budget (default 65536); at least hidden+1.
        cache_dir: where Σ per layer is cached (default ~/.cache/gqa-convert/calibration).
        plot_path: where the report plot goes (default: <cache_dir>/merge-<name>-<key>.png).
        seq_len: calibration sequence length.
    Raises:
        ConfigError: unknown method, or no calibration data.
        DataError: calibration data unreadable or shorter than hidden+1 tokens.
        UnsupportedModelError: a family the converter cannot handle.
    """
    from ..architectures import get_family, head_shape

    if name not in METHOD_NAMES:
        raise ConfigError(f"unknown merge method {name!r}; choose one of {', '.join(METHOD_NAMES)}")
    if calib_data is None:
        raise ConfigError(f"--method {name} needs calibration text: pass --calib-data FILE|FOLDER|DATASET")
    if calib_tokens is not None and int(calib_tokens) <= 0:
        raise ConfigError(f"--calib-tokens must be a positive number of tokens, got {calib_tokens}")
    source_dir = Path(source_dir)
    config = read_config(source_dir)
    family = get_family(config)
    shape = head_shape(family, config)
    tokens = int(calib_tokens or DEFAULT_CALIB_TOKENS)
    check_enough_tokens(tokens, shape.hidden, "--calib-tokens")
    chunks = calibration_chunks(source_dir, calib_data, tokens, seq_len)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cal = calibrate(source_dir, chunks, cache, hidden=shape.hidden)
    plot = Path(plot_path) if plot_path is not None else cache / f"merge-{name}-{cal.key}.png"
    return MergeMethod(name, cal, rotary_dim(config, shape.head_dim), plot)
