"""Shared start-up for the scripts: emulated CPU devices before jax loads, one-line errors."""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def emulate_cpu_devices(n: int) -> None:
    """Give the CPU platform ``n`` devices (harmless where a GPU/TPU is the default backend).

    Must run before jax is imported; an explicit flag already in XLA_FLAGS wins.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


@contextmanager
def user_errors():
    """Config and input errors end the script with ``error: ...`` and exit code 2, no traceback."""
    from framework.config import ConfigError

    try:
        yield
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def print_report(report: dict, as_json: bool, print_text) -> None:
    """The script's report on stdout: JSON for machines (``--json``), else ``print_text(report)``."""
    if as_json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print_text(report)
