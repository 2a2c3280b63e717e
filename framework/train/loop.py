"""The timed step loop: the one loop live training and the try-runs (framework/tryrun) both run and time
their steps with, so that their samples/s compare fairly.

Batches come from the prefetcher; each step is dispatched before the previous one's metrics are fetched,
so dispatch never waits on the host. A step's seconds are the interval between two arrivals of metrics,
the first one's from when its batch is ready (the prefetcher's start-up is no step's: a loop's first step
is timed as any other, so a one-step try-run compares with live steps). A step that runs out of device memory
where it cannot be retried in place (its metrics fail to arrive) ends the loop with ``StepOutOfMemory``.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator

import jax

from framework.data import Prefetcher
from framework.train.microbatch import StepOutOfMemory, out_of_memory


@dataclasses.dataclass
class StepDone:
    """A finished step, as its metrics arrive on the host."""

    step: int  # the step's index: the state after it is at step + 1
    metrics: dict  # host values
    seconds: float
    paused: bool  # the loop waits for the consumer before the next step: its work (evaluation, a checkpoint) is no step's time


def timed_steps(trainer, start: int, stop: int, stop_before: Callable[[int], bool] | None = None,
                pause_after: Callable[[int], bool] | None = None,
                before_step: Callable[[int], None] | None = None) -> Iterator[StepDone]:
    """Run steps ``start``..``stop``-1 on ``trainer.state`` and yield each one when its metrics arrive.

    ``stop_before(step)`` true ends the loop before ``step`` (a preemption, a try-run trigger);
    ``pause_after(step)`` true yields ``step`` before the next one is dispatched, so the consumer can
    evaluate or checkpoint the state after it, and restarts the clock when the consumer comes back;
    ``before_step(step)`` is called just before ``step``'s batch is taken and the step dispatched (the profiler).
    """
    prefetch = Prefetcher(trainer.loader, int(jax.device_get(trainer.state.data_pos)), trainer.cfg.data.prefetch)
    pending = None  # (step, metrics) of the step in flight
    last_done = 0.0

    def arrived(paused: bool) -> StepDone:
        nonlocal last_done
        try:
            values = jax.device_get(pending[1])
        except jax.errors.JaxRuntimeError as e:  # the step failed after dispatch: its donated state is gone
            if out_of_memory(e):
                raise StepOutOfMemory(pending[0], "device_get") from e
            raise
        now = time.perf_counter()
        done, last_done = StepDone(pending[0], values, now - last_done, paused), now
        return done

    try:
        batch = prefetch.next()[1] if start < stop else None  # the first batch is ready before the clock starts
        last_done = time.perf_counter()
        for step in range(start, stop):
            if stop_before is not None and stop_before(step):
                break
            if before_step is not None:
                before_step(step)
            if step > start:
                batch = prefetch.next()[1]
            try:
                trainer.state, metrics = trainer.step(trainer.state, batch)
            except jax.errors.JaxRuntimeError as e:  # not retried in place (the state was handed over)
                if out_of_memory(e):
                    raise StepOutOfMemory(step, "dispatch") from e
                raise
            if pending is not None:
                yield arrived(paused=False)
            pending = (step, metrics)
            if pause_after is not None and pause_after(step):
                yield arrived(paused=True)
                pending, last_done = None, time.perf_counter()
        if pending is not None:
            yield arrived(paused=False)
    finally:
        prefetch.close()
