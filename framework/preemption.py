"""Preemption: SIGTERM or SIGINT ends a run at a step boundary with a checkpoint, so no step is lost.

The training loop asks ``requested(step)`` before each step. With one process, a Python
signal handler records the first signal. With several, every process must stop at the same
step or their checkpoints would not match: JAX's coordination service owns SIGTERM there (its
preemption notifier, installed by ``jax.distributed.initialize``), tells every process, and
``multihost_utils.reached_preemption_sync_point`` names one agreed step. A SIGINT is turned
into a SIGTERM of this process so that it travels the same way.

Exit codes (``Preempted.exit_code``): 0 after SIGTERM (the scheduler asked; the work is saved),
130 after SIGINT (128 + 2, the shell's convention for an interrupted command).
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import jax

EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 130}

_received: signal.Signals | None = None  # the first signal while watching (this process)


class Preempted(Exception):
    """Raised by ``Trainer.fit`` after the checkpoint at ``step`` is written and the metrics are flushed."""

    def __init__(self, step: int, signum: signal.Signals, checkpoint_dir: Path | None):
        self.step, self.signum, self.checkpoint_dir = step, signum, checkpoint_dir
        where = f"checkpoint saved in {checkpoint_dir}" if checkpoint_dir is not None else "no checkpoint (no run dir)"
        super().__init__(f"preempted at step {step}: {where}")

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.signum]


def _multi_process() -> bool:
    return jax.process_count() > 1 and jax.distributed.is_initialized()


def _on_signal(signum, _frame) -> None:
    global _received
    if _received is None:
        _received = signal.Signals(signum)
        if _multi_process() and signum == signal.SIGINT:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier, which tells the other processes


@contextmanager
def watching() -> Iterator[None]:
    """Catch SIGTERM (one process) and SIGINT while training; the previous handlers come back after.

    Signal handlers can only be set from the main thread; elsewhere nothing is caught.
    """
    global _received
    _received = None
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # with several processes SIGTERM stays with JAX's notifier: a Python handler would replace it
    signals = [signal.SIGINT] + ([] if _multi_process() else [signal.SIGTERM])
    saved = {s: signal.signal(s, _on_signal) for s in signals}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def requested(step: int) -> bool:
    """Whether to stop before ``step`` (call at every step, on every process, with the same steps)."""
    if _multi_process():
        from jax.experimental import multihost_utils

        return multihost_utils.reached_preemption_sync_point(step)
    return _received is not None


def received() -> signal.Signals:
    """The signal that stopped this process (SIGTERM when another process was the one signalled)."""
    return _received or signal.SIGTERM
