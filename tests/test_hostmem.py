"""gqa_convert.hostmem: with glibc's mmap threshold fixed, a freed multi-MB tensor leaves the
process at once; with the dynamic threshold (glibc's default) it stays resident. Measured on the
process's own RSS in fresh subprocesses (the benchmark of the effect: benchmarks/long_context_memory.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gqa_convert.hostmem import _libc

CHILD = r"""
import json, sys, torch
import gqa_convert.hostmem as h

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

fixed = h.return_large_frees_to_os() if sys.argv[1] == "fixed" else False
big = torch.empty(16 << 20, dtype=torch.uint8); big.fill_(1); del big  # glibc now serves <= 16 MiB from its heap
before = rss()
blocks, pins = [], []
for _ in range(8):  # 8 x 8 MiB, each followed by a small live tensor so the heap top cannot shrink
    b = torch.empty(8 << 20, dtype=torch.uint8); b.fill_(1); blocks.append(b)
    p = torch.empty(64 << 10, dtype=torch.uint8); p.fill_(1); pins.append(p)
del blocks, b  # (b: the last block)
print(json.dumps({"fixed": fixed, "kept_mib": (rss() - before) / 2**20}))
"""


def _kept(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_libc() is None, reason="glibc only (mallopt)")
def test_fixed_threshold_returns_freed_tensors_to_the_os(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    dynamic, fixed = _kept("dynamic"), _kept("fixed")
    assert fixed["fixed"] is True
    assert dynamic["kept_mib"] > 48  # most of the 64 MiB freed stays resident with the dynamic threshold
    assert fixed["kept_mib"] < 8  # and leaves the process with the threshold fixed at 4 MiB


def test_a_users_own_threshold_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    code = "import gqa_convert.hostmem as h; print(h.return_large_frees_to_os())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
