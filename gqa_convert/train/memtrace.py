"""Deterministic tensor-memory accounting on any device, CPU included (torch has no CPU memory stats).

    with TensorMemory() as mem:
        loss = f(x); loss.backward()
    mem.peak_bytes, mem.largest_numel

Every aten op run inside the block (forward and backward: CPU autograd runs on the calling thread)
passes through `__torch_dispatch__`. A storage is counted from the op that allocates it until the
last tensor viewing it is freed (weakref finalizers; torch keeps a tensor's Python object alive as
long as autograd holds it). Tensors that existed before the block (weights) are not counted, and
neither are a kernel's private scratch buffers, so this is a floor on what the allocator sees --
exact for the question it answers in the tests: is a [T, V] tensor ever created, and how many
bytes of tensors are alive at once.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemory(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage data_ptr -> [bytes, tensors viewing it]
        self.current = 0
        self.peak_bytes = 0
        self.largest_numel = 0
        self.largest_op = ""

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= self.live.pop(key)[0]

    def _watch(self, t: torch.Tensor, key: int) -> None:
        self.live[key][1] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = tree_flatten((args, kwargs))[0]
        inputs = {a.untyped_storage().data_ptr() for a in flat if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            key = t.untyped_storage().data_ptr()
            if key in self.live:  # a view (or in-place result) of a storage made inside the block
                self._watch(t, key)
                continue
            if key in inputs or key == 0:  # a view of a tensor from before the block; or empty
                continue
            if t.numel() > self.largest_numel:
                self.largest_numel, self.largest_op = t.numel(), str(func)
            nbytes = t.untyped_storage().nbytes()
            self.live[key] = [nbytes, 0]
            self.current += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current)
            self._watch(t, key)
        return out
