"""Choose the attention kernel: flash-attn 2 when it can run, else PyTorch SDPA.

Both confine attention to each packed document: SDPA through the block-diagonal mask transformers
builds from restarting `position_ids`, flash-attn through its varlen path (cu_seqlens from the same
position ids). Asking for flash-attn where it cannot run is an error, never a silent fallback.
"""

from __future__ import annotations

import importlib.util

import torch

from ..errors import ConfigError

CHOICES = ("auto", "flash", "sdpa")


def flash_available() -> tuple[bool, str]:
    """(usable, why not) for flash-attn 2 on this machine."""
    if importlib.util.find_spec("flash_attn") is None:
        return False, "the flash_attn package is not installed (pip install flash-attn)"
    if not torch.cuda.is_available():
        return False, "no CUDA device is available"
    return True, ""


def choose_attention(requested: str = "auto") -> str:
    """The transformers `attn_implementation` to use for `requested` in auto|flash|sdpa."""
    if requested not in CHOICES:
        raise ConfigError(f"--attn must be one of {', '.join(CHOICES)}, not {requested!r}")
    ok, why = flash_available()
    if requested == "flash":
        if not ok:
            raise ConfigError(f"--attn flash cannot run here: {why}; use --attn sdpa or --attn auto")
        return "flash_attention_2"
    if requested == "auto" and ok:
        return "flash_attention_2"
    return "sdpa"
