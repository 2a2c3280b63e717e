"""A run as a whole, around its loop segments (a mixin of ``Trainer``): preemption, goodput, the trackers' lifetime,
and what the run writes to be looked inside beside its metrics (RUN_DIR/plans.json, framework/train/artifacts.py)."""
from __future__ import annotations

import contextlib
import functools

import jax

from framework import broadcast, goodput, metrics, preemption
from framework.train import artifacts


class RunSession:
    """``session``, ``record_goodput``, ``write_plans`` and ``model_flops_per_step`` of the Trainer."""

    @contextlib.contextmanager
    def session(self):
        """A whole run: SIGTERM/SIGINT stop it at a step boundary with a checkpoint (framework/preemption.py),
        RUN_DIR/goodput.json says where its wall time went (framework/goodput.py), and the trackers the loop started
        finish however it ends (``failed`` when an error ended it)."""
        failed = True
        try:
            with preemption.watching():
                try:
                    yield
                except preemption.Preempted:
                    self.record_goodput()
                    failed = False
                    raise
            self.record_goodput()
            failed = False
        finally:
            self.trackers.finish(failed)

    def record_goodput(self) -> None:
        """RUN_DIR/goodput.json, the trackers' ``goodput/*`` and ``goodput_line`` (framework/goodput.py)."""
        if not self.goodput.started:  # nothing was trained: the run dir stays as it was
            return
        report = self.goodput.report()
        history = goodput.write(self.run_dir, report)
        if self.state is not None:
            self.trackers.log_goodput(report, int(jax.device_get(self.state.step)))
        self.goodput_line = goodput.summary_line(history["total"], len(history["runs"]))

    def write_plans(self, step: int) -> None:
        """The layout's memory plan and broadcast job list into RUN_DIR/plans.json (artifacts.py), once per layout."""
        if self.run_dir is None or jax.process_index() != 0:
            return
        plan = self.broadcast_plan
        artifacts.append_plan(self.run_dir, {
            "step": step, "mesh": self.axis_sizes, "devices": len(self.devices), "grad_accum": self.cfg.train.grad_accum,
            "memory": self.memory_plan().to_dict(), "broadcast": None if plan is None else plan.to_dict(),
            "broadcast_fallback": broadcast.unplannable(self.cfg, self.axis_sizes) if plan is None else None})

    @functools.cached_property
    def model_flops_per_step(self) -> float | None:
        """Model FLOPs of one step of a decoder LM (``metrics.model_flops``); None for other models."""
        if self.cfg.model.name != "transformer":
            return None
        return metrics.model_flops(self.cfg, self.base_abstract.param_count).total
