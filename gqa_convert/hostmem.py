"""Host (CPU) memory: keep glibc's allocator from holding on to what the tensors have freed.

PyTorch's CPU tensors come from malloc. glibc serves a request of at least its mmap threshold
with a fresh mapping that `free` returns to the OS at once, and smaller ones from its heap arenas,
whose freed space it keeps. The threshold starts at 128 KiB but is *dynamic*: every time a mapped
block is freed the threshold rises to that block's size (up to 32 MiB). A long-context training
step frees multi-MB buffers by the hundred (loss chunks of 256 x V floats, per-layer activations),
so after the first few, every later buffer of that size lands in the arenas, and fragments there
stay resident although no tensor holds them. Measured (benchmarks/long_context_memory.py, one
uptraining step with distillation, T = 16,384, V = 128,256, docs/long-context.md): 3,083 MiB over
baseline with the dynamic threshold, 1,087 MiB with it fixed at 4 MiB, at a 7% longer step.

Fixing the threshold (mallopt, which also turns the dynamic adjustment off) is what jemalloc /
tcmalloc users get by swapping the allocator; this is the no-install version for glibc. It changes
nothing elsewhere (macOS, musl, an LD_PRELOADed allocator ignores it), and a user's own
MALLOC_MMAP_THRESHOLD_ is left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc malloc.h
MMAP_THRESHOLD = 4 << 20  # 4 MiB: a loss chunk at V = 128K is 128 MiB, a decoder layer's inputs at 16K x 4K are 256 MiB

_applied: bool = False


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 -- absent on non-glibc C libraries
        return libc
    except (OSError, AttributeError):
        return None


def return_large_frees_to_os() -> bool:
    """Fix glibc's mmap threshold at 4 MiB for this process (once). True when it is in effect.

    Called by the CPU paths that free many large buffers: an uptraining step and a verification
    pass on the CPU. On a GPU the big tensors live in CUDA's caching allocator, not in malloc.
    """
    global _applied
    if _applied:
        return True
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:  # the user chose; glibc read it at start-up
        return False
    libc = _libc()
    if libc is None:
        return False
    _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return _applied


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS now (glibc's malloc_trim; a no-op elsewhere).

    Between calibration layers: without it each layer's freed buffers stay as heap fragments and
    the resident size creeps up by a few MB per layer although nothing is kept.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
