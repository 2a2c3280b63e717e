"""One segment of the training loop: from the state's step to the end of the run, or to a stop (a preemption,
a try-run trigger, after which the controller remeshes and starts the next segment).

The segment owns what the loop writes (metrics.jsonl and TensorBoard, the progress bar, the records it
returns), calls the hooks (``Trainer.on_step_end``/``on_eval_end`` and ``trainer.callbacks``), decides the
work between steps (evaluation, checkpoints) and saves the checkpoint a segment ends with.
"""
from __future__ import annotations

import jax

from framework import preemption
from framework.metrics import MetricsWriter, ProgressBar
from framework.train.loop import StepDone


class Segment:
    """Use as ``with Segment(trainer, start, total) as run:``; ``run.records`` are the steps it logged."""

    def __init__(self, trainer, start: int, total: int):
        self.trainer, self.start, self.total = trainer, start, total
        self.writer = MetricsWriter(trainer.run_dir, trainer.cfg.logging.tensorboard)
        self.bar = ProgressBar(total, start, trainer.cfg.logging.progress)
        self.records: list[dict] = []
        self.preempted_at: int | None = None  # the step a SIGTERM/SIGINT stopped the loop before
        self._due = (False, False)  # (evaluate, save) after the step the loop paused at

    def __enter__(self) -> "Segment":
        self.trainer.goodput.loop_started()
        if self.trainer.checkpointer is not None:
            self.trainer.checkpointer.new_segment()
        for callback in self.trainer.callbacks:
            callback.on_fit_start(self.trainer, self.start)
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.trainer.checkpointer is not None:
                with self.trainer.goodput.span("checkpoint_save"):
                    self.trainer.checkpointer.wait()
        finally:
            self.bar.close()
            self.writer.close()

    # ------------------------------------------------------------------ what the loop asks

    def stop_before(self, step: int) -> bool:
        """A preemption (the step in flight finishes; this one never starts) or the try-run controller's trigger."""
        if preemption.requested(step):
            self.preempted_at = step
            return True
        elastic = self.trainer.elastic  # the try-run controller remeshes at this step boundary, then calls fit() again
        return elastic is not None and step > self.start and elastic.triggered(step)

    def work_due(self, step: int) -> bool:
        """Whether an evaluation or a checkpoint follows ``step``: the loop then pauses for ``work``.

        Asked once per step, in step order, on every process (``Checkpointer.should_save`` agrees on time there).
        """
        every, checkpointer = self.trainer.cfg.train.eval_every, self.trainer.checkpointer
        evaluate = bool(every) and ((step + 1) % every == 0 or step + 1 == self.total)
        save = checkpointer is not None and checkpointer.should_save(step + 1)
        self._due = (evaluate, save)
        return evaluate or save

    # ------------------------------------------------------------------ what the segment does

    def log_step(self, done: StepDone) -> dict:
        """The step's record: to metrics.jsonl (every ``train.log_every`` steps), the bar, goodput and the hooks."""
        tr, t = self.trainer, self.trainer.cfg.train
        values, dt = done.metrics, done.seconds
        record = {
            "step": done.step + 1,
            "loss": float(values["loss"]),
            "grad_norm": float(values["grad_norm"]),
            "lr": float(values["lr"]),
            "step_time_s": dt,
            "samples_per_s": t.global_batch / dt,
            "tokens_per_s": t.global_batch * t.seq_len / dt,
            "mesh": tr.axis_sizes,
        }
        record.update({key: float(value) for key, value in values.items() if key not in record})  # loss_fn's own metrics
        if not self.records:  # the first step's time is its latency (transfers, first run); data and compile are apart
            record["compile_s"] = tr.compile_seconds
        self.records.append(record)
        tr.goodput.step(done.step + 1, dt)
        if (done.step + 1) % t.log_every == 0 or done.step + 1 == t.steps:
            self.writer.write(record)
        self.bar.update(record)
        tr.on_step_end(done.step + 1, record)
        for callback in tr.callbacks:
            callback.on_step_end(tr, done.step + 1, record)
        return record

    def work(self, step: int) -> None:
        """The evaluation and checkpoint due at ``step`` (the step is logged first: metrics.jsonl stays in step
        order, and a resumed run lost no metrics)."""
        tr = self.trainer
        evaluate, save = self._due
        if evaluate:
            with tr.goodput.span("evaluation"):
                record = {"step": step, **tr.evaluate()}
                self.writer.write(record)
                tr.on_eval_end(step, record)
                for callback in tr.callbacks:
                    callback.on_eval_end(tr, step, record)
        if save:
            with tr.goodput.span("checkpoint_save"):
                tr.checkpointer.save(step, tr.checkpoint_state())

    def finish(self) -> None:
        """The checkpoint a segment ends with: after a preemption the state reached, synchronously (the process may
        be gone soon after); at the end of the run the final state, which is always kept."""
        tr, checkpointer = self.trainer, self.trainer.checkpointer
        reached = int(jax.device_get(tr.state.step))  # below total when the try-run controller stopped the loop
        with tr.goodput.span("checkpoint_save"):
            if checkpointer is not None and self.preempted_at is not None:
                if checkpointer.latest_good_step() != reached:
                    checkpointer.save(reached, tr.checkpoint_state())
                checkpointer.wait()
            elif checkpointer is not None and reached == self.total > self.start and checkpointer.last_saved_step != self.total:
                checkpointer.save(self.total, tr.checkpoint_state())
        for callback in tr.callbacks:
            callback.on_fit_end(tr, reached)
