"""Human-friendly counts: `8K` context, `50M` tokens, `5GB` shards. One place for the parsing."""

from __future__ import annotations

import re
from typing import Union

from .errors import ConfigError

_SUFFIX = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000, "t": 1_000_000_000_000}


def parse_count(value: Union[int, float, str], *, what: str, binary_k: bool = False) -> int:
    """`50M`, `1.5B`, `128K`, `131072` -> int. `binary_k` makes K mean 1024 and M 1024² (context
    lengths, as long-context work counts them: 128K = 131072, 1M = 1048576)."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a positive number like 8K or 131072, not {value!r}")
    if isinstance(value, (int, float)):
        number = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbtKMBT]?)\s*", str(value))
        if not m:
            raise ConfigError(f"{what} must be a positive number like 8K, 50M or 131072, not {value!r}")
        scale = _SUFFIX.get(m.group(2).lower(), 1)
        if binary_k and m.group(2).lower() in ("k", "m"):
            scale = 1024 if m.group(2).lower() == "k" else 1024**2
        number = float(m.group(1)) * scale
    if number <= 0 or int(number) != number:
        raise ConfigError(f"{what} must be a positive whole number, not {value!r}")
    return int(number)


def parse_size(size: Union[int, str]) -> int:
    """'5GB' -> 5e9 bytes (KB/MB/GB decimal, KiB/MiB/GiB binary, like transformers); ints pass."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(size), flags=re.I)
    if not m:
        raise ConfigError(f"max shard size {size!r} is not a size; use e.g. 5GB, 500MB or 2GiB")
    unit = m.group(2).upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    value = int(float(m.group(1)) * scale[unit])
    if value <= 0:
        raise ConfigError(f"max shard size must be positive, got {size!r}")
    return value
