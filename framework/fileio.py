"""File I/O: positional reads and writes of numpy buffers, and the one atomic write of a small file.

The token store (framework/data/store.py) and the NVMe tier (framework/memory/nvme.py) both read with
``os.preadv`` straight into the caller's array, so no page of a file becomes this process's memory as a
mapping's touched pages would. Either call may move fewer bytes than asked (a signal, a pipe, a large
request): both loop until the buffer is done; a read that reaches the end of the file first is an error.
Small files that say what the others hold (a checkpoint's manifest, the token store's metadata, the NVMe
tier's marker, goodput.json, metrics.jsonl on resume, config.yaml, a Hugging Face export's index) are replaced
whole with ``atomic_write`` (``atomic_path`` for a writer that wants a file name); the run dir's lock is created
complete or not at all with ``create_new``.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np


class ShortRead(OSError):
    """The file ended before the buffer was filled (it is smaller than its layout says)."""


def read_into(fd: int, buf: np.ndarray, offset: int, name: object = "file") -> None:
    """Fill ``buf`` (contiguous) with the bytes of ``fd`` from ``offset``; ``name`` names the file in the error."""
    view = memoryview(buf).cast("B")
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise ShortRead(f"{name}: short read, the file ends at byte {offset} ({len(view)} bytes short)")
        view, offset = view[n:], offset + n


def write_all(fd: int, buf: np.ndarray, offset: int) -> None:
    """Write all of ``buf`` to ``fd`` at ``offset``."""
    view = memoryview(np.ascontiguousarray(buf)).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path beside ``path`` for a writer that wants a file name (safetensors' ``save_file``): what it wrote
    there is fsynced and renamed over ``path`` when the block ends, and removed if the block raises."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` so that a reader, a killed process or a power cut finds the old file or
    the new one, never a part: a temp file beside it (same filesystem, so the rename is atomic) is written,
    flushed and fsynced, ``os.replace``d over ``path``, and the directory fsynced so the rename is durable too.
    A failed write removes the temp file and raises the OS's error unchanged."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def create_new(path: str | os.PathLike, data: str | bytes) -> None:
    """Create ``path`` holding ``data`` in one step, or raise ``FileExistsError`` if it exists: the data goes to a
    temp file of this process's own (fsynced), which ``os.link`` then names ``path`` (link, unlike rename, fails
    on an existing name). A process killed at any point leaves no ``path``, or ``path`` complete; never an empty
    one. (The run dir's lock: framework/rundir.py.)"""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as e:  # a read-only or full run dir: the error names the file asked for, not the temp file
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
