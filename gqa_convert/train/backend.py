"""Choose the attention kernel: flash-attn 2 when it can run, else PyTorch SDPA.

All confine attention to each packed document: stock SDPA ("sdpa") through the block-diagonal
`[B, 1, T, T]` mask transformers builds from restarting `position_ids`, flash-attn through its varlen
path (cu_seqlens from the same position ids), and "packed" -- "sdpa_packed" (train/attention.py) --
through one causal SDPA call per document, with no T×T mask. Asking for flash-attn where it cannot
run is an error, never a silent fallback.

`auto` without flash-attn picks `AUTO_SDPA` = "packed": it computes the same outputs and gradients
as stock SDPA (tests/test_packed_attention.py) with O(T) instead of O(T²) mask memory, which at
128K is the difference between 16 GiB per row and nothing.
"""

from __future__ import annotations

import importlib.util

import torch

from ..errors import ConfigError

CHOICES = ("auto", "flash", "sdpa", "packed")
AUTO_SDPA = "packed"  # what "auto" picks without flash-attn: O(T) mask memory, same results as "sdpa"


def flash_available() -> tuple[bool, str]:
    """(usable, why not) for flash-attn 2 on this machine."""
    if importlib.util.find_spec("flash_attn") is None:
        return False, "the flash_attn package is not installed (pip install flash-attn)"
    if not torch.cuda.is_available():
        return False, "no CUDA device is available"
    return True, ""


def choose_attention(requested: str = "auto") -> str:
    """The transformers `attn_implementation` to use for `requested` in auto|flash|sdpa|packed.

    "packed" registers "sdpa_packed" with transformers (idempotent) and returns that name.
    """
    if requested not in CHOICES:
        raise ConfigError(f"--attn must be one of {', '.join(CHOICES)}, not {requested!r}")
    ok, why = flash_available()
    if requested == "flash":
        if not ok:
            raise ConfigError(f"--attn flash cannot run here: {why}; use --attn sdpa or --attn auto")
        return "flash_attention_2"
    if requested == "auto":
        if ok:
            return "flash_attention_2"
        requested = AUTO_SDPA
    if requested == "packed":
        from .attention import register

        return register()
    return "sdpa"
