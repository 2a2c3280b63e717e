"""Which devices a run may use, how many one model replica needs, and waiting until there are enough.

On one machine ``elastic.device_schedule`` ([[step, count], ...]) emulates devices coming and going;
``elastic.max_devices`` caps what is used, spread evenly over the processes.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import jax

from framework import memory, sharding
from framework.config import Config, ConfigError, ElasticConfig
from framework.distributed import spread_over_processes
from framework.tryrun.layouts import expert_split


def scheduled_devices(devices: Sequence[jax.Device], n: int | None, step: int) -> list[jax.Device]:
    """The first ``n`` of ``devices`` (all for None) that ``elastic.device_schedule`` makes available at ``step``."""
    n = len(devices) if n is None else n
    if n > len(devices):
        raise ConfigError(f"elastic.device_schedule asks for {n} devices at step {step}, only {len(devices)} exist")
    try:
        return spread_over_processes(devices, n)
    except ConfigError as e:
        raise ConfigError(f"elastic.device_schedule at step {step}: {e}") from None


def devices_at(elastic: ElasticConfig, step: int) -> list[jax.Device]:
    """The devices ``elastic.device_schedule`` makes available from ``step`` on (all of them without a schedule)."""
    counts = [count for at, count in elastic.device_schedule if at <= step]
    return scheduled_devices(jax.devices(), counts[-1] if counts else None, step)


def at_most(available: Sequence[jax.Device], max_devices: int | None) -> list[jax.Device]:
    """``available``, at most ``elastic.max_devices`` of them."""
    try:
        return spread_over_processes(available, min(max_devices or len(available), len(available)))
    except ConfigError as e:
        raise ConfigError(f"elastic.max_devices={max_devices}: {e}") from None


def fewest_devices_holding_state(cfg: Config, trainer, n_available: int) -> int:
    """The fewest devices over which the model state (params, grads, optimizer state, as the memory planner counts
    them) fits the device budget; ``n_available + 1`` when it does not fit on what is available.

    Where no budget is known (``memory.device_budget_bytes`` unset on CPU), one device is taken to suffice.
    """
    budget = memory.resolve_budget(cfg.memory, trainer.devices)
    if budget is None:
        return 1
    data_axis, fsdp_axis, tensor_axis = cfg.mesh.axis_names
    abstract = trainer.abstract
    rules = sharding.rules_table(cfg.sharding.param_rules)
    for m in range(1, n_available + 1):
        expert = expert_split(cfg, m)  # a mixture of experts: its expert weights split over the expert axis first
        sizes = {data_axis: 1, fsdp_axis: m // expert, tensor_axis: 1, **({"expert": expert} if expert > 1 else {})}
        param_specs = sharding.param_specs(abstract.shapes.params, abstract.logical_axes, rules, sizes)
        opt_specs = sharding.opt_state_specs(abstract.tx, abstract.shapes.opt_state, param_specs, abstract.shapes.params)
        params = sharding.bytes_per_device(abstract.shapes.params, param_specs, sizes)
        opt_state = sharding.bytes_per_device(abstract.shapes.opt_state, opt_specs, sizes)
        share = params  # the gradients stay on the device
        share += params if cfg.memory.params != memory.HOST else 0
        share += opt_state if cfg.memory.opt_state != memory.HOST else 0
        if share <= budget:
            return m
    return n_available + 1


def wait_until_enough(usable: Callable[[], list], need_for: Callable[[int], int], elastic: ElasticConfig, clock) -> None:
    """Return once one model replica (``need_for(count)`` devices) fits on the ``usable()`` devices: wait for more,
    up to ``elastic.wait_timeout_s`` (``clock``'s span ``waiting_for_devices``), then stop with a ConfigError
    naming the shortfall (exit code 2)."""
    have = len(usable())
    need = need_for(have)
    if have >= need:
        return
    timeout = elastic.wait_timeout_s
    if jax.process_index() == 0:
        print(f"elastic: one model replica needs {need} devices, {have} available; waiting up to {timeout:g} s "
              "(elastic.wait_timeout_s)", flush=True)
    with clock.span("waiting_for_devices"):
        deadline = time.monotonic() + timeout
        while have < need and time.monotonic() < deadline:
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0)))
            have = len(usable())
            need = need_for(have)
    if have < need:
        raise ConfigError(f"elastic: one model replica needs {need} devices (elastic.min_devices="
                          f"{elastic.min_devices}), only {have} available: {need - have} short after waiting "
                          f"{timeout:g} s (elastic.wait_timeout_s)")
