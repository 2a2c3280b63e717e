"""The profiler hook: a ``jax.profiler`` trace of the steps ``logging.profile_steps`` names, in RUN_DIR/profile.

The trace is what TensorBoard's profile plugin reads (``plugins/profile/<session>/<host>.xplane.pb``,
``tensorboard --logdir RUN_DIR/profile``) plus a Perfetto trace (``perfetto_trace.json.gz``: open it at the
Perfetto UI, no server needed). It starts before the first named step is dispatched and stops once the last
named step's metrics have arrived (the step after it, already dispatched, may show its start). A segment that
ends early (a preemption's SIGTERM, an error, a try-run decision) stops the trace on its way out, so what was
traced is written; a later segment traces the named steps still to come in a session of its own.
Process 0 traces, every process with ``logging.profile_all_processes`` (process i > 0 into ``profile/process_<i>``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import jax

from framework.config import LoggingConfig

PROFILE_DIR = "profile"


def profile_dir(run_dir: Path, process: int) -> Path:
    return run_dir / PROFILE_DIR if process == 0 else run_dir / PROFILE_DIR / f"process_{process}"


class StepProfiler:
    """Steps are numbered as metrics.jsonl numbers them: the one that takes the state from step k-1 to k is k."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path | None, first_step: int, resumed: bool):
        process = jax.process_index()
        wanted = run_dir is not None and bool(cfg.profile_steps) and (process == 0 or cfg.profile_all_processes)
        self.steps = tuple(cfg.profile_steps) if wanted else None
        self.directory = profile_dir(run_dir, process) if wanted else None
        self.active = False
        if resumed and self.steps is not None and self.steps[1] < first_step and process == 0:
            print(f"notice: logging.profile_steps={list(self.steps)}: those steps were trained before this run resumed "
                  f"at step {first_step}; no trace", file=sys.stderr, flush=True)

    def before(self, step: int) -> None:
        """Step ``step`` is about to be dispatched."""
        if self.steps is not None and not self.active and self.steps[0] <= step <= self.steps[1]:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
            self.active = True

    def after(self, step: int) -> None:
        """Step ``step``'s metrics arrived: past the last named step, the trace is written."""
        if self.active and step >= self.steps[1]:
            self.stop()

    def stop(self) -> None:
        """Write what was traced (idempotent: the segment calls it on its way out, however it ends)."""
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
