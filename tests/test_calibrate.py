"""Calibration statistics: layer-by-layer Σ equals Σ from one ordinary forward pass of the whole
model (the oracle: hooks on the real model's attention modules), the cache is reused, and short
data fails before anything is written."""

from __future__ import annotations

import importlib

import pytest
import torch
from tiny import save_tiny

from gqa_convert.errors import DataError
from gqa_convert.merge.calibrate import calibrate, calibration_chunks, layer_covariances

cal_mod = importlib.import_module("gqa_convert.merge.calibrate")  # the package re-exports a function of that name

CHUNKS = [torch.randint(3, 64, (1, 40), generator=torch.Generator().manual_seed(s)) for s in range(3)] + [
    torch.randint(3, 64, (1, 13), generator=torch.Generator().manual_seed(9))
]


def _reference(folder) -> list[torch.Tensor]:
    """Σ_i over [x; 1] from hooks on each attention module during full-model forward passes."""
    from transformers import AutoModelForCausalLM

    from gqa_convert.merge.calibrate import _attention_module, _find_layers

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    _, layers = _find_layers(model, model.config.num_hidden_layers)
    sig = []
    for layer in layers:
        s = torch.zeros(model.config.hidden_size + 1, model.config.hidden_size + 1, dtype=torch.float64)
        sig.append(s)

        def hook(mod, args, kwargs, s=s):
            x = (args[0] if args else kwargs["hidden_states"]).reshape(-1, s.shape[0] - 1).double()
            x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
            s.add_(x.T @ x)

        _attention_module(layer).register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        for c in CHUNKS:
            model(input_ids=c, use_cache=False)
    return sig


# Mixtral: transformers 5 converts its checkpoint (block_sparse_moe.experts.N.w1/w2/w3) into stacked
# mlp.experts tensors while loading; 12 experts, top 2, so the checkpoint's names sort experts.10
# before experts.2 and a wrong stacking order would change later layers' inputs.
@pytest.mark.parametrize(
    "family, extra",
    [pytest.param(f, {}, id=f) for f in ("llama", "qwen2", "gemma2", "phi3", "falcon", "olmo2")]
    + [pytest.param("mixtral", dict(num_local_experts=12, num_experts_per_tok=2), id="mixtral")],
)
def test_layer_by_layer_sigma_matches_full_forward(family, extra, tmp_path):
    folder = save_tiny(family, tmp_path / family, num_hidden_layers=3, **extra)
    got = layer_covariances(folder, CHUNKS)
    ref = _reference(folder)
    assert len(got) == len(ref) == 3
    for g, r in zip(got, ref):
        assert g.dtype == torch.float64
        assert g[-1, -1] == sum(c.numel() for c in CHUNKS)  # the bias entry counts tokens
        assert (g - r).abs().max() <= 1e-5 * r.abs().max()


def test_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    folder = save_tiny("llama", tmp_path / "m")
    first = calibrate(folder, CHUNKS, tmp_path / "cache", hidden=64)
    assert (first.folder / "meta.json").is_file() and first.n_tokens == 133 and first.n_layers == 2
    sig0 = first.sigma(0)

    def boom(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(cal_mod, "layer_covariances", boom)
    again = calibrate(folder, CHUNKS, tmp_path / "cache", hidden=64)
    assert again.folder == first.folder and torch.equal(again.sigma(0), sig0)
    with pytest.raises(AssertionError, match="recomputed"):  # other tokens: another key
        calibrate(folder, CHUNKS[:3], tmp_path / "cache", hidden=64)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.folder.name]  # no half-written folder


def test_too_few_tokens_is_a_clear_error_before_writing(tmp_path):
    folder = save_tiny("llama", tmp_path / "m")
    with pytest.raises(DataError, match=r"gives 40 tokens, fewer than the 65 needed .* hidden size 64"):
        calibrate(folder, CHUNKS[:1], tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_calibration_chunks_from_text(tmp_path):
    from tiny import make_tiny_llama

    texts = [f"Story {i}: the cat sat on the mat and looked at the dog." for i in range(60)]
    src = make_tiny_llama(tmp_path / "src", texts)
    data = tmp_path / "calib.txt"
    data.write_text("\n\n".join(texts))
    chunks = calibration_chunks(src, data, 300, seq_len=128)
    assert [c.shape for c in chunks] == [torch.Size([1, 128]), torch.Size([1, 128]), torch.Size([1, 44])]
    assert chunks[0][0, 0] == 1  # BOS first
    assert (torch.cat([c[0] for c in chunks]) == 1).sum() > 5  # every document BOS-prefixed
    assert torch.equal(torch.cat(calibration_chunks(src, texts, 300, seq_len=128), 1), torch.cat(chunks, 1))
