"""Fewer query heads: choose which to keep from calibration statistics, refit o_proj in closed form.

At one layer let z_t = [z_t,1; …; z_t,H] be o_proj's input at token t (head h's attention output,
d_h values each) and B = o_proj's weight [D, H·d_h], so the block adds B z_t. The calibration
records Σ = Σ_t z_t z_tᵀ ([H·d_h]², float64, layer by layer: `calibrate(..., site=o_proj)`); every
quantity below is a quadratic form in Σ, so no activation is kept.

- contribution of head h (what `prune` ranks by): c_h = Σ_t ‖B_h z_t,h‖² / T = tr(B_h Σ_hh B_hᵀ) / T.
- keeping heads S with output weight W [D, |S|·d_h] leaves the error
  E(S, W) = Σ_t ‖B z_t − W z_t,S‖² = tr((B − W P_S) Σ (B − W P_S)ᵀ), P_S selecting S's rows;
  reported relative to Σ_t ‖B z_t‖² = tr(B Σ Bᵀ).
- `prune`: S = the N/n_kv heads of largest c_h in every KV group, W = B_S (o_proj's columns as
  they were).
- `merge`: W = the least-squares optimum W* = B Σ_{:,S} Σ_SS⁺ (∂E/∂W = 0), for S the better of
  prune's heads and a greedy selection that adds, one head at a time, the head whose refitted
  output explains most of what is still unexplained (block Gram–Schmidt in the Σ inner product,
  same quotas per group). Since W = B_S is one feasible W for prune's S, E(merge) ≤ E(prune).
  Two identical heads are the extreme case: after one is taken the other explains nothing, so
  the greedy step takes another head, and W* gives the kept copy the sum of both columns.

The kept heads' attention is unchanged (each query head only reads its own q rows and its KV
head), so the statistics of the source describe the converted block exactly; when the KV heads
change too, that regrouping runs after this one, on the reduced block (`regroup.keep_query_heads`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from ..errors import ConfigError
from ..regroup import AttentionBlock, HeadShape, LayerMethod, head_rows, keep_query_heads
from .calibrate import DEFAULT_SEQ_LEN, Calibration, calibrate, calibration_chunks, check_enough_tokens

Q_METHODS = ("prune", "merge")
DEFAULT_CALIB_TOKENS = 65536
# Singular directions below this fraction of a block's scale are noise (float64 round-off of an
# exactly dependent head, e.g. a duplicate), not signal to fit.
RCOND = 1e-10


# --- the maths on one layer -----------------------------------------------------------------------


def head_contributions(sigma: Tensor, o_w: Tensor, shape: HeadShape, n_tokens: int) -> Tensor:
    """c_h = Σ_t ‖B_h z_t,h‖² / T for every query head h ([H], float64)."""
    d = shape.head_dim
    b = o_w.to(torch.float64).reshape(o_w.shape[0], shape.n_heads, d)
    s = sigma.reshape(shape.n_heads, d, shape.n_heads, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [H, d, d]
    return torch.einsum("ohi,hij,ohj->h", b, s, b) / max(n_tokens, 1)


def refit_output(sigma: Tensor, o_w: Tensor, keep: Sequence[int], head_dim: int) -> Tensor:
    """W* = B Σ_{:,S} Σ_SS⁺: the o_proj for heads `keep` that best reproduces the block output."""
    b = o_w.to(torch.float64)
    s = head_rows(keep, head_dim)
    sss = sigma[s][:, s]
    return (torch.linalg.pinv(sss, hermitian=True, rtol=RCOND) @ (sigma[s] @ b.T)).T


def output_error(sigma: Tensor, o_w: Tensor, keep: Sequence[int], w: Tensor, head_dim: int) -> float:
    """E(S, W) / tr(B Σ Bᵀ): relative squared error of the block output over the calibration tokens."""
    b = o_w.to(torch.float64)
    diff = b.clone()
    diff[:, head_rows(keep, head_dim)] -= w.to(torch.float64)
    total = float(((b @ sigma) * b).sum())
    return float(((diff @ sigma) * diff).sum()) / max(total, 1e-300)


def kv_groups(shape: HeadShape, new_kv: int) -> list[list[int]]:
    """The query heads of each new KV group (contiguous: group j reads new KV head j)."""
    per = shape.n_heads // new_kv
    return [list(range(j * per, (j + 1) * per)) for j in range(new_kv)]


def prune_choice(scores: Tensor, groups: list[list[int]], per_group: int) -> list[int]:
    """The per_group heads of largest score in every group, ascending (ties: the lower index)."""
    keep = []
    for g in groups:
        keep += sorted(sorted(g, key=lambda h: (-float(scores[h]), h))[:per_group])
    return sorted(keep)


def greedy_choice(sigma: Tensor, o_w: Tensor, groups: list[list[int]], per_group: int, head_dim: int) -> list[int]:
    """Heads added one at a time, each the one whose least-squares refit explains most of the
    block output still unexplained, until every group has per_group.

    R is Σ conditioned on the heads taken (R ← R − R_{:,c} R_cc⁺ R_{c,:}) and G = R Bᵀ restricted
    the same way; adding head c explains tr(G_cᵀ R_cc⁺ G_c) more of tr(B Σ Bᵀ).
    """
    d = head_dim
    b = o_w.to(torch.float64)
    r, g = sigma.clone(), sigma @ b.T
    scale = [
        float(sigma[head_rows([h], d)][:, head_rows([h], d)].diagonal().mean()) for h in range(sigma.shape[0] // d)
    ]
    left = {h: j for j, grp in enumerate(groups) for h in grp}
    quota = [per_group] * len(groups)
    keep: list[int] = []
    while len(keep) < per_group * len(groups):
        best, best_gain, best_inv = -1, -1.0, None
        for h in sorted(left):
            if quota[left[h]] == 0:
                continue
            rows = head_rows([h], d)
            inv = torch.linalg.pinv(r[rows][:, rows], hermitian=True, atol=RCOND * max(scale[h], 1e-300))
            gain = float((g[rows] * (inv @ g[rows])).sum())
            if gain > best_gain:
                best, best_gain, best_inv = h, gain, inv
        # A head with quota left always exists here, and a gain (a trace of a PSD form) is ≥ 0 > −1
        # up to rounding, so one was taken, unless the gains were NaN (or rounding made them < −1).
        assert best_inv is not None, "greedy_choice: no head had a gain above -1 (NaN in Σ?)"
        rows = head_rows([best], d)
        p = r[:, rows] @ best_inv
        g = g - p @ g[rows]
        r = r - p @ r[rows]
        quota[left.pop(best)] -= 1
        keep.append(best)
    return sorted(keep)


# --- the report ---------------------------------------------------------------------------------


@dataclass
class LayerChoice:
    """One layer's query-head reduction (what the record keeps of it)."""

    scores: list[float]  # c_h per old query head: mean squared norm of its o_proj output per token
    kept: list[int]  # old query-head indices kept, ascending
    selection: str  # "scores" (largest c_h per group) or "greedy" (see greedy_choice)
    rel_error_prune: float  # E / tr(BΣBᵀ) of prune's heads with o_proj's columns unchanged
    rel_error_merge: Optional[float] = None  # with the refitted o_proj (merge only)


@dataclass
class QueryHeadReport:
    """The query-head change of a conversion, per layer."""

    old: int
    new: int
    method: str
    calibration_tokens: int
    calibration_cache: str  # the cache folder's name (no local paths published)
    layers: dict[int, LayerChoice] = field(default_factory=dict)

    def summary(self) -> dict[str, Optional[float]]:
        """Mean relative output error over the layers, per method measured."""
        rows = list(self.layers.values())
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        merge = [c.rel_error_merge for c in rows if c.rel_error_merge is not None]
        return {"rel_error_prune": mean([c.rel_error_prune for c in rows]), "rel_error_merge": mean(merge)}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = {str(i): v for i, v in d["layers"].items()}
        d["summary"] = self.summary()
        return d


# --- the layer method ------------------------------------------------------------------------------


class QueryHeadReducer:
    """Reduces a block's query heads to n_q, layer by layer, from Σ of o_proj's input.

    `then(kv_method)` is the converter's LayerMethod: this reduction, then the KV regrouping on
    the reduced block. Attributes: method ("prune" | "merge"), n_q, calibration, report.
    """

    def __init__(self, method: str, n_q: int, n_heads: int, calibration: Calibration):
        if method not in Q_METHODS:
            raise ConfigError(f"unknown query-head method {method!r}; choose one of {', '.join(Q_METHODS)}")
        self.method, self.n_q, self.calibration = method, n_q, calibration
        self.report = QueryHeadReport(
            old=n_heads, new=n_q, method=method, calibration_tokens=calibration.n_tokens,
            calibration_cache=calibration.folder.name,
        )  # fmt: skip

    def choose(self, layer: int, block: AttentionBlock, shape: HeadShape, new_kv: int) -> tuple[list[int], Tensor]:
        """(heads kept, their o_proj [D, n_q·d_h] float64) for one layer; the choice is reported."""
        full = self.calibration.sigma(layer)
        n_tokens = int(round(float(full[-1, -1])))
        sigma = full[:-1, :-1]  # o_proj has no input bias column: drop the constant
        d = shape.head_dim
        groups, per = kv_groups(shape, new_kv), self.n_q // new_kv
        scores = head_contributions(sigma, block.o_w, shape, n_tokens)
        pruned = prune_choice(scores, groups, per)
        o_pruned = block.o_w.to(torch.float64)[:, head_rows(pruned, d)]
        choice = LayerChoice(
            scores=[float(x) for x in scores], kept=pruned, selection="scores",
            rel_error_prune=output_error(sigma, block.o_w, pruned, o_pruned, d),
        )  # fmt: skip
        keep, o_new = pruned, o_pruned
        if self.method == "merge":
            keep, o_new, err, how = self._best_refit(sigma, block.o_w, groups, per, pruned, d)
            choice.kept, choice.selection, choice.rel_error_merge = keep, how, err
        self.report.layers[layer] = choice
        return keep, o_new

    @staticmethod
    def _best_refit(sigma: Tensor, o_w: Tensor, groups, per: int, pruned: list[int], d: int):
        """The refit on prune's heads and on the greedy heads; the one with the smaller error."""
        best = None
        for how, keep in (("scores", pruned), ("greedy", greedy_choice(sigma, o_w, groups, per, d))):
            w = refit_output(sigma, o_w, keep, d)
            err = output_error(sigma, o_w, keep, w, d)
            if best is None or err < best[2]:
                best = (keep, w, err, how)
        return best

    def __call__(
        self, layer: int, block: AttentionBlock, shape: HeadShape, new_kv: int
    ) -> tuple[AttentionBlock, HeadShape]:
        """The reduced block and its shape (n_q query heads; KV as `keep_query_heads` leaves them)."""
        keep, o_new = self.choose(layer, block, shape, new_kv)
        return keep_query_heads(block, shape, keep, o_new)

    def then(self, kv_method: LayerMethod) -> LayerMethod:
        """This reduction followed by `kv_method` (which sees the reduced block and its shape)."""

        def both(layer: int, block: AttentionBlock, shape: HeadShape, new_kv: int) -> AttentionBlock:
            reduced, mid = self(layer, block, shape, new_kv)
            return kv_method(layer, reduced, mid, new_kv)

        both.__name__ = getattr(kv_method, "__name__", "kv")
        return both


def build_query_reducer(
    method: str,
    n_q: int,
    *,
    source_dir: Union[str, Path],
    calib_data: Any = None,
    calib_tokens: Optional[int] = None,
    cache_dir: Optional[Union[str, Path]] = None,
    seq_len: int = DEFAULT_SEQ_LEN,
) -> QueryHeadReducer:
    """A QueryHeadReducer for the source checkpoint; the checks and the calibration (Σ of o_proj's
    input per layer, cached) happen here, before the converter writes anything.

    Args:
        method: "prune" or "merge".
        n_q: the new query-head count (checked by the converter against the KV count).
        source_dir: the source checkpoint folder (safetensors).
        calib_data: a text file, folder, dataset name, list of documents, or token-id tensors.
        calib_tokens: calibration token budget (default 65536); at least n_heads·head_dim + 1.
        cache_dir: where Σ per layer is cached (default ~/.cache/gqa-convert/calibration).
        seq_len: calibration sequence length.
    Raises:
        ConfigError: unknown method or no calibration data. DataError: too little text.
        UnsupportedModelError: a family whose class cannot hold fewer query heads.
    """
    from ..architectures import get_family, head_shape, read_config
    from . import default_cache_dir

    if method not in Q_METHODS:
        raise ConfigError(f"unknown query-head method {method!r}; choose one of {', '.join(Q_METHODS)}")
    if calib_data is None:
        raise ConfigError(
            f"q_heads {n_q} ({method}) needs calibration text to measure the heads: pass calib_data (--calib-data)"
        )
    if calib_tokens is not None and int(calib_tokens) <= 0:
        raise ConfigError(f"--calib-tokens must be a positive number of tokens, got {calib_tokens}")
    source_dir = Path(source_dir)
    config = read_config(source_dir)
    family = get_family(config)
    family.check_query_heads()
    shape = head_shape(family, config)
    width = shape.n_heads * shape.head_dim  # Σ of o_proj's input is width²: needs that many tokens
    tokens = int(calib_tokens or DEFAULT_CALIB_TOKENS)
    check_enough_tokens(tokens, width, "--calib-tokens")
    chunks = calibration_chunks(source_dir, calib_data, tokens, seq_len)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cal = calibrate(source_dir, chunks, cache, hidden=width, site=family.o_proj_module())
    return QueryHeadReducer(method, n_q, shape.n_heads, cal)
