"""Shared start-up for the scripts: emulated CPU devices before jax loads, one-line errors."""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def emulate_cpu_devices(n: int) -> None:
    """Give the CPU platform ``n`` devices (harmless where a GPU/TPU is the default backend).

    Must run before a JAX backend starts; an explicit flag already in XLA_FLAGS wins.
    """
    if n < 1:
        print(f"error: --cpu-devices={n}: expected at least 1", file=sys.stderr)
        sys.exit(2)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


# Filesystem failures the user must fix (disk full, quota, permissions, read-only): not bugs, so no traceback.
USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def filesystem_error(e: BaseException) -> str | None:
    """One line for a user-fixable filesystem failure anywhere in ``e``'s chain, else None.

    orbax and tensorstore re-raise such failures as other exception types, keeping only the
    OS's message (``... "PATH": ... No space left on device``), so the chain and the text are searched.
    """
    found, seen, stack = [], set(), [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in USER_ERRNOS:
            found.append(f"{x.strerror}: {x.filename}" if x.filename else x.strerror)
        elif (message := _filesystem_message(str(x))) is not None:
            found.append(message)
        stack += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]
    named = [m for m in found if ": " in m]  # one that names its path (a failed close names none)
    return (named or found or [None])[0]


def _filesystem_message(text: str) -> str | None:
    """``strerror: path`` from a message that quotes the OS's words, e.g. tensorstore's write errors."""
    for n in USER_ERRNOS:
        for line in text.splitlines():
            if os.strerror(n) in line:
                paths = re.findall(r'"(/[^"]*)"', line)
                return f"{os.strerror(n)}: {paths[-1]}" if paths else line.strip()
    return None


class _QuietFilesystemErrors(logging.Filter):
    """Drops orbax's logged tracebacks of filesystem failures: ``user_errors`` reports them in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return _filesystem_message(record.getMessage()) is None and (error is None or filesystem_error(error) is None)


logging.getLogger("absl").addFilter(_QuietFilesystemErrors())


@contextmanager
def user_errors():
    """Errors the user can fix end the script with one ``error: ...`` line and exit code 2, no traceback.

    Config and input errors (``ConfigError``), and a full disk or a read-only or forbidden path.
    Anything else is a bug and keeps its traceback.
    """
    from framework.config import ConfigError

    sys.unraisablehook = _without_closed_loop_noise(sys.unraisablehook)
    try:
        yield
    except ConfigError as e:
        _exit_quietly(f"error: {e}")
    except Exception as e:
        message = filesystem_error(e)
        if message is None:
            raise
        _exit_quietly(f"error: {message}")


def _without_closed_loop_noise(hook):
    """``sys.unraisablehook`` minus "RuntimeError: Event loop is closed", which tensorstore's callbacks
    report dozens at a time when an orbax save fails and orbax has closed the loop they call back to."""
    def unraisablehook(unraisable):
        if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"):
            hook(unraisable)

    return unraisablehook


def _exit_quietly(line: str) -> None:
    """Print ``line``, exit 2, and keep orbax's unfinished background work from printing at exit.

    An error raised while orbax has async work pending leaves coroutines that the interpreter
    reports one by one at shutdown ("Exception ignored in: <coroutine ...>", "Event loop is closed"), and
    asyncio logs each failed write task it collects ("Task exception was never retrieved").
    """
    print(line, file=sys.stderr, flush=True)
    sys.unraisablehook = lambda _: None
    logging.getLogger("asyncio").disabled = True
    sys.exit(2)


def print_report(report: dict, as_json: bool, print_text) -> None:
    """The script's report on stdout: JSON for machines (``--json``), else ``print_text(report)``."""
    if as_json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print_text(report)
