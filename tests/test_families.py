"""Every supported family, held to the oracles of architectures.md on a tiny random model.

The oracle is always the ORIGINAL model run by transformers' own code: identity conversion must
reproduce its logits exactly; after making the KV heads of each future group identical (edited
directly in the model's parameters, with the layout read off transformers' modeling code, not
through our adapters) mean pooling is exact, so the converted checkpoint must reproduce them to
float tolerance; the output loads with plain AutoModelForCausalLM and generates; its KV cache
after a prefill is new_kv/old_kv the size.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import FAMILIES, logits, save_tiny, tiny_model
from transformers import AutoModelForCausalLM

from gqa_convert.architectures import families, get_family, head_shape
from gqa_convert.convert import convert_checkpoint
from gqa_convert.errors import UnsupportedModelError

OLD_KV, NEW_KV = 4, 2
IDS = torch.tensor([[1, 17, 42, 5, 99, 23, 8, 64, 31, 77, 12, 3]])


def duplicate_groups(model, family: str, new_kv: int) -> None:
    """Make the KV heads inside each future group identical (weights, biases, OLMo-2 k_norm)."""
    cfg = model.config
    H = cfg.num_attention_heads
    K = cfg.num_kv_heads if family == "falcon" else cfg.num_key_value_heads
    hid = cfg.hidden_size
    d = getattr(cfg, "head_dim", None) or hid // H
    if family in ("falcon", "stablelm"):
        d = hid // H  # these classes ignore config.head_dim
    g = K // new_kv

    def dup(t: torch.Tensor) -> None:  # t: [K, d, ...] view; copy each group's first head
        for grp in range(new_kv):
            for j in range(1, g):
                t[grp * g + j] = t[grp * g]

    with torch.no_grad():
        for layer in _layers(model):
            attn = layer.self_attention if family == "falcon" else layer.self_attn
            if family == "phi3":  # qkv_proj rows: [Q (H*d); K (K*d); V (K*d)]
                w = attn.qkv_proj.weight
                dup(w[H * d : (H + K) * d].view(K, d, hid))
                dup(w[(H + K) * d :].view(K, d, hid))
            elif family == "falcon":  # query_key_value viewed (K, H/K + 2, d): [q.., k, v] per group
                r = H // K
                for p in [attn.query_key_value.weight, attn.query_key_value.bias]:
                    v = p.view(K, r + 2, d, *p.shape[1:])
                    dup(v[:, r])
                    dup(v[:, r + 1])
            else:
                for lin in (attn.k_proj, attn.v_proj):
                    dup(lin.weight.view(K, d, hid))
                    if lin.bias is not None:
                        dup(lin.bias.view(K, d))
                k_norm = getattr(attn, "k_norm", None)
                if k_norm is not None and k_norm.weight.shape[0] == K * d:  # OLMo-2: whole projection
                    dup(k_norm.weight.view(K, d))


def _layers(model):
    base = model.transformer if hasattr(model, "transformer") else model.model
    return base.h if hasattr(base, "h") else base.layers


def cache_bytes(model, ids: torch.Tensor) -> int:
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def test_every_family_is_data():
    assert set(FAMILIES) == set(families())
    for fam in families().values():
        names = fam.layer_tensor_names(3)
        assert all(".3." in n for n in names.values())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_oracles(family, tmp_path):
    model = tiny_model(family, n_kv=OLD_KV)
    src = save_tiny(model, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    fam = get_family(config)
    assert fam.name == family
    shape = head_shape(fam, config)
    assert (shape.n_heads, shape.n_kv) == (8, OLD_KV)
    ref = logits(model, IDS)

    # (1) identity conversion reproduces the logits exactly
    ident = convert_checkpoint(src, tmp_path / "ident", OLD_KV, progress=False)
    assert torch.equal(logits(ident.output, IDS), ref)

    # (2) duplicated heads: mean pooling is exact, logits match the original
    duplicate_groups(model, family, NEW_KV)
    dup_src = save_tiny(model, tmp_path / "dup")
    ref_dup = logits(model, IDS)
    assert not torch.allclose(ref_dup, ref)  # the edit did change the model
    out = convert_checkpoint(dup_src, tmp_path / "gqa", NEW_KV, progress=False)
    new_cfg = json.loads((out.output / "config.json").read_text())
    assert new_cfg[fam.kv_field] == NEW_KV
    assert {k: v for k, v in new_cfg.items() if k != fam.kv_field} == {
        k: v for k, v in config.items() if k != fam.kv_field
    }  # head_dim, rope, windows, tying, dtype ... all kept

    # (3) plain from_pretrained loads it and generate works
    converted = AutoModelForCausalLM.from_pretrained(out.output, attn_implementation="eager").eval()
    torch.testing.assert_close(logits(converted, IDS), ref_dup, atol=1e-5, rtol=1e-5)
    gen = converted.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, IDS.shape[1] + 4)

    # (4) the KV cache after a prefill of T tokens shrinks by exactly new/old. Falcon's class caches
    # keys already broadcast to every query head, so its cache cannot shrink (documented).
    factor = 1 if family == "falcon" else NEW_KV / OLD_KV
    assert cache_bytes(converted, IDS) == cache_bytes(model, IDS) * factor

    # not duplicated: pooling is lossy, the model still runs and differs
    lossy = convert_checkpoint(src, tmp_path / "lossy", 1, progress=False)
    assert not torch.allclose(logits(lossy.output, IDS), ref, atol=1e-3)


def test_mha_family_to_gqa(tmp_path):
    """An MHA checkpoint (n_kv == n_heads, like Llama-2 or Phi-3-mini) converts to GQA."""
    model = tiny_model("phi3", n_kv=8)
    src = save_tiny(model, tmp_path / "src")
    duplicate_groups(model, "phi3", 2)
    save_tiny(model, tmp_path / "dup")
    out = convert_checkpoint(tmp_path / "dup", tmp_path / "out", 2, progress=False)
    torch.testing.assert_close(logits(out.output, IDS), logits(model, IDS), atol=1e-5, rtol=1e-5)
    assert out.old_shape.n_kv == 8 and out.new_shape.n_kv == 2 and src.exists()


def test_inverse_oracle_llama(tmp_path):
    """GQA -> MHA by repeat_interleave is equivalent; converting back recovers the GQA model exactly."""
    gqa = tiny_model("llama", n_kv=2)
    save_tiny(gqa, tmp_path / "gqa")
    mha = tiny_model("llama", n_kv=8)
    sd = gqa.state_dict()
    d = gqa.config.head_dim
    for name, t in list(sd.items()):
        if ".k_proj." in name or ".v_proj." in name:
            sd[name] = t.view(2, d, *t.shape[1:]).repeat_interleave(4, dim=0).reshape(8 * d, *t.shape[1:])
    mha.load_state_dict(sd)
    torch.testing.assert_close(logits(mha, IDS), logits(gqa, IDS), atol=1e-5, rtol=1e-5)
    save_tiny(mha, tmp_path / "mha")
    back = convert_checkpoint(tmp_path / "mha", tmp_path / "back", 2, progress=False)
    with safe_open(str(back.output / "model.safetensors"), "pt") as f:
        for name, t in gqa.state_dict().items():
            if name in f.keys():
                assert torch.equal(f.get_tensor(name), t), name
    assert torch.equal(logits(back.output, IDS), logits(gqa, IDS))


@pytest.mark.parametrize(
    "config, expect",
    [
        ({"model_type": "gpt2", "n_head": 12}, "no KV-head setting"),
        ({"model_type": "gpt_neox"}, "no KV-head setting"),
        ({"model_type": "wavenet9000", "architectures": ["WaveNet9000ForCausalLM"]}, "unknown model family"),
        ({"model_type": "falcon", "new_decoder_architecture": False, "multi_query": True}, "new decoder"),
        ({"model_type": "stablelm", "qk_layernorm": True}, "qk_layernorm"),
    ],
)
def test_refused_families(config, expect):
    with pytest.raises(UnsupportedModelError) as err:
        get_family(config)
    msg = str(err.value)
    assert expect in msg and "\n" not in msg
    if "unknown" in expect or "KV-head" in expect:
        assert "llama" in msg and "phi3" in msg  # lists the supported families


def test_family_by_architecture_name():
    assert get_family({"architectures": ["Qwen2ForCausalLM"]}).name == "qwen2"
