"""Which devices a run may use, how many one model replica needs, and waiting until there are enough.

On one machine ``elastic.device_schedule`` ([[step, count], ...]) emulates devices coming and going;
``elastic.max_devices`` caps what is used, spread evenly over the processes.

A process's devices are fixed when it joins, so more capacity means a restarted job: under the elastic
launcher (``scripts/launch_local.py --elastic``) waiting is handed over to it (``framework.handover``);
elsewhere the wait polls the schedule and, where the runtime can tell, which devices are alive
(``multihost_utils.live_devices``).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import NoReturn

import jax

from framework import handover, memory, sharding
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


MAX_DEVICES_SEARCHED = 4096  # how far ``fewest_devices_holding_state`` looks for a count that holds the state


def fewest_devices_holding_state(cfg: Config, trainer, n_available: int) -> int:
    """The fewest devices over which the model state (params, grads, optimizer state, as the memory planner counts
    them) fits the device budget, also past ``n_available`` (what to wait or ask for); a ConfigError when no count
    up to ``MAX_DEVICES_SEARCHED`` holds it (what is not split, e.g. the step counters, exceeds the budget).

    Where no budget is known (``memory.device_budget_bytes`` unset on CPU), one device is taken to suffice.
    """
    budget = memory.resolve_budget(cfg.memory, trainer.devices)
    if budget is None:
        return 1
    data_axis, fsdp_axis, tensor_axis = cfg.mesh.axis_names
    abstract = trainer.abstract
    rules = sharding.rules_table(cfg.sharding.param_rules)
    for m in range(1, max(n_available, MAX_DEVICES_SEARCHED) + 1):
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
    raise ConfigError(f"elastic: the model state does not fit memory.device_budget_bytes={budget} on any count up to "
                      f"{max(n_available, MAX_DEVICES_SEARCHED)} devices")


def live(devices: Sequence[jax.Device]) -> list[jax.Device]:
    """Those of ``devices`` that are alive, where the runtime can tell: ``multihost_utils.live_devices`` (a barrier)
    in a multi-process run with ``jax_enable_recoverability`` on a backend other than CPU. On CPU it cannot run
    (gloo blocks on a dead peer instead of failing), and one process's devices are all alive: ``devices``."""
    if jax.process_count() == 1 or not jax.config.jax_enable_recoverability or jax.default_backend() == "cpu":
        return list(devices)
    from jax.experimental.multihost_utils import live_devices

    with live_devices(list(devices)) as alive:
        return list(alive)


def wait_until_enough(usable: Callable[[], list], need_for: Callable[[int], int], elastic: ElasticConfig, clock) -> None:
    """Return once one model replica (``need_for(count)`` devices) fits on the ``usable()`` devices. Under the elastic
    launcher, ask it for the devices (``ask_launcher``: the process exits, to be restarted on more); elsewhere wait
    for more, up to ``elastic.wait_timeout_s`` (``clock``'s span ``waiting_for_devices``), then stop with a
    ConfigError naming the shortfall (exit code 2)."""
    have = len(live(usable()))
    need = need_for(have)
    if have >= need:
        return
    path = handover.request_path()
    if path is not None:
        ask_launcher(path, need, have, elastic)
    timeout = elastic.wait_timeout_s
    if jax.process_index() == 0:
        print(f"elastic: one model replica needs {need} devices, {have} available; waiting up to {timeout:g} s "
              "(elastic.wait_timeout_s)", flush=True)
    with clock.span("waiting_for_devices"):
        deadline = time.monotonic() + timeout
        while have < need and time.monotonic() < deadline:
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0)))
            have = len(live(usable()))
            need = need_for(have)
    if have < need:
        raise ConfigError(f"elastic: one model replica needs {need} devices ({need_source(elastic)}), "
                          f"only {have} available: {need - have} short after waiting {timeout:g} s (elastic.wait_timeout_s)")


def need_source(elastic: ElasticConfig) -> str:
    """Where a replica's device count came from, as the messages name it."""
    if elastic.min_devices == "auto":
        return "elastic.min_devices=auto: the fewest over which its state fits memory.device_budget_bytes"
    return f"elastic.min_devices={elastic.min_devices}"


def ask_launcher(path, need: int, have: int, elastic: ElasticConfig) -> NoReturn:
    """Hand the wait over to the elastic launcher: process 0 writes the request, every process exits with
    ``handover.NEED_CAPACITY_EXIT_CODE`` once all have seen it written (the launcher restarts the job on more)."""
    reason = f"one model replica needs {need} devices ({need_source(elastic)}), the job has {have}"
    if jax.process_index() == 0:
        handover.write_request(path, need, have, reason)
        print(f"elastic: {reason}: asking the launcher for more (it waits up to its --wait-timeout)", flush=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("meshpilot: capacity requested from the launcher")
    raise SystemExit(handover.NEED_CAPACITY_EXIT_CODE)
