"""Streaming checkpoint I/O: read one tensor at a time, write size-capped safetensors shards.

`TensorReader` memory-maps model.safetensors or the shards named by model.safetensors.index.json
and hands out one tensor at a time; pickle `.bin` weights are refused unless explicitly allowed
(then read with torch.load(weights_only=True, mmap=True)). `ShardWriter` accumulates tensors up to
a size cap, writes each shard straight from the tensors' memory (no serialisation copy), and at
the end names shards the Hugging Face way and writes the index — like mergekit's tensor_writer.
Tensors that are copied unchanged need not be loaded at all: `TensorReader.location` says where
a tensor's bytes lie and `ShardWriter.add_raw` moves them file to file inside the kernel
(os.copy_file_range), which is what keeps `convert` close to the speed of a plain file copy.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .errors import CheckpointError
from .units import parse_size

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"

# safetensors dtype codes <-> torch dtypes (the subset checkpoints use).
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
DTYPE_CODES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorBytes:
    """Where one tensor's raw bytes lie inside a safetensors file."""

    path: Path
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def weight_files(folder: Path) -> list[str]:
    """Names of the weight files a checkpoint folder holds (safetensors preferred)."""
    return [n for n in (SAFE_INDEX, SAFE_SINGLE, PICKLE_INDEX, PICKLE_SINGLE) if (folder / n).exists()]


class TensorReader:
    """Lazy, one-tensor-at-a-time access to a checkpoint folder's weights.

    safetensors files are validated by the safetensors library when opened, then each tensor
    is read with one positioned read into its own buffer: nothing stays mapped, so resident
    memory holds only the tensors in flight, whatever the model's size.

    Args:
        folder: a Hugging Face checkpoint folder.
        allow_pickle: read pytorch_model*.bin (weights_only, mmap) when there is no safetensors.
    Raises:
        CheckpointError: no weights, a shard the index names is missing, a truncated or corrupt
            file, or pickle weights without allow_pickle.
    """

    def __init__(self, folder: Union[str, Path], allow_pickle: bool = False):
        self.folder = Path(folder)
        self.pickle = False
        self._loaded: tuple[Optional[str], dict] = (None, {})
        if (self.folder / SAFE_INDEX).exists():
            self.weight_map: Optional[dict[str, str]] = _read_index(self.folder / SAFE_INDEX)
        elif (self.folder / SAFE_SINGLE).exists():
            self.weight_map = None
        elif (self.folder / PICKLE_INDEX).exists() or (self.folder / PICKLE_SINGLE).exists():
            if not allow_pickle:
                raise CheckpointError(
                    f"{self.folder} holds only pickle weights (pytorch_model*.bin), which can run code when "
                    "loaded; pass --allow-pickle (allow_pickle=True) to read them with weights_only=True"
                )
            self.pickle = True
            self.weight_map = _read_index(self.folder / PICKLE_INDEX) if (self.folder / PICKLE_INDEX).exists() else None
        else:
            raise CheckpointError(
                f"no weights in {self.folder}: expected model.safetensors or model.safetensors.index.json"
            )
        single = PICKLE_SINGLE if self.pickle else SAFE_SINGLE
        self.files = sorted(set(self.weight_map.values())) if self.weight_map else [single]
        for name in self.files:
            if not (self.folder / name).is_file():
                raise CheckpointError(f"shard {name} named in the index is missing from {self.folder}")
        # name -> (file, dtype, shape, absolute byte offset or None for pickle)
        self._info: dict[str, tuple[str, torch.dtype, tuple[int, ...], Optional[int]]] = {}
        for f in self.files:
            if self.pickle:
                for key, t in self._pickle_shard(f).items():
                    self._info[key] = (f, t.dtype, tuple(t.shape), None)
            else:
                for key, (dtype, shape, start) in _safetensors_header(self.folder / f).items():
                    self._info[key] = (f, dtype, shape, start)
        if self.weight_map:
            for key, f in self.weight_map.items():
                if key not in self._info or self._info[key][0] != f:
                    raise CheckpointError(f"the index puts tensor {key} in {f}, but {f} does not hold it")
        self._fds: dict[str, int] = {}

    def _pickle_shard(self, file: str) -> dict:
        """One pickle shard's state dict, memory-mapped; only one is kept open at a time."""
        if self._loaded[0] != file:
            try:
                sd = torch.load(self.folder / file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # unpickling errors come in many types
                raise CheckpointError(f"cannot read {self.folder / file}: {str(err).splitlines()[0]}") from None
            self._loaded = (file, sd)
        return self._loaded[1]

    def names(self) -> list[str]:
        """Tensor names, shard by shard, in file order."""
        return list(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def file_of(self, name: str) -> str:
        return self._info[name][0]

    def dtype_shape(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._info[name][1], self._info[name][2]

    def nbytes(self, name: str) -> int:
        _, dtype, shape, _ = self._info[name]
        return math.prod(shape) * torch.empty((), dtype=dtype).element_size()

    def location(self, name: str) -> Optional[TensorBytes]:
        """Where the tensor's bytes lie on disk, for a raw copy; None for pickle weights."""
        f, _, _, start = self._info[name]
        if self.pickle or start is None:
            return None
        return TensorBytes(self.folder / f, start, self.nbytes(name))

    def get(self, name: str) -> Tensor:
        """One tensor, as stored (dtype and bytes untouched), in its own memory."""
        f, dtype, shape, start = self._info[name]
        if self.pickle:
            return self._pickle_shard(f)[name].contiguous().clone()  # own storage: no shared views
        out = torch.empty(shape, dtype=dtype)
        n = out.numel() * out.element_size()
        if n == 0:
            return out
        if f not in self._fds:
            self._fds[f] = os.open(self.folder / f, os.O_RDONLY)
        assert start is not None  # every safetensors tensor has an offset; only pickle ones lack it
        # numpy's stubs declare the buffer protocol (__buffer__) only for Python >= 3.12
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
        got = os.preadv(self._fds[f], [buf], start)
        if got != n:
            raise CheckpointError(f"{self.folder / f} ended early while reading {name}; the file is truncated")
        return out

    def items(self) -> Iterator[tuple[str, Tensor]]:
        for name in self.names():
            yield name, self.get(name)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._loaded = (None, {})

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_index(path: Path) -> dict[str, str]:
    try:
        wm = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is not a valid shard index ({err})") from None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{path} has an empty weight_map")
    return wm


def _safetensors_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
    """name -> (dtype, shape, absolute data offset); the file is validated by safetensors first."""
    try:
        with safe_open(str(path), framework="pt"):  # checks the header and that the data is all there
            pass
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except (SafetensorError, OSError, ValueError, struct.error) as err:
        raise CheckpointError(f"{path.name} is truncated or corrupt ({err}); re-download it") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise CheckpointError(f"{path.name}: tensor {name} has dtype {info['dtype']}, which is not supported")
        out[name] = (DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + info["data_offsets"][0])
    return out


# --- writing -----------------------------------------------------------------------------------


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _header_bytes(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Optional[dict]) -> bytes:
    """The safetensors header (length prefix + JSON, padded to 8 bytes) for tensors in this order."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data start to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def _write_data(fh, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    if t.numel():
        # numpy's stubs declare the buffer protocol (__buffer__) only for Python >= 3.12
        fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]


def _write_all(fd: int, data) -> None:
    """os.write until every byte is out (one write() moves at most ~2 GiB on Linux)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


# Errors that mean "this way of copying is not available here", not "the copy failed":
# cross-filesystem (EXDEV, kernels >= 5.19 and < 5.3), no syscall, a filesystem that does not
# support it, or (macOS sendfile) a destination that is not a socket.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOTSOCK}
BOUNCE_BYTES = 64 * 2**20  # the fallback's reused buffer: at most this, at most the largest raw copy


class RangeCopier:
    """Append byte ranges of source files to an output fd without loading them as tensors.

    Tries os.copy_file_range (bytes stay in the kernel), then os.sendfile, then one reused
    buffer; a way that turns out unavailable is not tried again. The output fd's own file
    position is used and advanced, so it interleaves with plain os.write calls.
    """

    def __init__(self) -> None:
        self.ways = [w for w in ("copy_file_range", "sendfile") if hasattr(os, w)] + ["buffer"]
        self._fds: dict[Path, int] = {}
        self._buf: Optional[bytearray] = None

    @property
    def buffer_bytes(self) -> int:
        return len(self._buf) if self._buf is not None else 0

    def copy(self, dst_fd: int, src: Path, offset: int, nbytes: int) -> None:
        if src not in self._fds:
            self._fds[src] = os.open(src, os.O_RDONLY)
        fd, done = self._fds[src], 0
        while done < nbytes:
            way = self.ways[0]
            try:
                n = self._step(way, fd, dst_fd, offset + done, nbytes - done)
            except OSError as err:
                if way == "buffer" or err.errno not in _NO_KERNEL_COPY:
                    raise
                n = -1
            if n > 0:
                done += n
                continue
            if n == 0 and (way == "buffer" or os.fstat(fd).st_size < offset + nbytes):
                raise CheckpointError(f"{src} ended early while copying a tensor; the file is truncated")
            self.ways.pop(0)  # n == -1, or 0 from a filesystem that will not copy this way

    def _step(self, way: str, src_fd: int, dst_fd: int, offset: int, count: int) -> int:
        """Copy up to count bytes at offset; bytes moved (0 = nothing moved)."""
        if way == "copy_file_range":
            return os.copy_file_range(src_fd, dst_fd, count, offset)
        if way == "sendfile":
            return os.sendfile(dst_fd, src_fd, offset, count)
        if self._buf is None or len(self._buf) < min(count, BOUNCE_BYTES):
            self._buf = bytearray(min(count, BOUNCE_BYTES))
        view = memoryview(self._buf)[: min(count, BOUNCE_BYTES)]
        n = os.preadv(src_fd, [view], offset)
        _write_all(dst_fd, view[:n])
        return n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._buf = None


def write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: Optional[dict] = None) -> None:
    """Write a .safetensors file straight from the tensors' memory (no serialisation copy)."""
    with open(path, "wb") as fh:
        fh.write(_header_bytes([(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], metadata))
        for t in tensors.values():
            _write_data(fh, t)


class ShardWriter:
    """Write tensors into size-capped safetensors shards, then name and index them.

    Without a plan, tensors accumulate up to max_shard_size and each full shard is flushed
    (memory: one shard). With a plan — every (name, dtype, shape) in the order they will be
    added — shard headers are known up front and each tensor is written to disk the moment it
    arrives (memory: one tensor), which is how `convert` uses it. A planned writer also takes
    tensors as byte ranges of source files (`add_raw`), copied without loading them.
    Single shard -> model.safetensors; several -> model-0000X-of-0000N.safetensors plus
    model.safetensors.index.json with metadata.total_size. Shards carry metadata {"format": "pt"}.
    """

    def __init__(
        self,
        folder: Union[str, Path],
        max_shard_size: Union[int, str] = "5GB",
        plan: Optional[list[tuple[str, torch.dtype, tuple[int, ...]]]] = None,
    ):
        self.folder = Path(folder)
        self.max_bytes = parse_size(max_shard_size)
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []  # tensor names per shard
        self.total_size = 0
        self.max_pending = 0  # most tensor bytes held at once (for the peak-memory claim)
        self.plan: Optional[list[tuple[str, torch.dtype, tuple[int, ...]]]] = None
        self.copier = RangeCopier()
        if plan is not None:
            self.plan = list(plan)
            self._groups = self._assign(self.plan)
            self._next = 0  # index into plan
            self._fh: Optional[BinaryIO] = None

    def _assign(self, plan) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
        """Greedy shard assignment, the same rule as the accumulating mode."""
        groups: list[list] = [[]]
        size = 0
        for name, dtype, shape in plan:
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if groups[-1] and size + n > self.max_bytes:
                groups.append([])
                size = 0
            groups[-1].append((name, dtype, tuple(shape)))
            size += n
        return groups

    def add(self, name: str, tensor: Tensor) -> None:
        n = tensor.numel() * tensor.element_size()
        if self.plan is not None:
            self._add_planned(name, tensor)
            self.total_size += n
            self.max_pending = max(self.max_pending, n)
            return
        if self.pending and self.pending_bytes + n > self.max_bytes:
            self.flush()
        self.pending[name] = tensor
        self.pending_bytes += n
        self.total_size += n
        self.max_pending = max(self.max_pending, self.pending_bytes)

    def add_raw(
        self,
        name: str,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        src_path: Union[str, Path],
        offset: int,
        nbytes: int,
    ) -> None:
        """Add a tensor as the nbytes at offset in src_path (a safetensors tensor's raw bytes),
        copied file to file without loading it; planned writers only. Bytes are kept exactly."""
        if self.plan is None:
            raise CheckpointError(f"tensor {name}: raw copies need a write plan (ShardWriter(..., plan=...))")
        want = _nbytes(dtype, shape)
        if nbytes != want:
            raise CheckpointError(f"tensor {name} {dtype} {tuple(shape)} is {want} bytes, not {nbytes}")
        fd = self._open_planned(name, dtype, shape)
        self.copier.copy(fd, Path(src_path), offset, nbytes)
        self._done_planned(name)
        self.total_size += nbytes
        self.max_pending = max(self.max_pending, self.copier.buffer_bytes)

    def _add_planned(self, name: str, tensor: Tensor) -> None:
        fd = self._open_planned(name, tensor.dtype, tuple(tensor.shape))
        t = tensor.detach().cpu().contiguous()
        if t.numel():
            _write_all(fd, t.reshape(-1).view(torch.uint8).numpy())
        self._done_planned(name)

    def _open_planned(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> int:
        """Check the tensor is the plan's next one; the fd of its shard (opened with its header)."""
        assert self.plan is not None  # callers (add, add_raw) have checked the writer is planned
        if self._next >= len(self.plan):
            raise CheckpointError(f"tensor {name} was not in the write plan")
        want = self.plan[self._next]
        if (name, dtype, tuple(shape)) != want:
            raise CheckpointError(
                f"tensor {name} {dtype} {tuple(shape)} arrived where the plan expected {want[0]} {want[1]} {want[2]}"
            )
        if self._fh is None:  # first tensor of the next shard: open it and write its header
            k = len(self.shards)
            self._fh = open(self._tmp_name(k), "wb", buffering=0)  # unbuffered: raw copies share the fd
            header = _header_bytes(self._groups[k], {"format": "pt"})
            _write_all(self._fh.fileno(), header)
            self._end = len(header) + sum(_nbytes(d, s) for _, d, s in self._groups[k])  # checked at close
            self.shards.append([])
        return self._fh.fileno()

    def _done_planned(self, name: str) -> None:
        self.shards[-1].append(name)
        self._next += 1
        if len(self.shards[-1]) == len(self._groups[len(self.shards) - 1]):
            assert self._fh is not None  # opened by _open_planned for this shard
            size = os.fstat(self._fh.fileno()).st_size
            self._fh.close()
            self._fh = None
            if size != self._end:  # a header's offsets must match the data that follows it
                raise CheckpointError(f"shard {len(self.shards)} is {size} bytes, its header says {self._end}")

    def flush(self) -> None:
        if self.plan is not None or not self.pending:
            return
        write_safetensors(self._tmp_name(len(self.shards)), self.pending, {"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def _tmp_name(self, k: int) -> Path:
        return self.folder / f"shard-{k:05d}.safetensors.partial"

    def close(self) -> None:
        """Close an open shard file (after an error; the folder is then discarded)."""
        if self.plan is not None and self._fh is not None:
            self._fh.close()
            self._fh = None
        self.copier.close()

    def finish(self) -> list[str]:
        """Flush, rename the shards and write the index; returns the weight file names."""
        self.flush()
        if self.plan is not None and self._next != len(self.plan):
            self.close()
            raise CheckpointError(f"only {self._next} of {len(self.plan)} planned tensors were written")
        n = len(self.shards)
        self.copier.close()
        if n == 0:
            raise CheckpointError("no tensors were written")
        if n == 1:
            os.replace(self._tmp_name(0), self.folder / SAFE_SINGLE)
            return [SAFE_SINGLE]
        names, weight_map = [], {}
        for k, tensors in enumerate(self.shards):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self._tmp_name(k), self.folder / final)
            names.append(final)
            weight_map.update({t: final for t in tensors})
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names + [SAFE_INDEX]
