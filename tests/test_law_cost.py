"""Cost model against law.md's worked values, real HF configs, and measurement on real models:
KV-cache bytes held by transformers' DynamicCache, and forward FLOPs counted by FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gqa_convert.errors import ConfigError, GqaConvertError, UnsupportedModelError
from gqa_convert.law.cost import (
    CostSettings,
    cost_report,
    dtype_bytes,
    forward_flops,
    infer_flops,
    infer_memory,
    kv_cache_bytes,
    kv_cache_values,
    sequence_flops,
    z_cost,
)
from gqa_convert.law.shapes import ModelShape, load_shape, shape_from_config

T128K = 131_072


# --------------------------------------------------------------------------- law.md worked values
def test_worked_values_llama_1b_heads():
    s = ModelShape(n_layers=16, hidden=2048, n_heads=32, n_kv=8, head_dim=64, d_ff=8192, vocab=128256)
    assert kv_cache_values(s, T128K) == 2_147_483_648
    assert forward_flops(s, T128K).attention_flops == 17_179_869_184
    # eq. 3/4 time-variant parts alone (N = 0)
    assert infer_memory(0, 16, 64, 8, T128K) == 2_147_483_648
    assert infer_flops(0, 16, 64, 32, T128K) == 17_179_869_184


def test_worked_values_36_layers_8_heads_1_kv():
    s = ModelShape(n_layers=36, hidden=1536, n_heads=8, n_kv=1, head_dim=64, d_ff=4096, vocab=50304)
    assert kv_cache_values(s, T128K) == 603_979_776
    assert forward_flops(s, T128K).attention_flops == 9_663_676_416
    assert kv_cache_bytes(s, T128K, "bf16") == 2 * 603_979_776


def test_exact_count_equals_eq3_with_output_head_in_N():
    s = ModelShape(16, 2048, 32, 8, 64, 8192, 128256, tied=True)
    n = s.non_embedding_params + s.vocab * s.hidden  # the output head is the only embedding that costs FLOPs
    for t in (1, 8192, T128K):
        assert forward_flops(s, t).total_flops == infer_flops(n, 16, 64, 32, t)
    # per-component formulas of law.md
    f = forward_flops(s, 1000)
    assert f.projections_flops == 4 * 16 * 2048 * 64 * (32 + 8)
    assert f.ffn_flops == 2 * 16 * 3 * 2048 * 8192
    assert f.lm_head_flops == 2 * 2048 * 128256


def test_sequence_flops_is_T_times_C_at_half_T():
    n, L, dh, nh, T = 1e9, 16, 64, 32, 8192
    assert sequence_flops(n, L, dh, nh, T) == pytest.approx(2 * n * T + 2 * T**2 * L * dh * nh)


def test_z_and_settings():
    assert z_cost(100.0, 1000.0) == pytest.approx(0.9 * 10 + 0.1 * 10)
    s = ModelShape(16, 2048, 32, 8, 64, 8192, 128256)
    values = cost_report(s, 8192, "bf16", CostSettings(memory_unit="values"))
    nbytes = cost_report(s, 8192, "bf16", CostSettings(memory_unit="bytes"))
    assert nbytes.z > values.z
    assert values.kv_cache_bytes == 2 * values.kv_cache_values
    assert values.memory_values == s.non_embedding_params + values.kv_cache_values
    with pytest.raises(ConfigError):
        CostSettings(compute="per_day")


# --------------------------------------------------------------------------- real HF configs
LLAMA_32_1B = {  # Llama-3.2-1B config.json (the fields that matter)
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
}


def test_shape_of_llama_config():
    s = shape_from_config(LLAMA_32_1B)
    assert (s.n_layers, s.hidden, s.n_heads, s.n_kv, s.head_dim, s.d_ff, s.vocab, s.tied) == (
        16,
        2048,
        32,
        8,
        64,
        8192,
        128256,
        True,
    )
    # Llama-3.2-1B has 1.236B parameters in total (0.973B non-embedding + 0.263B tied embedding) + norms
    assert s.total_params + (2 * 16 + 1) * 2048 == 1_235_814_400


def test_shape_head_dim_explicit_and_derived():
    qwen3 = {
        "model_type": "qwen3",
        "hidden_size": 2560,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "num_hidden_layers": 36,
        "intermediate_size": 9728,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    }
    assert shape_from_config(qwen3).head_dim == 128
    no_kv = {
        "model_type": "llama",
        "hidden_size": 512,
        "num_attention_heads": 8,
        "num_hidden_layers": 2,
        "intermediate_size": 1024,
        "vocab_size": 100,
    }
    s = shape_from_config(no_kv)
    assert (s.head_dim, s.n_kv, s.tied) == (64, 8, False)  # LlamaConfig defaults: MHA, untied
    gpt2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257}
    g = shape_from_config(gpt2)
    assert (g.d_ff, g.gated_ffn, g.n_kv, g.tied) == (3072, False, 12, True)
    assert g.non_embedding_params == 12 * (4 * 768 * 768 + 2 * 768 * 3072)
    nested = {"model_type": "x", "text_config": dict(LLAMA_32_1B)}
    assert shape_from_config(nested).n_heads == 32


def test_shape_from_pretrained_config_object_and_folder(tmp_path):
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{k: v for k, v in LLAMA_32_1B.items() if k != "model_type"})
    assert shape_from_config(cfg) == shape_from_config(LLAMA_32_1B)
    cfg.save_pretrained(tmp_path)
    assert load_shape(tmp_path) == shape_from_config(LLAMA_32_1B)


def test_parameter_count_matches_a_real_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    for tied in (True, False):
        cfg = LlamaConfig(
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=97,
            tie_word_embeddings=tied,
        )
        model = LlamaForCausalLM(cfg)
        s = shape_from_config(cfg)
        norms = (2 * 3 + 1) * 48
        assert s.total_params + norms == sum(p.numel() for p in model.parameters())


def test_bad_shapes_and_configs():
    with pytest.raises(ConfigError, match="must divide"):
        ModelShape(2, 64, 6, 4, 16, 128, 100)
    with pytest.raises(ConfigError, match="positive"):
        ModelShape(0, 64, 4, 4, 16, 128, 100)
    with pytest.raises(UnsupportedModelError, match="lacks"):
        shape_from_config({"model_type": "weird", "hidden_size": 8})
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts"):
        shape_from_config({**LLAMA_32_1B, "model_type": "mixtral", "num_local_experts": 8})
    with pytest.raises(ConfigError, match="dtype"):
        dtype_bytes("fp7")
    s = ModelShape(2, 64, 4, 4, 16, 128, 100)
    for bad in (0, -5, 1.5):
        with pytest.raises(ConfigError, match="context"):
            cost_report(s, bad)
    with pytest.raises(GqaConvertError):
        load_shape("/nonexistent/model-folder-xyz")


# --------------------------------------------------------------------------- measured: KV cache
def _tiny_llama(
    n_heads: int,
    n_kv: int,
    head_dim: int,
    hidden: int = 32,
    layers: int = 2,
    vocab: int = 64,
    dtype=torch.float32,
    attn: str = "sdpa",
):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        vocab_size=vocab,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).to(dtype).eval(), cfg


def _cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


@pytest.mark.parametrize("heads", [(4, 4, 8, 32), (4, 2, 8, 32), (4, 1, 8, 32), (6, 3, 16, 48), (8, 2, 4, 32)])
@pytest.mark.parametrize("dtype,name", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_kv_cache_bytes_after_prefill_equal_prediction(heads, dtype, name):
    n_heads, n_kv, head_dim, hidden = heads
    model, cfg = _tiny_llama(n_heads, n_kv, head_dim, hidden=hidden, dtype=dtype)
    shape = shape_from_config(cfg)
    for T in (1, 37, 128):
        with torch.no_grad():
            out = model(torch.randint(0, 64, (1, T)), use_cache=True)
        assert _cache_bytes(out.past_key_values) == kv_cache_bytes(shape, T, name)


def test_kv_cache_bytes_stories260k(stories_hf):
    from transformers import AutoModelForCausalLM

    shape = load_shape(stories_hf)
    assert (shape.n_layers, shape.hidden, shape.n_heads, shape.n_kv, shape.head_dim, shape.vocab) == (
        5,
        64,
        8,
        4,
        8,
        512,
    )
    model = AutoModelForCausalLM.from_pretrained(stories_hf).eval()
    assert shape.total_params + (2 * 5 + 1) * 64 == sum(p.numel() for p in model.parameters()) == 260_032 - 0
    for T in (1, 100, 256):
        with torch.no_grad():
            out = model(torch.randint(3, 512, (1, T)), use_cache=True)
        assert _cache_bytes(out.past_key_values) == kv_cache_bytes(shape, T, "fp32") == 2 * 5 * 4 * 8 * T * 4


# --------------------------------------------------------------------------- measured: FLOPs
def _decode_flops(model, cfg, T: int) -> int:
    """FLOPs FlopCounterMode counts for one decode step with a KV cache of T tokens (random K/V)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=cfg)
    d_h = cfg.head_dim
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(1, cfg.num_key_value_heads, T, d_h)
        cache.update(k, torch.randn_like(k), layer)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.tensor([[5]]), cache=cache, position_ids=torch.tensor([[T]]), use_cache=True)
    return counter.get_total_flops()


@pytest.mark.parametrize("heads", [(4, 2, 16, 64), (8, 1, 8, 48), (6, 6, 16, 96)])
def test_decode_flops_match_count(heads):
    """Eager attention: QKᵀ and AV are matmuls FlopCounterMode counts (4·n_h·T·d_h per layer)."""
    n_heads, n_kv, head_dim, hidden = heads
    model, cfg = _tiny_llama(n_heads, n_kv, head_dim, hidden=hidden, layers=2, vocab=256, attn="eager")
    shape = shape_from_config(cfg)
    n = shape.non_embedding_params + shape.vocab * shape.hidden
    for T in (16, 64, 256, 1024, 4096):
        measured = _decode_flops(model, cfg, T)
        # exact count: the new token attends to T cached keys plus itself; FlopCounterMode also sees
        # the rotary-frequency outer product (2·d_h/2 FLOPs), which the count leaves out.
        exact = forward_flops(shape, T + 1).total_flops
        assert measured == pytest.approx(exact, rel=2e-3), (T, measured, exact)
        # the paper's eq. 3 with N = non-embedding + output head, T tokens in context
        assert measured == pytest.approx(infer_flops(n, shape.n_layers, head_dim, n_heads, T), rel=0.02), T


def test_decode_flops_sdpa_on_cpu():
    """transformers' default SDPA path: on CPU, torch dispatches to a fused kernel that
    FlopCounterMode may not have a formula for (it then counts 0 attention FLOPs); every other
    FLOP must still match the exact count. With a formula, the whole count matches."""
    model, cfg = _tiny_llama(4, 2, 16, hidden=64, layers=2, vocab=256, attn="sdpa")
    shape = shape_from_config(cfg)
    for T in (16, 1024, 4096):
        measured = _decode_flops(model, cfg, T)
        f = forward_flops(shape, T + 1)
        without_attention = f.total_flops - f.attention_flops
        assert measured == pytest.approx(f.total_flops, rel=2e-3) or measured == pytest.approx(
            without_attention, rel=2e-3
        )


def test_one_reading_of_the_heads_stablelm_head_dim():
    """The law's shape reader and the converter read a config's heads the same way: StableLM's
    class ignores a `head_dim` in its config (hidden / heads), so both must (0.1's law read 64)."""
    from gqa_convert.architectures import get_family, head_shape

    config = {
        "model_type": "stablelm",
        "architectures": ["StableLmForCausalLM"],
        "hidden_size": 256,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 512,
        "vocab_size": 1000,
    }
    converter = head_shape(get_family(config), config)
    law = shape_from_config(config)
    assert converter.head_dim == 32 == law.head_dim
    assert (law.n_heads, law.n_kv, law.hidden) == (converter.n_heads, converter.n_kv, converter.hidden)
