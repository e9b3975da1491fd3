"""Query-head reduction (convert_checkpoint q_heads / q_method), held to independent oracles.

Oracles: the ORIGINAL model run by transformers (edits made directly in its parameters, the
layout read off the modeling code, never through our adapters); least squares solved on the
raw activation samples (not on the accumulated statistics); hooks on the full model's o_proj.

- identity (q_heads = n_heads) reproduces the logits exactly;
- a model whose query heads D contribute nothing (o_proj columns zeroed), reduced to the others,
  gives the same logits, and `prune` keeps exactly the others; with a KV change as well it equals
  the KV-only conversion; when the surviving heads read only some KV heads, those are what is kept;
- a model whose query heads come in identical pairs, halved by `merge`, gives the same logits
  (the kept head's o_proj columns become the pair's sum); `prune` cannot;
- every supporting family's output loads with plain from_pretrained, has an explicit head_dim,
  q/o shapes [n_h·d_h, D] / [D, n_h·d_h], a KV cache unchanged (or halved with the KV heads), and
  generates; refused families and bad counts fail in one line before any output.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import FAMILIES, logits, save_tiny, tiny_model
from transformers import AutoModelForCausalLM

from gqa_convert.architectures import families
from gqa_convert.convert import convert_checkpoint
from gqa_convert.errors import ConfigError, InvalidHeadCountError, UnsupportedModelError
from gqa_convert.merge.calibrate import layer_covariances
from gqa_convert.merge.qheads import (
    greedy_choice,
    head_contributions,
    kv_groups,
    output_error,
    prune_choice,
    refit_output,
)  # fmt: skip
from gqa_convert.regroup import HeadShape

SUPPORTED = [f for f in FAMILIES if not families()[f].q_heads_refused]
REFUSED = {"falcon": "head_dim", "stablelm": "head_dim", "olmo2": "q_norm"}
IDS = torch.tensor([[1, 17, 42, 5, 99, 23, 8, 64, 31, 77, 12, 3]])
CALIB = [torch.randint(3, 100, (1, 64), generator=torch.Generator().manual_seed(s)) for s in range(8)]  # 512 tokens
DEAD = [0, 3, 5, 6]  # one query head of each old KV group (8 heads, 4 KV heads: pairs)
LIVE = [1, 2, 4, 7]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GQA_CONVERT_CACHE", str(tmp_path / "cache"))  # calibration caches stay in the test


def _attn(layer):
    return layer.self_attn


def _layers(model):
    return model.model.layers


def _head_dim(model) -> int:
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def kill_heads(model, heads) -> None:
    """Zero o_proj's input columns of the given query heads in every layer: they contribute nothing."""
    d = _head_dim(model)
    with torch.no_grad():
        for layer in _layers(model):
            for h in heads:
                _attn(layer).o_proj.weight[:, h * d : (h + 1) * d] = 0


def pair_heads(model) -> None:
    """Make query head 2j+1 a copy of head 2j (q rows and bias; same KV head, so the same output)."""
    cfg = model.config
    d, hid, H = _head_dim(model), cfg.hidden_size, cfg.num_attention_heads
    with torch.no_grad():
        for layer in _layers(model):
            attn = _attn(layer)
            if hasattr(attn, "qkv_proj"):  # phi3: rows [Q (H*d); K; V]
                q, qb = attn.qkv_proj.weight[: H * d].view(H, d, hid), None
            else:
                q = attn.q_proj.weight.view(H, d, hid)
                qb = None if attn.q_proj.bias is None else attn.q_proj.bias.view(H, d)
            for h in range(1, H, 2):
                q[h] = q[h - 1]
                if qb is not None:
                    qb[h] = qb[h - 1]


def cache_bytes(model, ids) -> int:
    with torch.no_grad():
        out = model(ids, use_cache=True)
    return sum(t.numel() * t.element_size() for layer in out.past_key_values.layers for t in (layer.keys, layer.values))


def _convert(src, out, kv, q, method="merge", kv_method="mean"):
    return convert_checkpoint(
        src, out, kv, q_heads=q, q_method=method, method=kv_method, calib_data=CALIB, progress=False
    )


def _record(folder) -> dict:
    return json.loads((folder / "gqa_convert.json").read_text())


def _close(a, b, tol=1e-5) -> bool:
    return bool((a - b).abs().max() <= tol * max(1.0, float(b.abs().max())))


# --- through the converter, every family ---------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_identity_is_exact(family, tmp_path):
    """q_heads equal to the current count: logits identical, config untouched, no calibration needed."""
    model = tiny_model(family)
    src = save_tiny(model, tmp_path / "src")
    out = convert_checkpoint(src, tmp_path / "same", 4, q_heads=8, progress=False)
    assert torch.equal(logits(out.output, IDS), logits(model, IDS))
    assert json.loads((out.output / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert _record(out.output)["query_heads"] is None and out.query_heads is None


@pytest.mark.parametrize("family", SUPPORTED)
def test_dead_heads_are_pruned_exactly_and_the_output_is_a_stock_model(family, tmp_path):
    model = tiny_model(family)
    kill_heads(model, DEAD)
    src = save_tiny(model, tmp_path / "src")
    ref = logits(model, IDS)
    d = _head_dim(model)
    src_cfg = json.loads((src / "config.json").read_text())
    for method in ("prune", "merge"):
        out = _convert(src, tmp_path / method, 4, 4, method).output
        rec = _record(out)["query_heads"]
        assert (rec["old"], rec["new"], rec["method"]) == (8, 4, method)
        for layer in rec["layers"].values():
            assert layer["kept"] == LIVE, (method, layer)
            assert all(layer["scores"][h] == 0 for h in DEAD) and all(layer["scores"][h] > 0 for h in LIVE)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["num_attention_heads"] == 4 and cfg["head_dim"] == d  # explicit, != hidden / 4 here
        assert {k: v for k, v in cfg.items() if k not in ("num_attention_heads", "head_dim")} == {
            k: v for k, v in src_cfg.items() if k not in ("num_attention_heads", "head_dim")
        }
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            o = f.get_slice("model.layers.0.self_attn.o_proj.weight").get_shape()
            q_name = "qkv_proj" if family == "phi3" else "q_proj"
            q = f.get_slice(f"model.layers.0.self_attn.{q_name}.weight").get_shape()
        assert o == [64, 4 * d] and q == [(4 + (8 if family == "phi3" else 0)) * d, 64]
        converted = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()  # no custom code
        assert _close(logits(converted, IDS), ref), method
        assert cache_bytes(converted, IDS) == cache_bytes(model, IDS)  # same KV heads, same head_dim
        gen = converted.generate(IDS, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        assert gen.shape == (1, IDS.shape[1] + 4)

    # with the KV heads halved too: the dead heads' removal changes nothing, so it equals KV-only
    both = AutoModelForCausalLM.from_pretrained(_convert(src, tmp_path / "both", 2, 4, "prune").output).eval()
    kv_only = convert_checkpoint(src, tmp_path / "kv", 2, progress=False).output
    assert _close(logits(both, IDS), logits(kv_only, IDS))
    assert cache_bytes(both, IDS) * 2 == cache_bytes(model, IDS)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_kv_heads_nobody_reads_any_more_are_dropped(family, tmp_path):
    """Heads 2,3 and 6,7 dead: the survivors read only old KV heads 0 and 2. Reduced to 4 query /
    2 KV heads, KV is pooled by readers (kv0, kv2 kept as they are), so nothing changes."""
    model = tiny_model(family)
    kill_heads(model, [2, 3, 6, 7])
    src = save_tiny(model, tmp_path / "src")
    out = _convert(src, tmp_path / "out", 2, 4, "prune").output
    assert all(layer["kept"] == [0, 1, 4, 5] for layer in _record(out)["query_heads"]["layers"].values())
    assert _close(logits(out, IDS), logits(model, IDS))


@pytest.mark.parametrize("family", SUPPORTED)
def test_merge_reproduces_duplicated_query_heads(family, tmp_path):
    """Identical heads in pairs, halved: merge keeps one of each with o_proj = the pair's sum; prune loses one."""
    model = tiny_model(family)
    pair_heads(model)
    src = save_tiny(model, tmp_path / "src")
    ref = logits(model, IDS)
    for kv in (4, 2):
        merged = _convert(src, tmp_path / f"merge{kv}", kv, 4, "merge").output
        rec = _record(merged)["query_heads"]
        for layer in rec["layers"].values():
            assert sorted(h // 2 for h in layer["kept"]) == [0, 1, 2, 3]  # one of every pair
            assert layer["rel_error_merge"] < 1e-9 < layer["rel_error_prune"]
        if kv == 4:
            assert _close(logits(merged, IDS), ref, 1e-4)
    pruned = _convert(src, tmp_path / "prune", 4, 4, "prune").output
    assert not _close(logits(pruned, IDS), ref, 1e-3)


def test_merge_never_reconstructs_worse_than_prune_in_the_record(tmp_path):
    model = tiny_model("qwen2")
    src = save_tiny(model, tmp_path / "src")
    for kv, q in ((4, 4), (2, 2), (1, 4)):
        rec = _record(_convert(src, tmp_path / f"{kv}-{q}", kv, q, "merge", kv_method="optimal").output)["query_heads"]
        for layer in rec["layers"].values():
            assert 0 < layer["rel_error_merge"] <= layer["rel_error_prune"] < 1
        assert rec["summary"]["rel_error_merge"] <= rec["summary"]["rel_error_prune"]
        assert rec["calibration_tokens"] == 512


@pytest.mark.parametrize("family, why", sorted(REFUSED.items()))
def test_refused_families_say_why_in_one_line(family, why, tmp_path):
    src = save_tiny(tiny_model(family), tmp_path / "src")
    with pytest.raises(UnsupportedModelError) as err:
        _convert(src, tmp_path / "out", 4, 4)
    msg = str(err.value)
    assert "cannot change its query-head count" in msg and why in msg and "\n" not in msg
    assert "llama" in msg  # names the families that can
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # before calibrating


@pytest.mark.parametrize(
    "kv, q, method, calib, error, match",
    [
        (
            4,
            3,
            "merge",
            CALIB,
            InvalidHeadCountError,
            r"must divide 8 and be a multiple of 4; valid_q_counts are \[4, 8\]",
        ),
        (4, 2, "merge", CALIB, InvalidHeadCountError, r"multiple of 4"),
        (2, 16, "prune", CALIB, InvalidHeadCountError, r"valid_q_counts are \[2, 4, 8\]"),
        (4, 4, "best", CALIB, ConfigError, r"unknown query-head method 'best'; choose one of prune, merge"),
        (4, 4, "merge", None, ConfigError, r"needs calibration text"),
    ],
)
def test_bad_input_fails_in_one_line_before_any_output(kv, q, method, calib, error, match, tmp_path):
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    with pytest.raises(error, match=match) as err:
        convert_checkpoint(src, tmp_path / "out", kv, q_heads=q, q_method=method, calib_data=calib, progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


# --- the statistics and the least squares, against samples -----------------------------------------


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma2"])
def test_o_proj_sigma_layer_by_layer_matches_hooks_on_the_full_model(family, tmp_path):
    model = tiny_model(family)
    src = save_tiny(model, tmp_path / "src")
    site = families()[family].o_proj_module()
    got = layer_covariances(src, CALIB[:3], site=site)
    ref = []
    for layer in _layers(model):
        s = torch.zeros(8 * _head_dim(model) + 1, 8 * _head_dim(model) + 1, dtype=torch.float64)
        ref.append(s)

        def hook(mod, args, s=s):
            z = args[0].reshape(-1, s.shape[0] - 1).double()
            z = torch.cat([z, torch.ones(len(z), 1, dtype=torch.float64)], 1)
            s.add_(z.T @ z)

        layer.get_submodule(site).register_forward_pre_hook(hook)
    with torch.no_grad():
        for c in CALIB[:3]:
            model(input_ids=c, use_cache=False)
    assert len(got) == len(ref) == 2
    for g, r in zip(got, ref):
        assert g[-1, -1] == 192 and (g - r).abs().max() <= 1e-5 * r.abs().max()


def _samples(seed: int, H: int = 6, d: int = 4, D: int = 10, T: int = 300):
    """Correlated per-head activations z [T, H·d] and an output weight B [D, H·d]."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(T, H * d, generator=g, dtype=torch.float64) @ torch.randn(
        H * d, H * d, generator=g, dtype=torch.float64
    )
    b = torch.randn(D, H * d, generator=g, dtype=torch.float64)
    return z, b, HeadShape(n_heads=H, n_kv=3, head_dim=d, hidden=D)


def _cols(heads, d):
    return [h * d + i for h in heads for i in range(d)]


@pytest.mark.parametrize("seed", range(4))
def test_refit_is_the_least_squares_optimum_of_the_samples(seed):
    z, b, shape = _samples(seed)
    sigma, d = z.T @ z, shape.head_dim
    y = z @ b.T  # the block output per token
    scores = head_contributions(sigma, b, shape, len(z))
    for h in range(shape.n_heads):  # contribution = mean squared norm of the head's output, per token
        c = z[:, _cols([h], d)] @ b[:, _cols([h], d)].T
        assert torch.isclose(scores[h], (c**2).sum() / len(z), rtol=1e-10)
    groups = kv_groups(shape, 3)
    for keep in (prune_choice(scores, groups, 1), greedy_choice(sigma, b, groups, 1, d), [1, 2, 5]):
        zs = z[:, _cols(keep, d)]
        w = refit_output(sigma, b, keep, d)
        lstsq = torch.linalg.lstsq(zs, y).solution.T  # from the samples themselves
        assert torch.allclose(w, lstsq, atol=1e-8 * float(lstsq.abs().max()))
        err = output_error(sigma, b, keep, w, d)
        assert err == pytest.approx(float(((y - zs @ w.T) ** 2).sum() / (y**2).sum()), rel=1e-9)
        assert err <= output_error(sigma, b, keep, b[:, _cols(keep, d)], d)  # never above the unrefitted columns


def test_greedy_skips_an_exact_duplicate_and_prefers_lower_index_on_ties():
    z, b, shape = _samples(7, H=4, d=3)
    d = 3
    z[:, _cols([1], d)] = z[:, _cols([0], d)]  # head 1 = head 0
    sigma = z.T @ z
    keep = greedy_choice(sigma, b, [[0, 1, 2, 3]], 2, d)
    assert not {0, 1} <= set(keep)
    scores = torch.tensor([1.0, 1.0, 0.5, 1.0])
    assert prune_choice(scores, [[0, 1], [2, 3]], 1) == [0, 3]
