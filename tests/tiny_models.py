"""Tiny random models of every supported family, built in-process from transformers config classes.

2 layers, hidden 64, vocab 100; 8 query heads and 4 KV heads unless asked otherwise, so 4 -> 2 -> 1
regroupings are all possible. Biases and norms are switched on where the family has them, so
every optional tensor path is exercised.
"""

from __future__ import annotations

from pathlib import Path

import tiny as _registry
import torch
from transformers import AutoModelForCausalLM

# The family registry (model types and the config fields that exercise each family's quirks) is
# tests/tiny.py's; these are the test-specific choices on top of it: biases switched on
# where a family allows them, and head_dim 16 where the family reads config.head_dim with a value
# != hidden/heads (64/8 = 8), to catch a written config that drops it.
EXTRA = {
    "llama": dict(attention_bias=True),
    "mistral": dict(sliding_window=16),
    "qwen3": dict(head_dim=16),
    "gemma2": dict(sliding_window=16),
    "granite": dict(attention_bias=True),
}
FAMILIES = {name: EXTRA.get(name, {}) for name in _registry.FAMILIES}


def tiny_config(family: str, n_kv: int = 4, n_heads: int = 8, **extra):
    return _registry.tiny_config(
        family,
        vocab_size=100,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        **{**EXTRA.get(family, {}), **extra},
    )


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
