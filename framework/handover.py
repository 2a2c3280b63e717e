"""The elastic launcher's hand-over: a process that needs more devices than its job has asks the launcher to wait.

A job started by ``scripts/launch_local.py --elastic`` has ``MESHPILOT_LAUNCHER_REQUEST`` naming a file. A
process that cannot start (one model replica needs more devices than the job holds) writes what it needs there,
``{"need_devices": N, "have_devices": M, "reason": "..."}``, and exits with ``NEED_CAPACITY_EXIT_CODE``; the
launcher waits up to ``--wait-timeout`` for its capacity file to give enough process slots, then restarts the
job on them. Imports neither jax nor numpy: the launcher reads it too.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

LAUNCHER_REQUEST_ENV = "MESHPILOT_LAUNCHER_REQUEST"
NEED_CAPACITY_EXIT_CODE = 75  # sysexits' EX_TEMPFAIL: try again later (with more capacity)


def request_path() -> Path | None:
    """The file this process's launcher reads a request from; None when no elastic launcher started it."""
    path = os.environ.get(LAUNCHER_REQUEST_ENV)
    return Path(path) if path else None


def write_request(path: Path, need_devices: int, have_devices: int, reason: str) -> None:
    """Ask for ``need_devices`` devices in all (the job holds ``have_devices``), saying why; written whole,
    since the launcher reads it once the process is gone."""
    # numpy (fileio's) is imported here, not where the launcher only reads
    from framework.fileio import atomic_write

    atomic_write(path, json.dumps({"need_devices": need_devices, "have_devices": have_devices, "reason": reason}))


def read_request(path: Path) -> dict | None:
    """The request a process left, or None (none, or unreadable)."""
    try:
        request = json.loads(path.read_text())
        return request if isinstance(request.get("need_devices"), int) else None
    except (OSError, ValueError, AttributeError):
        return None
