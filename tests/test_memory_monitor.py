"""The micro-batch follows the device's memory: MemoryMonitor readings, the budget they give, shrink and regrow mid-run."""
import jax
import numpy as np
import pytest

from framework import memory
from framework.config import MemoryConfig
from framework.train import Trainer
from tests.helpers import SMALLER, tiny_config

HEADROOM = 1_000_000
LIMIT = 10**12


class Reports(memory.MemoryMonitor):
    """A device that reports fixed figures (the framework's extension point, in place of memory_stats())."""

    def __init__(self, reading: memory.MemoryReading):
        self.reading = reading

    def read(self, devices):
        return self.reading


class FallingMemory(memory.MemoryMonitor):
    """Free memory well above the headroom, under it from read ``fall_at`` on, and back from read ``back_at``.

    The Trainer reads once at start (the budget), then once before each step: read n + 1 precedes step n.
    """

    def __init__(self, fall_at: int, back_at: int | None = None):
        self.fall_at, self.back_at, self.reads = fall_at, back_at, 0

    def read(self, devices):
        self.reads += 1
        low = self.fall_at <= self.reads and (self.back_at is None or self.reads < self.back_at)
        free = HEADROOM // 2 if low else LIMIT // 2
        return memory.MemoryReading(bytes_in_use=LIMIT - free, peak_bytes_in_use=LIMIT - free, bytes_limit=LIMIT)


def test_budget_is_free_memory_where_reported_else_capacity():
    auto = MemoryConfig(opt_state="auto")
    assert memory.MemoryReading(bytes_in_use=300, bytes_limit=1000).free == 700
    free = Reports(memory.MemoryReading(bytes_in_use=300, bytes_limit=1000))
    assert memory.resolve_budget(auto, jax.devices(), monitor=free) == 700
    assert memory.resolve_budget(auto, jax.devices(), monitor=Reports(memory.MemoryReading(bytes_limit=1000))) == 1000
    assert memory.resolve_budget(MemoryConfig(opt_state="auto", device_budget_bytes=5), jax.devices(), monitor=free) == 5


@pytest.mark.gpu
def test_monitor_reads_the_platforms_memory_stats():
    reading = memory.MemoryMonitor().read(jax.devices())
    stats = jax.devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:  # CPU reports nothing: no reading, no free memory
        assert reading == memory.MemoryReading() and reading.free is None
    else:
        assert 0 < reading.bytes_limit and 0 <= reading.free <= reading.bytes_limit
        assert reading.peak_bytes_in_use is None or reading.peak_bytes_in_use >= reading.bytes_in_use


def _run(monitor: memory.MemoryMonitor | None, *overrides):
    class Followed(Trainer):
        memory_monitor = monitor or memory.MemoryMonitor()

    tr = Followed(tiny_config("train.global_batch=16", *SMALLER, *overrides, steps=5))
    return tr, np.array([r["loss"] for r in tr.fit()])


@pytest.mark.slow
def test_micro_batch_shrinks_when_free_memory_falls_and_grows_back(capfd):
    follow = [f"memory.headroom_bytes={HEADROOM}", "train.micro_batch=16"]
    _, small = _run(None, "train.micro_batch=8")  # the smaller micro-batch throughout
    capfd.readouterr()

    tr, losses = _run(FallingMemory(fall_at=4), *follow)  # free memory falls before step 3
    log = capfd.readouterr().err
    assert tr.micro_batch == 8 and tr.cfg.train.grad_accum == 2
    assert (f"memory: step 3: micro-batch 16 -> 8 (grad_accum 1 -> 2, same global batch): free device memory "
            f"{HEADROOM // 2:,} B is under memory.headroom_bytes={HEADROOM:,}") in log
    assert log.count("memory: step") == 1
    np.testing.assert_allclose(losses, small, atol=1e-5, rtol=0)
    assert small[-1] < small[0]

    # down before step 2, room again from step 3: after 2 roomy steps (3, 4) it grows back for step 4
    tr, losses = _run(FallingMemory(fall_at=3, back_at=4), *follow, "memory.regrow_after_steps=2")
    log = capfd.readouterr().err
    assert "memory: step 2: micro-batch 16 -> 8" in log
    assert "memory: step 4: micro-batch 8 -> 16 (grad_accum 2 -> 1, same global batch): free device memory" in log
    assert tr.micro_batch == 16
    np.testing.assert_allclose(losses, small, atol=1e-5, rtol=0)


def test_headroom_keys_are_validated():
    from framework.config import ConfigError

    with pytest.raises(ConfigError, match=r"^memory.headroom_bytes=-1: expected a non-negative integer or null$"):
        tiny_config("memory.headroom_bytes=-1")
    with pytest.raises(ConfigError, match=r"^memory.regrow_after_steps=-2: expected a non-negative integer$"):
        tiny_config("memory.regrow_after_steps=-2")
