"""One try-run: a layout started from the decision's saved state, compiled, warmed up and timed.

Try-run steps never count: each one runs on a copy of the saved state, which is thrown away after, and
its steps are run and timed by the loop that times live steps (``framework.train.timed_steps``), so that a try-run
of the current mesh measures what its live steps measured.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from framework.checkpoint import Checkpointer, abstract_target
from framework.train.loop import timed_steps
from framework.tryrun.layouts import Layout


@dataclasses.dataclass
class Trial:
    """A layout and what running it cost and gave; ``samples_per_s`` is what ``score`` says."""

    layout: Layout
    measured_samples_per_s: float
    source: str  # "tryrun" or "rolling" (the live run's recent steps)
    compile_s: float = 0.0
    restore_s: float = 0.0
    measure_s: float = 0.0  # warm-up plus measured steps
    samples: int = 0  # samples processed by the try-run's steps (warm-up included)
    warmup_steps: int = 0  # steps run but not measured (first-run effects; see TryRunController.warmup_for)
    measured_steps: int = 0  # steps whose median decides
    samples_per_s: float = 0.0
    improvement: float = 0.0
    peak_bytes_per_device: int | None = None  # the layout's compiled step: arguments, unaliased outputs, temporaries

    @property
    def samples_per_total_s(self) -> float | None:
        """Samples processed during the try-run over its whole time (compile, restore, steps): the cost of trying."""
        total = self.compile_s + self.restore_s + self.measure_s
        return self.samples / total if self.source == "tryrun" and total > 0 else None

    def record(self) -> dict:
        return {
            "kind": self.layout.kind, "mesh": self.layout.mesh, "n_devices": self.layout.n_devices,
            "grad_accum": self.layout.grad_accum, "samples_per_s": self.samples_per_s,
            "measured_samples_per_s": self.measured_samples_per_s, "source": self.source,
            "samples_per_s_per_device": self.measured_samples_per_s / self.layout.n_devices,
            "samples_per_total_s": self.samples_per_total_s,
            "improvement": self.improvement, "compile_s": self.compile_s, "restore_s": self.restore_s,
            "measure_s": self.measure_s, "warmup_steps": self.warmup_steps, "measured_steps": self.measured_steps,
            "peak_bytes_per_device": self.peak_bytes_per_device,
        }


def measure(trainer, layout: Layout, state, warmup: int, steps: int, compile_s: float, restore_s: float) -> Trial:
    """Run ``warmup + steps`` steps of ``trainer`` from ``state`` (consumed) and score them as the live baseline is
    scored: the warm-up steps do not count, then the median step (one step stalled by a neighbour does not decide)."""
    batch = trainer.cfg.train.global_batch
    t0 = time.perf_counter()
    step_times = live_step_times(trainer, state, warmup + steps)
    measure_s = time.perf_counter() - t0
    return Trial(layout, batch / statistics.median(step_times[warmup:]), "tryrun",
                 compile_s=compile_s, restore_s=restore_s, measure_s=measure_s,
                 samples=len(step_times) * batch, warmup_steps=warmup, measured_steps=len(step_times) - warmup,
                 peak_bytes_per_device=trainer.layout.compiled_bytes()[1])


def live_step_times(trainer, state, steps: int) -> list[float]:
    """Seconds of each of ``steps`` steps from ``state`` (a copy, consumed), run and timed by the loop that
    times live steps (``framework.train.timed_steps``); the trainer's own state is left as it was."""
    live, trainer.state = trainer.state, state
    start = int(jax.device_get(state.step))
    try:
        return [done.seconds for done in timed_steps(trainer, start, start + steps)]
    finally:
        trainer.state = live


def compile_all(trainers: Sequence) -> list[float]:
    """Compile the candidates' steps side by side (XLA compiles release the GIL); seconds each took.

    A layout compiled at an earlier trigger is kept with its executable and costs nothing.
    """
    def timed(tr) -> float:
        t0 = time.perf_counter()
        tr.compile()
        return time.perf_counter() - t0

    if len(trainers) < 2:
        return [timed(tr) for tr in trainers]
    with ThreadPoolExecutor(len(trainers)) as pool:
        return list(pool.map(timed, trainers))


@dataclasses.dataclass
class StartState:
    """The state a decision's try-runs and its chosen layout start from: ``state`` (the live state, or None)
    resharded in memory, else the checkpoint at ``step``, read at most once; ``restore_s`` counts the reads."""

    checkpoints: Checkpointer
    step: int
    state: Any = None
    restore_s: float = 0.0

    def on(self, trainer, fresh: bool):
        """The state on ``trainer``'s shardings: the source state resharded in memory (``jax.device_put``: the same
        values, bit for bit), the checkpoint restored the first time there is none. ``fresh``: in buffers of its
        own, since a try-run's steps donate them."""
        source = self.state
        if source is None or not can_reshard(source, trainer.devices):
            t0 = time.perf_counter()
            state = self.checkpoints.restore(self.step, target_of(trainer))
            self.restore_s += time.perf_counter() - t0
            if source is not None:
                return state
            self.state = source = state  # the source of the layouts that follow
        if not fresh:
            return reshard(source, trainer.state_shardings)
        return copy_buffers(source, reshard(source, trainer.state_shardings, may_alias=False))

    def timed_on(self, trainer, fresh: bool) -> tuple[Any, float]:
        """``on``, ready, and the seconds it took."""
        t0 = time.perf_counter()
        state = jax.block_until_ready(self.on(trainer, fresh))
        return state, time.perf_counter() - t0


def reshard(state, shardings, may_alias: bool | None = None):
    """``state`` on ``shardings``, the same values bit for bit: in one process ``jax.device_put``; across processes
    one jitted program that every process runs (an earlier attempt at uneven per-process shares saw
    ``jax.device_put`` hang there)."""
    if jax.process_count() == 1:
        return jax.device_put(state, shardings, may_alias=may_alias)
    return jax.jit(lambda s: s, out_shardings=shardings)(state)


def can_reshard(state, devices: Sequence[jax.Device]) -> bool:
    """Whether ``jax.device_put`` can move ``state`` onto ``devices``: always within one process; across
    processes only onto the devices it is on (another device set goes through the checkpoint)."""
    return jax.process_count() == 1 or set(jax.tree.leaves(state)[0].sharding.device_set) == set(devices)


def copy_buffers(source, moved):
    """``moved`` with every array that shares a buffer with ``source`` copied: a try-run donates its state,
    and ``jax.device_put`` reuses source buffers where it can (a replicated array onto a subset of its
    devices, even with ``may_alias=False``); donating those would delete the source."""
    def pointers(x) -> set[int]:
        return {shard.data.unsafe_buffer_pointer() for shard in x.addressable_shards}

    return jax.tree.map(lambda a, b: jnp.copy(b) if pointers(a) & pointers(b) else b, source, moved)


def target_of(trainer) -> Any:
    """Abstract state carrying the trainer's shardings: what a restore onto its mesh fills."""
    return abstract_target(trainer.abstract.shapes, trainer.state_shardings)
