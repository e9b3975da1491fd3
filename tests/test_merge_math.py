"""Merge maths on tiny random models of every supported family (float64, no fixtures).

Oracles are the source model's own logits: a function-preserving change of basis must not move
them; the absorbed merge must equal the un-merged approximation it stands for; and a model whose
heads inside each group differ only by maps the merge may absorb must be reproduced exactly
(mean pooling is not, which shows the test has teeth).
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from functools import lru_cache

import pytest
import torch
from tiny import FAMILIES, model_from_config, tiny_model

from gqa_convert.architectures import get_family, head_shape, new_shape
from gqa_convert.errors import ConfigError, DataError
from gqa_convert.merge import MergeMethod, build_method, k_side_blocker, rotary_dim
from gqa_convert.merge.align import align_factors
from gqa_convert.merge.calibrate import calibrate
from gqa_convert.merge.heads import (
    Planes,
    augmented,
    expanded_block,
    from_complex,
    k_approx,
    mean_factors,
    merged_block,
    rel_error,
    sigma_for,
    to_complex,
    transformed_block,
    v_approx,
)  # fmt: skip
from gqa_convert.merge.optimal import optimal_factors
from gqa_convert.regroup import mean_pool

FAMILY_NAMES = list(FAMILIES)
NORM_FAMILIES = ["qwen3", "olmo2"]  # k_norm: K is mean-pooled, V merged
IDS = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))


@lru_cache(maxsize=None)
def _template(family: str, n_kv: int):
    """One float64 model per (family, KV count), built once: constructing models dominates test time."""
    if n_kv == 4:
        return tiny_model(family, dtype=torch.float64)
    base = _template(family, 4)
    cfg = base.config.to_dict()
    fam = get_family(cfg)
    return model_from_config(type(base.config).from_dict(fam.updated_config(cfg, n_kv))).to(torch.float64)


def _tol(family: str) -> float:
    # OLMo-2's q/k norms span all heads and its RMSNorm computes in float32: float32 rounding there
    return 1e-5 if family == "olmo2" else 1e-9


def _setup(family: str):
    model = copy.deepcopy(_template(family, 4))
    cfg = model.config.to_dict()
    fam = get_family(cfg)
    shape = head_shape(fam, cfg)
    planes = Planes.for_head(shape.head_dim, rotary_dim(cfg, shape.head_dim))
    return model, cfg, fam, shape, planes


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _with_blocks(model, cfg: dict, fam, blocks: dict, shape):
    """A model of shape `shape` (KV count may differ) with the layers' attention from `blocks`."""
    out = copy.deepcopy(_template(fam.name, shape.n_kv))
    sd = dict(model.state_dict())
    for i, block in blocks.items():
        for name in fam.layer_tensor_names(i).values():
            sd.pop(name, None)
        sd.update(fam.join(i, block, shape))
    missing, unexpected = out.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m or "lm_head" in m for m in missing), (missing, unexpected)
    return out


def _sigma(hidden: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, hidden, generator=g, dtype=torch.float64) @ torch.randn(
        hidden, hidden, generator=g, dtype=torch.float64
    )
    x = torch.cat([x + 0.3, torch.ones(400, 1, dtype=torch.float64)], dim=1)
    return x.T @ x


def _group_factors(fn, block, shape, new_kv, sigma, planes):
    g, d = shape.n_kv // new_kv, shape.head_dim
    k = augmented(block.k_w, block.k_b).reshape(shape.n_kv, d, -1)
    v = augmented(block.v_w, block.v_b).reshape(shape.n_kv, d, -1)
    sk, sv = sigma_for(sigma, block.k_b is not None), sigma_for(sigma, block.v_b is not None)
    return [fn(k[j * g : (j + 1) * g], v[j * g : (j + 1) * g], sk, sv, planes) for j in range(new_kv)]


def _repeat_heads(t: torch.Tensor, g: int, d: int) -> torch.Tensor:
    """Each head (d rows) repeated g times: the MHA-equivalent of a pooled GQA head."""
    heads = t.reshape(-1, 1, d, *t.shape[1:])
    return heads.expand(-1, g, *heads.shape[2:]).reshape(-1, *t.shape[1:])


def _layers(fam, cfg) -> range:
    return range(fam.n_layers(cfg))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_change_of_basis_preserves_logits(family):
    """Any invertible V map (absorbed into o_proj) and complex K-plane scalar (into q_proj)."""
    model, cfg, fam, shape, planes = _setup(family)
    sd = model.state_dict()
    g = torch.Generator().manual_seed(2)
    blocks = {}
    for i in _layers(fam, cfg):
        block = fam.split(i, sd, shape)
        maps = torch.randn(
            shape.n_kv, shape.head_dim, shape.head_dim, generator=g, dtype=torch.float64
        ) + 2 * torch.eye(shape.head_dim)
        scalars = torch.complex(torch.randn(shape.n_kv, len(planes.a), generator=g, dtype=torch.float64) + 1.5,
                                torch.randn(shape.n_kv, len(planes.a), generator=g, dtype=torch.float64))  # fmt: skip
        if k_side_blocker(block):
            scalars = torch.ones_like(scalars)
        blocks[i] = transformed_block(block, shape, maps, scalars, planes)
        assert not torch.equal(blocks[i].v_w, block.v_w)
    ref, out = _logits(model), _logits(_with_blocks(model, cfg, fam, blocks, shape))
    assert (out - ref).abs().max() < _tol(family) * max(1.0, ref.abs().max())


@pytest.mark.parametrize("family", NORM_FAMILIES)
def test_k_plane_maps_do_not_survive_k_norm(family):
    """Why those families fall back to mean pooling for K: the same K maps change their logits."""
    model, cfg, fam, shape, planes = _setup(family)
    sd = model.state_dict()
    block = fam.split(0, sd, shape)
    assert k_side_blocker(block)
    maps = torch.eye(shape.head_dim, dtype=torch.float64).expand(shape.n_kv, -1, -1).clone()
    scalars = torch.full((shape.n_kv, len(planes.a)), 0.6 + 0.8j, dtype=torch.complex128)
    scalars[:, 0] = 2.0
    out = _logits(_with_blocks(model, cfg, fam, {0: transformed_block(block, shape, maps, scalars, planes)}, shape))
    assert (out - _logits(model)).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_alignment_alone_preserves_logits_and_align_is_mean_of_aligned(family):
    model, cfg, fam, shape, planes = _setup(family)
    sd = model.state_dict()
    aligned, merged = {}, {}
    for i in _layers(fam, cfg):
        block = fam.split(i, sd, shape)
        groups = _group_factors(align_factors, block, shape, 2, _sigma(shape.hidden, i), planes)
        do_k = k_side_blocker(block) is None
        maps = torch.cat([f.v_maps for f in groups])
        scalars = (
            torch.cat([f.k_scalars for f in groups])
            if do_k
            else torch.ones(shape.n_kv, len(planes.a), dtype=torch.complex128)
        )
        aligned[i] = transformed_block(block, shape, maps, scalars, planes)
        merged[i] = merged_block(block, shape, 2, groups, planes, do_k=do_k)
        pooled = mean_pool(i, aligned[i], shape, 2)  # align-then-mean, literally
        for role in ("q_w", "k_w", "v_w", "o_w", "q_b", "k_b", "v_b"):
            a, b = getattr(pooled, role), getattr(merged[i], role)
            assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-6)), (
                role
            )  # mean_pool averages in float32
    ref = _logits(model)
    assert (_logits(_with_blocks(model, cfg, fam, aligned, shape)) - ref).abs().max() < _tol(family) * max(
        1.0, ref.abs().max()
    )


ABSORB_CASES = [("optimal", f) for f in FAMILY_NAMES] + [
    ("align", f) for f in ("llama", "qwen2", "qwen3", "phi3", "falcon")
]


@pytest.mark.parametrize("method,family", ABSORB_CASES)
def test_absorption_is_exact(family, method):
    """The merged model (fewer KV heads, maps absorbed in q/o) == the un-merged approximation."""
    fn = {"align": align_factors, "optimal": optimal_factors}[method]
    model, cfg, fam, shape, planes = _setup(family)
    sd = model.state_dict()
    for new_kv in (2, 1):
        expanded, merged = {}, {}
        for i in _layers(fam, cfg):
            block = fam.split(i, sd, shape)
            groups = _group_factors(fn, block, shape, new_kv, _sigma(shape.hidden, 10 + i), planes)
            do_k = k_side_blocker(block) is None
            expanded[i] = expanded_block(block, shape, groups, planes, do_k=do_k)
            if not do_k:  # K is mean-pooled: its approximation is the group mean, repeated
                pooled = mean_pool(i, block, shape, new_kv)
                expanded[i].k_w = _repeat_heads(pooled.k_w, shape.n_kv // new_kv, shape.head_dim)
                if block.k_norm.numel() == shape.n_kv * shape.head_dim:  # whole-projection norm
                    expanded[i].k_norm = _repeat_heads(pooled.k_norm, shape.n_kv // new_kv, shape.head_dim)
            merged[i] = merged_block(block, shape, new_kv, groups, planes, do_k=do_k)
        a = _logits(_with_blocks(model, cfg, fam, expanded, shape))
        b = _logits(_with_blocks(model, cfg, fam, merged, new_shape(shape, new_kv)))
        assert (a - b).abs().max() < _tol(family) * max(1.0, a.abs().max()), new_kv
        assert (a - _logits(model)).abs().max() > 1e-6  # a real merge happened


def _related_heads(family: str, orthogonal: bool, seed: int = 3):
    """A model whose KV heads in each future pair differ only by absorbable maps (K only where allowed)."""
    model, cfg, fam, shape, planes = _setup(family)
    sd = dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    d = shape.head_dim
    for i in _layers(fam, cfg):
        block = fam.split(i, sd, shape)
        k = augmented(block.k_w, block.k_b).reshape(shape.n_kv, d, -1)
        v = augmented(block.v_w, block.v_b).reshape(shape.n_kv, d, -1)
        for h in range(1, shape.n_kv, 2):  # head h copies head h-1 through a map
            a = torch.randn(d, d, generator=g, dtype=torch.float64)
            a = torch.linalg.qr(a)[0] if orthogonal else a + 2 * torch.eye(d, dtype=torch.float64)
            v[h] = a @ v[h - 1]
            c = torch.exp(1j * torch.rand(len(planes.a), generator=g, dtype=torch.float64) * 6.28)
            if not orthogonal:
                c = c * (0.5 + torch.rand(len(planes.a), generator=g, dtype=torch.float64))
            if k_side_blocker(block):
                c = torch.ones_like(c)
            k[h] = from_complex(c[:, None] * to_complex(k[h - 1 : h], planes)[0], planes, k[h - 1])
        nb = replace(
            block,
            k_w=k[..., : shape.hidden].reshape(block.k_w.shape),
            v_w=v[..., : shape.hidden].reshape(block.v_w.shape),
        )
        if block.k_b is not None:
            nb.k_b, nb.v_b = k[..., -1].reshape(-1), v[..., -1].reshape(-1)
        sd.update(fam.join(i, nb, shape))
    model.load_state_dict(sd)
    return model, cfg, fam, shape, planes


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_optimal_recovers_heads_related_by_absorbable_maps(family):
    model, cfg, fam, shape, planes = _related_heads(family, orthogonal=False)
    sd = model.state_dict()
    ref = _logits(model)
    out = {}
    for name, fn in (("optimal", optimal_factors), ("mean", None)):
        blocks = {}
        for i in _layers(fam, cfg):
            block = fam.split(i, sd, shape)
            if fn is None:
                blocks[i] = mean_pool(i, block, shape, 2)
            else:
                groups = _group_factors(fn, block, shape, 2, _sigma(shape.hidden, i), planes)
                blocks[i] = merged_block(block, shape, 2, groups, planes, do_k=k_side_blocker(block) is None)
        out[name] = (_logits(_with_blocks(model, cfg, fam, blocks, new_shape(shape, 2))) - ref).abs().max()
    assert out["optimal"] < 100 * _tol(family) * max(1.0, ref.abs().max()), out
    assert out["mean"] > 1e-3, out


@pytest.mark.parametrize("family", ["llama", "qwen2", "falcon", "phi3"])
def test_align_recovers_heads_related_by_rotations(family):
    model, cfg, fam, shape, planes = _related_heads(family, orthogonal=True)
    sd = model.state_dict()
    blocks = {}
    for i in _layers(fam, cfg):
        block = fam.split(i, sd, shape)
        groups = _group_factors(align_factors, block, shape, 2, _sigma(shape.hidden, i), planes)
        blocks[i] = merged_block(block, shape, 2, groups, planes)
    ref = _logits(model)
    assert (_logits(_with_blocks(model, cfg, fam, blocks, new_shape(shape, 2))) - ref).abs().max() < 1e-7 * max(
        1.0, ref.abs().max()
    )


def test_optimal_error_never_above_align_or_mean():
    """Both align-then-mean and mean are feasible points of the optimal problem (Σ-weighted)."""
    model, cfg, fam, shape, planes = _setup("qwen2")
    block = fam.split(0, model.state_dict(), shape)
    sigma = _sigma(shape.hidden, 5)
    k = augmented(block.k_w, block.k_b).reshape(shape.n_kv, shape.head_dim, -1)
    v = augmented(block.v_w, block.v_b).reshape(shape.n_kv, shape.head_dim, -1)
    for new_kv in (2, 1):
        errs = {}
        for name, fn in (
            ("optimal", optimal_factors),
            ("align", align_factors),
            ("mean", lambda k, v, sk, sv, p: mean_factors(k, v, p)),
        ):
            groups = _group_factors(fn, block, shape, new_kv, sigma, planes)
            g = shape.n_kv // new_kv
            ek = sum(
                rel_error(k[j * g : (j + 1) * g], k_approx(f, k[j * g : (j + 1) * g], planes), sigma)[0]
                for j, f in enumerate(groups)
            )
            ev = sum(rel_error(v[j * g : (j + 1) * g], v_approx(f), sigma)[0] for j, f in enumerate(groups))
            errs[name] = (ek, ev)
        assert errs["optimal"][0] <= errs["align"][0] * (1 + 1e-9) <= errs["mean"][0] * (1 + 1e-9)
        assert errs["optimal"][1] <= errs["align"][1] * (1 + 1e-9) <= errs["mean"][1] * (1 + 1e-9)


# --- through the converter ----------------------------------------------------------------------


def _chunks(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (1, 64), generator=g) for _ in range(n)]


@pytest.mark.parametrize("family", ["falcon", "phi3", "stablelm", "qwen3", "gemma2", "mixtral"])
def test_converter_with_calibrated_optimal_recovers_related_heads(family, tmp_path):
    """End to end: calibration, the family's layout adapters, the converter's JSON report."""
    from transformers import AutoModelForCausalLM

    from gqa_convert.convert import convert_checkpoint

    model, cfg, fam, shape, planes = _related_heads(family, orthogonal=False)
    src = tmp_path / "src"
    model.float().save_pretrained(src)
    cal = calibrate(src, _chunks(4), tmp_path / "cache", hidden=shape.hidden)
    method = MergeMethod("optimal", cal, rotary_dim(cfg, shape.head_dim), tmp_path / "plot.png")
    result = convert_checkpoint(src, tmp_path / "out", 2, method=method, progress=False)
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ref = AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager").eval()
    with torch.no_grad():
        a, b = out(IDS).logits, ref(IDS).logits
    assert (a - b).abs().max() < 1e-4 * max(1.0, b.abs().max())
    record = json.loads((tmp_path / "out" / "gqa_convert.json").read_text())
    layer0 = record["report"]["0"]
    assert layer0["v"]["optimal"] < 1e-8 < layer0["v"]["mean"]
    assert (tmp_path / "plot.png").stat().st_size > 1000
    assert record["report"]["summary"]["method"] == "optimal"
    assert result.report["summary"]["calibration_tokens"] == 256


def test_unknown_method_and_missing_calibration_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown merge method 'best'.*mean, align, optimal"):
        build_method("best", source_dir=tmp_path, calib_data="x.txt", calib_tokens=100, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="needs calibration text"):
        build_method("optimal", source_dir=tmp_path, calib_data=None, calib_tokens=100, cache_dir=tmp_path)


def test_too_few_calibration_tokens_fail_before_any_output(tmp_path):
    from tiny import make_tiny_llama

    from gqa_convert.convert import convert_checkpoint

    texts = ["Once upon a time there was a cat.", "The dog ran to the park and played."] * 20
    src = make_tiny_llama(tmp_path / "src", texts, hidden=64)
    data = tmp_path / "calib.txt"
    data.write_text("\n\n".join(texts[:2]))
    out = tmp_path / "out"
    with pytest.raises(DataError, match="fewer than the 65 needed for a full-rank covariance"):
        convert_checkpoint(src, out, 1, method="optimal", calib_data=data, calib_tokens=5000, progress=False)
    with pytest.raises(DataError, match="--calib-tokens gives 20 tokens"):
        convert_checkpoint(src, out, 1, method="optimal", calib_data=data, calib_tokens=20, progress=False)
    assert not out.exists()
