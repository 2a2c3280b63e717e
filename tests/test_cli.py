"""Command lines: key=value overrides anywhere among the flags, in every script that takes them."""
import importlib
import sys

import pytest

from tests.helpers import ROOT


def _script(name):
    path = ROOT / "scripts" / name  # scripts/bench/ holds the benchmarks
    sys.path.insert(0, str(path.parent))
    try:
        return importlib.import_module(path.name)
    finally:
        sys.path.remove(str(path.parent))


@pytest.mark.parametrize("name, flags", [
    ("train", ["--config", "C", "a=1", "--run-dir", "D", "b=2"]),
    ("plan", ["--config", "C", "a=1", "--devices", "16", "b=2"]),
    ("bench/bench", ["--config", "C", "a=1", "--steps", "3", "b=2"]),
    ("bench/bench_tryrun", ["--config", "C", "a=1", "--run-dir", "D", "b=2"]),
])
def test_overrides_anywhere(name, flags):
    args = _script(name).parse_args(flags)
    assert args.overrides == ["a=1", "b=2"]
