"""Positional file I/O into and out of numpy buffers: read exactly a buffer's bytes at an offset, write all of one.

The token store (framework/data/store.py) and the NVMe tier (framework/memory/nvme.py) both read with
``os.preadv`` straight into the caller's array, so no page of a file becomes this process's memory as a
mapping's touched pages would. Either call may move fewer bytes than asked (a signal, a pipe, a large
request): both loop until the buffer is done; a read that reaches the end of the file first is an error.
"""
from __future__ import annotations

import os

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
