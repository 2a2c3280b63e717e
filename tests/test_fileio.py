"""framework/fileio.py's atomic_write: the one temp-file-then-replace write (manifest, metadata, NVMe marker, goodput)."""
import errno
import os

import pytest

from framework import fileio


def test_atomic_write_replaces_whole_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    fileio.atomic_write(path, "old")
    fileio.atomic_write(path, b"new bytes")
    assert path.read_bytes() == b"new bytes" and os.listdir(tmp_path) == ["state.json"]

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.os, "fsync", full_disk)
    with pytest.raises(OSError) as e:
        fileio.atomic_write(path, "never seen")
    assert e.value.errno == errno.ENOSPC and e.value.filename is None  # unchanged: the caller names its file
    assert path.read_text() == "new bytes" and os.listdir(tmp_path) == ["state.json"]
