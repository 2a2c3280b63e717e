"""Callbacks: research hooks that live outside the Trainer class.

Overriding ``Trainer.on_step_end`` / ``on_eval_end`` is one way in; a ``Callback`` added to
``trainer.callbacks`` is the other, for behaviour that should compose (a tracker, a probe, an early stop
that raises). Every process calls them, after the Trainer's own hooks, with plain host values.
"""
from __future__ import annotations


class Callback:
    """Subclass and override what you need; each method gets the trainer and a plain dict or step."""

    def on_fit_start(self, trainer, step: int) -> None:
        """A loop segment starts at ``step`` (after a restore, a resume or a try-run decision)."""

    def on_step_end(self, trainer, step: int, record: dict) -> None:
        """Step ``step`` finished; ``record`` is what metrics.jsonl gets (loss, grad_norm, lr, timings, custom metrics)."""

    def on_eval_end(self, trainer, step: int, record: dict) -> None:
        """An evaluation at ``step`` finished; ``record`` is ``{"step": step, "eval_loss": ...}``."""

    def on_fit_end(self, trainer, step: int) -> None:
        """A loop segment ended at ``step`` (the end of the run, a preemption, or a try-run trigger)."""
