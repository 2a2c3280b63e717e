"""The benchmarks' one timing and output helper: time a block or repeated calls, their spread, the JSON report.

Importing it also puts scripts/ on ``sys.path``, so a benchmark here imports ``_cli`` (emulated devices,
one-line errors) as the scripts in scripts/ do: import this module first. It imports no jax, so a
benchmark can still set ``XLA_FLAGS`` afterwards (``_cli.emulate_cpu_devices``).
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class Stopwatch:
    """Seconds of a ``with timed()`` block; set when the block ends."""

    seconds: float = 0.0


@contextmanager
def timed() -> Iterator[Stopwatch]:
    """``with timed() as t: ...`` then ``t.seconds``: wall seconds of the block (``time.perf_counter``)."""
    watch, start = Stopwatch(), time.perf_counter()
    try:
        yield watch
    finally:
        watch.seconds = time.perf_counter() - start


def repeat(fn: Callable[[], object], n: int, warmup: int = 0) -> list[float]:
    """Seconds of each of ``n`` calls of ``fn()`` after ``warmup`` untimed ones. ``fn`` waits for its own
    work (``jax.block_until_ready``): a time is then the work's, not only its dispatch."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(n):
        with timed() as t:
            fn()
        seconds.append(t.seconds)
    return seconds


def spread(seconds: list[float], digits: int | None = None) -> dict[str, float]:
    """median / min / max / mean of repeated timings (``framework.metrics.summarize``, which the Trainer's
    step clock reports with too), rounded to ``digits`` when given."""
    from framework.metrics import summarize  # the repo root is on sys.path once _cli is imported

    out = summarize(seconds)
    return out if digits is None else {k: round(v, digits) for k, v in out.items()}


def print_json(report: dict, indent: int | None = None) -> None:
    """The report on stdout as JSON (one line unless ``indent``), flushed: a caller may read it line by line."""
    print(json.dumps(report, indent=indent), flush=True)


def trainer_step_times(cfg, steps: int, warmup: int = 2):
    """(trainer, ``spread`` of ``steps`` train steps after ``warmup``, compile seconds): the framework's compiled step
    on one fixed batch, from a fresh ``Trainer(cfg)`` (the benchmarks that time a config's step use this)."""
    import jax

    from framework.train import Trainer

    tr = Trainer(cfg)
    state, batch = tr.init_state(), tr.loader.batch(0)
    with timed() as compiled:
        tr.compile()

    def step() -> None:
        nonlocal state
        state, metrics = tr.step(state, batch)
        jax.block_until_ready(metrics)

    return tr, spread(repeat(step, steps, warmup=warmup)), compiled.seconds
