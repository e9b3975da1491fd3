"""Issue 16: measured attention FLOPs per token fall by exactly the cost model's amount after a
query-head reduction.

One decode step at T keys under FlopCounterMode with eager attention (gqa_convert.verify
measure_costs: prefill T-1 tokens, count the step that reads all T), on the source and on its
q_heads-reduced conversion, for every family that can change its query-head count. The cost
model (law/cost.py forward_flops) says the difference is exactly

    ΔC = 4·L·d·d_h·Δ(n_h + n_kv)   (q, k, v, o projections)   +   4·L·T·d_h·Δn_h   (QKᵀ and AV)

— an integer identity, with no tolerance: everything the counter sees besides (FFN, output head,
the rotary-frequency product) does not depend on the head counts. The KV cache the step fills is
the cost model's too.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, save_tiny, tiny_model
from transformers import AutoModelForCausalLM

from gqa_convert.architectures import families, get_family, head_shape, read_config
from gqa_convert.convert import convert_checkpoint
from gqa_convert.law.cost import forward_flops, kv_cache_bytes
from gqa_convert.law.shapes import shape_from_config
from gqa_convert.verify import measure_costs

# Mixtral converts (test_qheads), but the cost model is for dense decoders only (law/shapes.py refuses MoE)
SUPPORTED = [f for f in FAMILIES if not families()[f].q_heads_refused and f != "mixtral"]
CALIB = [torch.randint(3, 100, (1, 64), generator=torch.Generator().manual_seed(s)) for s in range(4)]
T = 12  # keys the decode step reads: within every tiny family's sliding window (16), so all layers hold T


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GQA_CONVERT_CACHE", str(tmp_path / "cache"))


def _measure(folder, context: int) -> dict:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return measure_costs(model, context)


def _heads(folder):
    cfg = read_config(folder)
    h = head_shape(get_family(cfg), cfg)
    return h.n_heads, h.n_kv, h.head_dim, h.hidden, cfg


@pytest.mark.parametrize("family", SUPPORTED)
@pytest.mark.parametrize("kv, q", [(4, 4), (2, 4), (4, 8)])
def test_measured_flops_fall_by_the_cost_model_amount(family, kv, q, tmp_path):
    src = save_tiny(tiny_model(family), tmp_path / "src")
    out = tmp_path / f"q{q}kv{kv}"
    convert_checkpoint(src, out, kv, q_heads=q, q_method="prune", calib_data=CALIB, progress=False)
    n_h, n_kv, d_h, d, cfg = _heads(src)
    n_h2, n_kv2, d_h2, d2, cfg2 = _heads(out)
    assert (n_h2, n_kv2, d_h2, d2) == (q, kv, d_h, d)
    L = int(cfg["num_hidden_layers"])
    before, after = _measure(src, T), _measure(out, T)
    predicted = 4 * L * d * d_h * ((n_h + n_kv) - (q + kv)) + 4 * L * T * d_h * (n_h - q)
    assert before["flops_per_token"] - after["flops_per_token"] == predicted
    # the same through law/cost.py, and the caches it fills
    old, new = shape_from_config(cfg), shape_from_config(cfg2)
    assert forward_flops(old, T).total_flops - forward_flops(new, T).total_flops == predicted
    assert forward_flops(old, T).attention_flops - forward_flops(new, T).attention_flops == 4 * L * T * d_h * (n_h - q)
    assert after["kv_cache_bytes"] == kv_cache_bytes(new, T, "fp32")
    assert before["kv_cache_bytes"] == kv_cache_bytes(old, T, "fp32")


def test_long_context_llama(tmp_path):
    """Llama at T = 1024: the attention term dominates the difference, still exact."""
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    out = tmp_path / "q2kv2"
    convert_checkpoint(src, out, 2, q_heads=2, q_method="prune", calib_data=CALIB, progress=False)
    n_h, n_kv, d_h, d, cfg = _heads(src)
    L, context = int(cfg["num_hidden_layers"]), 1024
    drop = _measure(src, context)["flops_per_token"] - _measure(out, context)["flops_per_token"]
    attention = 4 * L * context * d_h * (n_h - 2)
    assert drop == 4 * L * d * d_h * ((n_h + n_kv) - 4) + attention
    assert attention / drop > 0.8
