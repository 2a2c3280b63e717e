"""Run a script and SIGKILL it at the moment it is about to change one named file (a test hook of the tests).

    MESHPILOT_KILL_AT=metrics.jsonl python tests/killed.py scripts/train.py --config ... [args]

An audit hook (``sys.addaudithook``: the interpreter's own events, nothing of meshpilot's is replaced) kills the
process with SIGKILL at the first operation that would change the file named by ``MESHPILOT_KILL_AT`` (its base
name): an open for writing that truncates or creates it (``w``/``x`` modes, ``O_CREAT``/``O_TRUNC`` flags;
appending is not a change of what is there), or a rename or hard link onto it. Audit events come before the call,
so for an open the hook first does what the open would (creates or truncates the file) and then kills: the process
dies just after its open returned. That is the worst moment for either way of writing a file: an in-place rewrite
dies with the file empty, an atomic write with its new content complete in the temp file and the old file in place.
"""
from __future__ import annotations

import os
import runpy
import signal
import sys


def _changes(event: str, args: tuple, target: str) -> bool:
    """Whether the event changes ``target``; an open that does is done here (create, truncate) before the kill."""
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int) or path is None or os.path.basename(os.fsdecode(path)) != target:
            return False
        truncates = "w" in mode if mode is not None else bool(flags & os.O_TRUNC)
        creates = "x" in mode if mode is not None else bool(flags & os.O_CREAT) and bool(flags & (os.O_WRONLY | os.O_RDWR))
        if truncates or creates:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncates else 0), 0o644))
        return truncates or creates
    if event in ("os.rename", "os.link"):
        return os.path.basename(os.fsdecode(args[1])) == target
    return False


def main() -> None:
    target = os.environ["MESHPILOT_KILL_AT"]
    busy: list = []

    def hook(event: str, args: tuple) -> None:
        if busy:  # the hook's own open of the target
            return
        busy.append(True)
        if _changes(event, args, target):
            sys.stderr.write(f"killed.py: SIGKILL at {event} {args[:2]}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        busy.clear()

    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    sys.addaudithook(hook)
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
