"""Small files written whole or not at all: a temporary file beside the target, then a rename."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any, Union


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_small_text(path: Union[str, Path], limit: int = 16 << 20) -> str:
    """The text of a run record or state file. A device, FIFO or folder in its place (a symlink to
    /dev/zero was read until the kernel killed the process) or a file past `limit` is an OSError,
    so callers' existing `except OSError` turns it into their one line."""
    path = Path(path)
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    if st.st_size > limit:
        raise OSError(errno.EFBIG, f"{st.st_size >> 20} MB, larger than any run record", str(path))
    return path.read_text()


def write_bytes_atomic(path: Union[str, Path], data: bytes) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a model folder's files are for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Union[str, Path], text: str) -> Path:
    """Write `text` (UTF-8) so that readers see the old file or the new one, never a part."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Union[str, Path], data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def temp_dir_beside(final: Union[str, Path], kind: str = "tmp") -> Path:
    """An empty folder `.NAME.KIND-XXXX` beside `final`, with the modes a normal mkdir gives
    (mkdtemp makes 0700: a converted model must be readable by a serving container)."""
    final = Path(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{kind}-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def stale_temp_dirs(final: Union[str, Path]) -> list[Path]:
    """Temp folders an interrupted writer of `final` left (`.NAME.tmp-*`, `.NAME.old-*`). Only
    meaningful while holding `final`'s FolderLock: then no live writer owns them."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    return sorted(p for kind in ("tmp", "old") for p in final.parent.glob(f".{final.name}.{kind}-*") if p.is_dir())


def remove_stale_temp_dirs(final: Union[str, Path], log=None) -> list[Path]:
    import shutil

    removed = stale_temp_dirs(final)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
        if log:
            log(f"removed {p.name}, the partial output of an interrupted run")
    return removed


def raise_if_disk_full(path: Union[str, Path], err: BaseException) -> None:
    """A writer outside Python's I/O (torch.save's zip writer) reports a full disk as an opaque
    error: raise OSError(ENOSPC) naming PATH instead when its file system has (almost) no space left."""
    import errno
    import shutil

    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return
    if free < 16 << 20:  # what a failed write leaves on a full disk (the partial file still holds its space)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err


class FolderLock:
    """An exclusive lock on writing FOLDER: `.NAME.lock` beside it, flock'ed, holding the pid.

    flock is released by the kernel when its holder dies, so a killed run never leaves a lock
    that blocks the next one; the file is removed on release. A second writer fails at once with
    one line naming the holder.
    """

    def __init__(self, folder: Union[str, Path], what: str = "output"):
        self.folder = Path(folder)
        self.path = self.folder.parent / f".{self.folder.name}.lock"
        self.what = what
        self._fd: Any = None
        self._created: list[Path] = []

    def probe(self) -> None:
        """Fail now if another run holds the lock (before long work such as calibration); takes nothing."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return  # no lock file: nobody holds it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            self._busy(fd)
        finally:
            os.close(fd)

    def _busy(self, fd: int):
        from .errors import OutputError

        holder = " ".join(os.pread(fd, 128, 0).decode(errors="replace").split()) or "?"
        raise OutputError(
            f"{self.what} {self.folder} is being written by another gqa-convert run (pid {holder[:80]}); "
            "wait for it to finish or stop it, or choose another folder"
        ) from None

    def __enter__(self) -> "FolderLock":
        import fcntl

        self._created = []  # parents this lock created: removed again on release if still empty
        p = self.folder.parent
        while not p.exists() and p != p.parent:
            self._created.append(p)
            p = p.parent
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    self._busy(fd)
                finally:
                    os.close(fd)
            # The file may have been unlinked by a holder releasing it between our open and flock.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        # "PID on HOST": a pid alone names nobody when the folder is on a file system several machines share.
        os.write(fd, f"{os.getpid()} on {socket.gethostname()[:60]}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        import fcntl

        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        for d in self._created:  # a refused run leaves no empty folders behind
            try:
                d.rmdir()
            except OSError:
                break


def share_modes(folder: Union[str, Path]) -> None:
    """Give the files and folders under FOLDER the modes a plain `open`/`mkdir` gives under the
    umask (0644/0755 usually): safetensors' writer creates 0600 files, which another user or a
    serving container could not read."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)
