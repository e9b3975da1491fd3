"""Tiny random models of every supported family, built in-process from transformers config classes.

2 layers, hidden 64, vocab 100; 8 query heads and 4 KV heads unless asked otherwise, so 4 -> 2 -> 1
regroupings are all possible. Biases and norms are switched on where the family has them, so
every optional tensor path is exercised.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

BASE = dict(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=8,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# family -> (model_type, extra config kwargs). head_dim 16 where the family reads config.head_dim
# with a value != hidden/heads (64/8 = 8), to catch a config that drops it.
FAMILIES = {
    "llama": ("llama", dict(attention_bias=True)),
    "mistral": ("mistral", dict(sliding_window=16)),
    "mixtral": ("mixtral", dict(num_local_experts=2, num_experts_per_tok=1)),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", dict(head_dim=16)),
    "gemma": ("gemma", dict(head_dim=16)),
    "gemma2": ("gemma2", dict(head_dim=16, sliding_window=16, query_pre_attn_scalar=16)),
    "phi3": ("phi3", {}),
    "olmo2": ("olmo2", {}),
    "falcon": ("falcon", dict(new_decoder_architecture=True, bias=True, alibi=False)),
    "starcoder2": ("starcoder2", dict(use_bias=True)),
    "stablelm": ("stablelm", dict(use_qkv_bias=True)),
    "granite": ("granite", dict(attention_bias=True)),
}


def tiny_config(family: str, n_kv: int = 4, n_heads: int = 8, **extra):
    model_type, kwargs = FAMILIES[family]
    kw = dict(BASE, num_attention_heads=n_heads, **kwargs, **extra)
    if family == "falcon":
        kw["num_kv_heads"] = n_kv
        kw["ffn_hidden_size"] = kw.pop("intermediate_size")
    else:
        kw["num_key_value_heads"] = n_kv
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(family: str, n_kv: int = 4, seed: int = 0, **extra):
    """A random model in eval mode with slightly larger-than-default init (so logits differ)."""
    torch.manual_seed(seed)
    config = tiny_config(family, n_kv=n_kv, **extra)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # norms/biases away from 1/0, so mistakes show
    return model.eval()


def save_tiny(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def logits(folder_or_model, ids: torch.Tensor) -> torch.Tensor:
    model = folder_or_model
    if not hasattr(model, "forward"):
        model = AutoModelForCausalLM.from_pretrained(folder_or_model, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(ids).logits.float()


IDS_DEFAULT = torch.tensor([[1, 17, 42, 5, 99, 23, 8, 64, 31, 77, 12, 3]])
