"""Memory tiers, the monitor: the devices' memory state while training runs, and the budget it gives.

``MemoryMonitor.read`` turns ``device.memory_stats()`` (bytes in use, peak, limit, where the
platform reports them: GPU/TPU; CPU reports nothing) into a ``MemoryReading`` of the tightest
local device. The Trainer reads it before every step: when free memory falls under
``memory.headroom_bytes`` it shrinks the micro-batch, and grows it back after
``memory.regrow_after_steps`` steps with room. Subclass ``read`` for research (or tests: a
monitor whose free memory falls mid-run) and assign an instance to ``Trainer.memory_monitor``. Each logged step
records its reading and ``host_memory``, the process's resident host memory (framework/train/segment.py).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax

from framework.config import ConfigError, MemoryConfig
from framework.memory.policy import has_auto


@dataclasses.dataclass(frozen=True)
class MemoryReading:
    """One device's memory state in bytes; None where the platform does not report it."""

    bytes_in_use: int | None = None
    peak_bytes_in_use: int | None = None
    bytes_limit: int | None = None

    @property
    def free(self) -> int | None:
        if self.bytes_limit is None or self.bytes_in_use is None:
            return None
        return self.bytes_limit - self.bytes_in_use


class MemoryMonitor:
    """Reads the local devices' memory state; override ``read`` to supply another signal."""

    def read(self, devices: Sequence[jax.Device]) -> MemoryReading:
        """The local device with the least free memory (or, where only a limit is known, the smallest limit)."""
        readings = []
        for device in devices:
            if device.process_index != jax.process_index():  # only local devices report memory_stats
                continue
            stats = device.memory_stats() or {}
            readings.append(MemoryReading(*(int(stats[k]) if k in stats else None
                                            for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit"))))
        if not readings:
            return MemoryReading()
        with_free = [r for r in readings if r.free is not None]
        if with_free:
            return min(with_free, key=lambda r: r.free)
        with_limit = [r for r in readings if r.bytes_limit is not None]
        return min(with_limit, key=lambda r: r.bytes_limit) if with_limit else readings[0]


def host_memory() -> tuple[int | None, int | None]:
    """This process's resident host memory now and at its peak, in bytes (VmRSS and VmHWM; None off Linux)."""
    try:
        fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
        return tuple(int(fields[k].split()[0]) * 1024 if k in fields else None for k in ("VmRSS", "VmHWM"))
    except (OSError, ValueError):
        return None, None


def needs_budget(cfg: MemoryConfig, micro_batch: Any = None) -> bool:
    return has_auto(cfg) or micro_batch == "auto"


def resolve_budget(cfg: MemoryConfig, devices: Sequence[jax.Device] | None, micro_batch: Any = None,
                   monitor: MemoryMonitor | None = None) -> int | None:
    """Bytes per device that ``auto`` placement and ``train.micro_batch=auto`` may use.

    ``memory.device_budget_bytes`` if set; else free memory where the platform reports bytes in
    use and a limit (GPU/TPU), the capacity where it reports only a limit; an error if ``auto``
    needs a budget and the platform reports neither (CPU).
    """
    if cfg.device_budget_bytes is not None:
        return cfg.device_budget_bytes
    reading = (monitor or MemoryMonitor()).read(devices or ())
    budget = reading.free if reading.free is not None else reading.bytes_limit
    if budget is None and needs_budget(cfg, micro_batch):
        platform = devices[0].platform if devices else "an abstract mesh"
        raise ConfigError(
            f"memory.device_budget_bytes is required for auto placement/micro-batch on {platform} "
            "(jax reports no device memory capacity there)"
        )
    return budget
