"""TryRunController: the decision loop that ties layouts, trials, devices and the decision log together.

At each trigger (the available devices changed, every N steps, or start-up) it saves the state,
gathers the usable devices, scores the current mesh (its live steps, or a try-run), tries each
candidate layout from the saved state, and adopts the best only if it beats the baseline by
``elastic.threshold``; training then continues from the saved state on the chosen mesh.
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Iterator, Sequence

import jax

from framework.config import Config, ConfigError, config_to_dict
from framework.distributed import from_primary, share_over_processes
from framework.tryrun.decision import Decision, Seconds, devices_to_use, log_decision, max_useful_devices
from framework.tryrun.devices import at_most, devices_at, fewest_devices_holding_state, wait_until_enough
from framework.tryrun.layouts import Gates, Layout, with_layout
from framework.tryrun.startup import start_or_resume
from framework.train.microbatch import StepOutOfMemory
from framework.tryrun.trial import StartState, Trial, compile_all, measure

ROLLING_STEPS = 20  # step times kept for the baseline of the current mesh


@dataclasses.dataclass
class Usable:
    """The devices a decision plans over, gathered once at its start."""

    available: int  # how many ``available_devices`` gave
    devices: list[jax.Device]  # the usable ones, less those left idle
    idle: int  # usable devices left idle: measured before to add less than the threshold
    keeps_live: bool  # the live mesh's devices are all still available: try-runs start from the live state
    runnable: bool  # the live mesh's devices are all usable: the baseline runs on them as it is


class TryRunController:
    """Steers a Trainer's loop: asked at every step boundary, it remeshes on a trigger."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.cfg: Config = trainer.cfg
        self.elastic = self.cfg.elastic
        self.checkpoints = trainer.checkpointer  # the run's, shared by every candidate trainer
        if self.checkpoints is None:
            raise ConfigError("elastic.enabled needs a run dir or checkpoint.dir: try-runs restore from a checkpoint")
        self.log_path = Path(trainer.run_dir) / "tryrun.jsonl" if trainer.run_dir is not None else None
        self.decisions: list[dict] = []  # the records written to tryrun.jsonl
        self.dropped: list[dict] = []  # layouts left out of the current decision, with why
        self.best_by_count: dict[int, float] = {}
        self.rolling: deque[float] = deque(maxlen=ROLLING_STEPS)
        self.rolling_warmup = 0  # live steps left out of ``rolling`` as warm-up since the current mesh started
        self._trainers = {self._key(trainer): trainer}  # compiled steps kept: returning to a mesh costs no compile
        self._seen_available = len(trainer.devices)
        self._start = StartState(self.checkpoints, 0)  # a decision's state: see starting_from
        # why the configured mesh did not fit the devices at start (startup.elastic_trainer): the run starts with
        # a decision among the layouts that do
        self.misfit: str | None = getattr(trainer, "start_misfit", None)

    # ------------------------------------------------------------------ extension points

    def available_devices(self, step: int) -> list[jax.Device]:
        """Devices usable from ``step`` on; ``elastic.device_schedule`` emulates elasticity on one machine."""
        return devices_at(self.elastic, step)

    def usable_devices(self, step: int) -> list[jax.Device]:
        """The available devices, at most ``elastic.max_devices`` of them."""
        return at_most(self.available_devices(step), self.elastic.max_devices)

    def min_devices(self, n_available: int) -> int:
        """Devices one model replica needs: ``elastic.min_devices``, or (auto) the fewest over which the model
        state fits the device budget (``devices.fewest_devices_holding_state``)."""
        if self.elastic.min_devices != "auto":
            return self.elastic.min_devices
        return fewest_devices_holding_state(self.cfg, self.trainer, n_available)

    def candidates(self, n_devices: int, min_devices: int) -> list[Layout]:
        """Horizontal (n / min replicas of the minimal split) only when n is a multiple of min; vertical always.

        A layout that cannot run is left out and noted, with its reason, in ``self.dropped`` (the decision log).
        """
        return self.gates().candidates(n_devices, min_devices)

    def score(self, trial: Trial) -> float:
        """``elastic.objective``: samples/s (``throughput``) or samples/s per device (``efficiency``)."""
        if self.elastic.objective == "efficiency":
            return trial.measured_samples_per_s / trial.layout.n_devices
        return trial.measured_samples_per_s

    def should_adopt(self, best: Trial, baseline: Trial) -> bool:
        return best.improvement > self.elastic.threshold

    # ------------------------------------------------------------------ layouts and their trainers

    def gates(self) -> Gates:
        """Layouts planned from the current trainer's mesh, their misfits noted in ``self.dropped``."""
        return Gates(self.cfg, self.trainer.axis_sizes, self.dropped)

    def current_layout(self, trainer) -> Layout:
        return Layout("baseline", len(trainer.devices), dict(trainer.axis_sizes), trainer.cfg.train.grad_accum)

    def _key(self, trainer) -> tuple:
        return tuple(d.id for d in trainer.devices), tuple(trainer.axis_sizes.items()), trainer.cfg.train.grad_accum

    def trainer_for(self, layout: Layout, devices: Sequence[jax.Device]):
        """A Trainer of the same class and config on ``layout`` (cached with its compiled step)."""
        devices = share_over_processes(devices, layout.n_devices)
        key = tuple(d.id for d in devices), tuple(layout.mesh.items()), layout.grad_accum
        if key not in self._trainers:
            made = type(self.trainer)(with_layout(self.cfg, layout), run_dir=self.trainer.run_dir, devices=devices)
            made.goodput = self.trainer.goodput  # one clock for the run's wall time
            made.checkpointer = self.checkpoints  # one checkpointer (its own was never opened): one last-save time
            made.trackers = self.trainer.trackers  # one set of trackers: every segment's records reach the same ones
            self._trainers[key] = made
        trainer = self._trainers[key]
        layout.grad_accum = trainer.cfg.train.grad_accum
        return trainer

    # ------------------------------------------------------------------ triggers

    def triggered(self, step: int) -> bool:
        """Asked by ``Trainer.fit`` at each step boundary. Device changes always trigger (lost devices must)."""
        if len(self.available_devices(step)) != self._seen_available:
            return True
        return self.elastic.trigger == "every_n_steps" and step > 0 and step % self.elastic.every_n_steps == 0

    def _reason(self, step: int, at_start: bool) -> str:
        """What triggered a decision: ``misfit`` (the configured mesh did not fit the devices at start) is given by
        ``_fit`` itself."""
        if len(self.available_devices(step)) != self._seen_available:
            return "device_change"
        return "startup" if at_start else self.elastic.trigger

    # ------------------------------------------------------------------ the loop

    def fit(self, total: int | None = None) -> list[dict]:
        """Train to ``total`` steps (default ``train.steps``): the trainer's loop in segments, deciding the mesh at
        each trigger, as one run (``Trainer.session``: preemption, goodput)."""
        with self.trainer.session():
            return self._fit(self.cfg.train.steps if total is None else total)

    def _fit(self, total: int) -> list[dict]:
        origin = trainer = self.trainer
        self.wait_for_devices(self.resume_step() or 0)  # start only on enough devices for one model replica
        moved_at = None  # the step of a checkpoint made on another mesh, resumed through a start-up decision
        if trainer.state is None:
            moved_at = start_or_resume(trainer, self.checkpoints, self.resume_step(), total)
        start = moved_at if moved_at is not None else int(jax.device_get(trainer.state.step))
        if start < total and (self.misfit or moved_at is not None or self.elastic.trigger == "startup"
                              or self.triggered(start)):
            reason = "misfit" if self.misfit else "startup" if moved_at is not None else self._reason(start, at_start=True)
            trainer = self.decide(trainer, start, reason)
        records: list[dict] = []
        while True:
            records += self.run_segment(trainer, total)
            step = int(jax.device_get(trainer.state.step))
            if step >= total:
                break
            trainer = self.decide(trainer, step, self._reason(step, at_start=False))
        if trainer is not origin:
            origin.adopt(trainer)
        self.trainer = origin
        return records

    def run_segment(self, trainer, total: int) -> list[dict]:
        """Train ``trainer`` up to the next trigger (or ``total``); its step times join the rolling baseline."""
        warmup = self.warmup_for(trainer)
        trainer.elastic = self
        try:
            segment = trainer.fit(total)
        finally:
            trainer.elastic = None
        self.add_live_steps(segment, warmup)
        return segment

    def resume_step(self) -> int | None:
        """The checkpoint to continue from, if resuming is on and there is one."""
        return None if self.cfg.checkpoint.resume is False else self.checkpoints.latest_good_step()

    def warmup_for(self, trainer) -> int:
        """Unmeasured steps before ``trainer``'s steps are timed, for a try-run and a live segment alike:
        ``elastic.warmup_steps`` when its compiled step has not run in this process yet (the warm-up exists for
        first-run effects), none when it has (a layout seen at an earlier trigger, the live mesh going on)."""
        return 0 if trainer.has_run else self.elastic.warmup_steps

    def add_live_steps(self, segment: list[dict], warmup: int) -> None:
        """A live segment's step times into the rolling baseline, its first ``warmup`` steps left out."""
        self.rolling.extend(r["step_time_s"] for r in segment[warmup:])
        self.rolling_warmup += min(warmup, len(segment))

    def wait_for_devices(self, step: int) -> None:
        """Start (or go on) only when one model replica fits on the usable devices (``devices.wait_until_enough``)."""
        wait_until_enough(lambda: self.usable_devices(step), self.min_devices, self.elastic, self.trainer.goodput)

    # ------------------------------------------------------------------ one decision, step by step

    def decide(self, trainer, step: int, reason: str):
        """One decision at ``step``: save the state, gather the usable devices, measure the baseline, try the
        candidates, choose, start the chosen layout from the saved state, log. Returns the trainer to continue with."""
        began = time.perf_counter()
        self.trainer = trainer
        checkpoint_s = self.save(trainer, step)
        live, trainer.state = trainer.state, None
        self.wait_for_devices(step)  # after a shrink: with the state saved, as long as it takes
        usable = self.gather_devices(trainer, step)
        # try-runs and the chosen layout start from the live state, resharded in memory, while all its devices
        # are still there; else (devices lost, or resumed at start-up) from the checkpoint, restored once
        source = live if live is not None and usable.keeps_live else None
        del live
        n = len(usable.devices)

        with trainer.goodput.span("tryruns"), self.starting_from(source, step) as start:
            min_devices = int(from_primary([self.min_devices(n)])[0])  # device capacities may differ between processes
            self.dropped = []
            layouts = self.candidates(n, min_devices)
            baseline = self.measure_baseline(trainer, usable, min_devices, step)
            trials, compile_wall = self.try_candidates(layouts, baseline, usable.devices, step)
            self.agree_scores(baseline, trials)
            chosen, adopted = self.choose(baseline, trials)
            on_live_devices = chosen is baseline and usable.runnable
            next_trainer = self.trainer_for(chosen.layout, trainer.devices if on_live_devices else usable.devices)
            next_trainer.state, restore_s = start.timed_on(next_trainer, fresh=False)  # the values saved at ``step``
        self.go_on_with(next_trainer, trainer)
        self._seen_available = usable.available

        tried = (baseline, *trials)
        seconds = Seconds(checkpoint=checkpoint_s, tryrun_compile=baseline.compile_s + compile_wall,
                          tryrun_restore=sum(tr.restore_s for tr in tried), checkpoint_restore=start.restore_s,
                          tryrun_measured=sum(tr.measure_s for tr in tried), restore=restore_s,
                          total=time.perf_counter() - began)
        record = Decision(
            trigger=reason, step=step, available_devices=usable.available, max_devices=self.elastic.max_devices,
            min_devices=min_devices, n_devices=n, baseline=baseline, candidates=trials, dropped=self.dropped,
            chosen=chosen, adopted=adopted, threshold=self.elastic.threshold,
            max_useful_devices=max_useful_devices(self.best_by_count, self.elastic.threshold),
            idle_devices=usable.idle + n - chosen.layout.n_devices, idle_reason=self.idle_reason(usable, chosen, n),
            config_misfit=self.misfit if reason == "misfit" else None,
            state_from="checkpoint" if source is None else "live", seconds=seconds,
        ).record()
        self.misfit = None
        self.decisions.append(record)
        log_decision(record, self.log_path)
        trainer.trackers.start(config_to_dict(self.cfg))  # (a decision at start-up comes before the first segment)
        trainer.trackers.log_tryrun(record)
        return next_trainer

    def idle_reason(self, usable: Usable, chosen: Trial, n: int) -> str | None:
        """Why devices are left idle: measured to add too little (``devices_to_use``), or no layout over more fits
        (the reasons the layouts over all ``n`` were dropped)."""
        reasons = []
        if usable.idle:
            reasons.append(f"{usable.idle} measured to add less than {self.elastic.threshold:.0%}")
        if chosen.layout.n_devices < n:
            why = "; ".join(dict.fromkeys(r for d in self.dropped if d["n_devices"] == n for r in d["reason"].split("; ")))
            reasons.append(f"{n - chosen.layout.n_devices} because no layout over {n} devices fits ({why})")
        return ", ".join(reasons) or None

    def save(self, trainer, step: int) -> float:
        """Save ``trainer``'s state at ``step`` (unless that step is already the latest good checkpoint), wait for
        it to be written; the seconds it took."""
        t0 = time.perf_counter()
        with trainer.goodput.span("checkpoint_save"):
            if self.checkpoints.latest_good_step() != step:
                self.checkpoints.save(step, trainer.state)
            self.checkpoints.wait()
        return time.perf_counter() - t0

    def gather_devices(self, trainer, step: int) -> Usable:
        """The devices this decision plans over: the usable ones, less those that past decisions measured to add
        less than the threshold (``devices_to_use``)."""
        available = self.available_devices(step)
        usable = self.usable_devices(step)
        useful = devices_to_use(self.best_by_count, self.elastic.threshold, len(usable))
        idle = len(usable) - useful
        if idle:  # more devices were measured to add less than the threshold: leave them idle
            usable = share_over_processes(usable, useful)
        return Usable(available=len(available), devices=usable, idle=idle,
                      keeps_live=set(trainer.devices) <= set(available), runnable=set(trainer.devices) <= set(usable))

    def measure_baseline(self, trainer, usable: Usable, min_devices: int, step: int) -> Trial:
        """The live mesh scored by its recent live steps when it can go on as it is; else a try-run of it (on
        its own devices), or of it shrunk onto the usable devices when some of its own are gone."""
        current = self.current_layout(trainer)
        if usable.runnable and len(self.rolling) >= 2:
            return Trial(current, self.cfg.train.global_batch / statistics.median(self.rolling), "rolling",
                         warmup_steps=self.rolling_warmup, measured_steps=len(self.rolling),
                         peak_bytes_per_device=trainer.layout.compiled_bytes()[1])
        if usable.runnable:
            return self.try_run(current, trainer.devices, step)
        return self.try_run(self.gates().shrunk(len(usable.devices), min_devices), usable.devices, step)

    def try_candidates(self, layouts: list[Layout], baseline: Trial, devices: Sequence[jax.Device],
                       step: int) -> tuple[list[Trial], float]:
        """A try-run of each layout other than the baseline's, all compiled side by side first; and the wall time of
        that compile (less than the sum of the candidates' ``compile_s``)."""
        todo = [c for c in layouts if c.key != baseline.layout.key]
        trainers = [self.trainer_for(c, devices) for c in todo]
        t0 = time.perf_counter()
        compile_s = compile_all(trainers)
        compile_wall = time.perf_counter() - t0
        trials = []
        for layout, seconds in zip(todo, compile_s):
            try:
                trials.append(self.try_run(layout, devices, step, compiled_in=seconds))
            except StepOutOfMemory as e:  # its state was a copy (``fresh``): the layout is left out, the run goes on
                self.dropped.append({"kind": layout.kind, "n_devices": layout.n_devices, "split": None, "reason": str(e)})
        return trials, compile_wall

    def agree_scores(self, baseline: Trial, trials: list[Trial]) -> None:
        """Score every trial and note the best per device count. Each process timed its own steps: all take
        process 0's scores, or they would remesh differently."""
        baseline.samples_per_s, *scores = from_primary([self.score(baseline), *map(self.score, trials)])
        for trial, score in zip(trials, scores):
            trial.samples_per_s = score
            trial.improvement = trial.samples_per_s / baseline.samples_per_s - 1
        for trial in (baseline, *trials):
            count = trial.layout.n_devices
            self.best_by_count[count] = max(self.best_by_count.get(count, 0.0), trial.samples_per_s)

    def choose(self, baseline: Trial, trials: list[Trial]) -> tuple[Trial, bool]:
        """The best-scoring trial if ``should_adopt`` takes it, else the baseline; and whether it was adopted."""
        best = max(trials, key=lambda tr: tr.samples_per_s, default=None)
        adopted = best is not None and self.should_adopt(best, baseline)
        return (best if adopted else baseline), adopted

    def go_on_with(self, next_trainer, trainer) -> None:
        """Make ``next_trainer`` ready to train; on a new mesh the rolling baseline starts over and the checkpoints
        are saved with its config (the mesh that runs their steps)."""
        next_trainer.compile()
        if next_trainer is not trainer:
            self.rolling.clear()
            self.rolling_warmup = 0
            self.checkpoints.config = config_to_dict(next_trainer.cfg)

    def try_run(self, layout: Layout, devices: Sequence[jax.Device], step: int, compiled_in: float | None = None) -> Trial:
        """Start ``layout`` from the decision's state (``starting_from``), compile (unless ``compiled_in`` seconds
        already did), warm up (unless its step ran before: ``warmup_for``), measure; the state is thrown away after."""
        tr = self.trainer_for(layout, devices)
        compile_s = compile_all([tr])[0] if compiled_in is None else compiled_in
        state, restore_s = self._start.timed_on(tr, fresh=True)
        return measure(tr, layout, state, self.warmup_for(tr), self.elastic.tryrun_steps, compile_s, restore_s)

    @contextlib.contextmanager
    def starting_from(self, state, step: int) -> Iterator[StartState]:
        """Try-runs (and the chosen layout) start from ``state``, or (None) from the checkpoint at ``step``."""
        self._start = StartState(self.checkpoints, step, state)
        try:
            yield self._start
        finally:
            self._start.state = None
