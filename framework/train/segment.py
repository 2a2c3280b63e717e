"""One segment of the training loop: from the state's step to the end of the run, or to a stop (a preemption,
a try-run trigger, after which the controller remeshes and starts the next segment).

The segment makes what the loop reports (each step's record with its memory figures and MFU, the progress bar,
the records it returns) and hands it to the run's trackers (``trainer.trackers``: metrics.jsonl, TensorBoard,
wandb), calls the hooks (``Trainer.on_step_end``/``on_eval_end`` and ``trainer.callbacks``), runs the profiler
over ``logging.profile_steps``, decides the work between steps (evaluation, checkpoints) and saves the
checkpoint a segment ends with.
"""
from __future__ import annotations

import jax

from framework import memory, metrics, preemption
from framework.config import config_to_dict
from framework.metrics import ProgressBar
from framework.train.loop import StepDone
from framework.train.profiler import StepProfiler


class Segment:
    """Use as ``with Segment(trainer, start, total) as run:``; ``run.records`` are the steps it logged."""

    def __init__(self, trainer, start: int, total: int):
        self.trainer, self.start, self.total = trainer, start, total
        self.bar = ProgressBar(total, start, trainer.cfg.logging.progress)
        self.profiler = StepProfiler(trainer.cfg.logging, trainer.run_dir, start + 1, resumed=not trainer.goodput.started)
        self.records: list[dict] = []
        self.preempted_at: int | None = None  # the step a SIGTERM/SIGINT stopped the loop before
        self._due = (False, False)  # (evaluate, save) after the step the loop paused at

    def __enter__(self) -> "Segment":
        self.trainer.trackers.start(config_to_dict(self.trainer.cfg))  # once per run (Trainer.session finishes them)
        self.trainer.goodput.loop_started()
        if self.trainer.checkpointer is not None:
            self.trainer.checkpointer.new_segment()
        for callback in self.trainer.callbacks:
            callback.on_fit_start(self.trainer, self.start)
        return self

    def __exit__(self, *exc) -> None:
        self.profiler.stop()  # first: a trace cut short by an error or a preemption is still written
        try:
            if self.trainer.checkpointer is not None:
                with self.trainer.goodput.span("checkpoint_save"):
                    self.trainer.checkpointer.wait()
        finally:
            self.bar.close()

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

    def before_step(self, step: int) -> None:
        """Step index ``step`` is about to be dispatched (the profiler's trace may start)."""
        self.profiler.before(step + 1)

    def log_step(self, done: StepDone) -> dict:
        """The step's record: to the trackers (every ``train.log_every`` steps, with memory figures and MFU), the bar,
        goodput and the hooks."""
        tr, t = self.trainer, self.trainer.cfg.train
        values, dt = done.metrics, done.seconds
        logged = (done.step + 1) % t.log_every == 0 or done.step + 1 == t.steps
        self.profiler.after(done.step + 1)
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
        record.setdefault("trained_tokens", float(t.global_batch * t.seq_len))  # the targets the loss counted
        if not self.records:  # the first step's time is its latency (transfers, first run); data and compile are apart
            record["compile_s"] = tr.compile_seconds
        if logged:
            record.update(self.throughput(dt))
            record.update(self.memory_in_use())
        self.records.append(record)
        tr.goodput.step(done.step + 1, dt)
        if logged:
            tr.trackers.log(record)
        self.bar.update(record)
        tr.on_step_end(done.step + 1, record)
        for callback in tr.callbacks:
            callback.on_step_end(tr, done.step + 1, record)
        return record

    def throughput(self, seconds: float) -> dict:
        """Model FLOP/s of the step (decoder LMs: ``metrics.model_flops``) and MFU where the device's peak is known."""
        tr = self.trainer
        flops = tr.model_flops_per_step
        if flops is None:
            return {}
        out = {"model_flops_per_s": flops / seconds}
        mfu = metrics.mfu(flops, seconds, len(tr.devices), tr.devices[0].device_kind)
        return out if mfu is None else {**out, "mfu": mfu}

    def memory_in_use(self) -> dict:
        """Device bytes in use and at peak (the memory monitor's reading of the tightest local device: memory_stats()
        where the platform has it; else the compiled step's arguments and peak, labelled ``compiled``) and host RSS."""
        tr = self.trainer
        reading = tr.memory_monitor.read(tr.devices)
        if reading.bytes_in_use is not None:
            device = {"device_bytes_in_use": reading.bytes_in_use, "device_peak_bytes": reading.peak_bytes_in_use,
                      "device_memory_source": "memory_stats"}
        else:
            in_use, peak = tr.layout.compiled_bytes()
            device = {"device_bytes_in_use": in_use, "device_peak_bytes": peak, "device_memory_source": "compiled"}
        rss, peak_rss = memory.host_memory()
        return {**device, "host_rss_bytes": rss, "host_peak_rss_bytes": peak_rss}

    def work(self, step: int) -> None:
        """The evaluation and checkpoint due at ``step`` (the step is logged first: metrics.jsonl stays in step
        order, and a resumed run lost no metrics)."""
        tr = self.trainer
        evaluate, save = self._due
        if evaluate:
            with tr.goodput.span("evaluation"):
                record = {"step": step, **tr.evaluate()}
                tr.trackers.log(record)
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
