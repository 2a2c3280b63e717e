"""TryRunController: elastic remeshing by short try-runs from a checkpoint.

When the available devices change (or every N steps, or at start-up) the controller saves
the train state with orbax, works out how many devices one model replica needs, builds
*horizontal* candidates (more data-parallel replicas of that minimal split; only when the
available count is an integer multiple of it) and *vertical* ones (the model split over
more devices: over fsdp/tensor, and, kind ``pipeline``, its stacked layers cut into more
pipeline stages where the layer count allows), starts each candidate from the saved state (the
live state resharded in memory while its devices are all still there, else the checkpoint),
measures a few steps with the loop that times live steps, and adopts the best only if it beats
the baseline by ``elastic.threshold``. Training then continues from the saved state on the
chosen mesh, so try-run steps never count: step, optimizer state and data position are those
of the checkpoint, and the global batch stays fixed (gradient accumulation adapts when the
micro-batch does not divide the new data-parallel size).

Extension points (subclass): ``available_devices``, ``min_devices``, ``candidates``,
``score``, ``should_adopt``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import statistics
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from framework import memory, sharding
from framework.checkpoint import Checkpointer, abstract_target
from framework.config import Config, ConfigError, config_to_dict
from framework.distributed import from_primary, spread_over_processes
from framework.mesh import STAGE
from framework.metrics import drop_records_after
from framework.train.loop import timed_steps

ROLLING_STEPS = 20  # step times kept for the baseline of the current mesh


@dataclasses.dataclass
class Layout:
    """One way to run: a mesh over the first ``n_devices`` devices and the accumulation that keeps the batch."""

    kind: str  # "horizontal", "vertical", "pipeline" (vertical: more pipeline stages), "baseline" (current, possibly shrunk)
    n_devices: int
    mesh: dict[str, int]  # axis name -> size
    grad_accum: int

    @property
    def key(self) -> tuple:
        return self.n_devices, tuple(self.mesh.items()), self.grad_accum


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
        }


def grad_accum_for(global_batch: int, data_parallel: int, preferred: int) -> int | None:
    """Micro-batches per step so that each micro-batch splits evenly over ``data_parallel`` devices.

    The global batch never changes; of the accumulations that work, the one nearest the configured
    one is taken (ties: more micro-batches, i.e. less activation memory). None when no split works
    (e.g. 16 samples over 6 data-parallel devices).
    """
    working = [a for a in range(1, global_batch + 1) if global_batch % a == 0 and (global_batch // a) % data_parallel == 0]
    return min(working, key=lambda a: (abs(a - preferred), -a), default=None)


def tensor_misfit(cfg: Config, tensor: int) -> str | None:
    """Why the model's tensor-split dimensions (heads, KV heads, MLP width) do not divide by ``tensor``; None when they do."""
    if tensor == 1 or cfg.model.name != "transformer":
        return None
    m = cfg.model
    dims = {"model.n_heads": m.n_heads, "model.n_kv_heads": m.n_kv_heads or m.n_heads, "model.d_mlp": m.d_mlp}
    bad = [f"{key}={value}" for key, value in dims.items() if value % tensor]
    return f"tensor={tensor} does not divide {', '.join(bad)}" if bad else None


def plan_layout(cfg: Config, kind: str, n_devices: int, replicas: int, split: int, prefer_tensor: int = 1) -> Layout | str:
    """``replicas`` data-parallel copies of the model split over ``split`` devices (fsdp x tensor), or why none fits.

    ``prefer_tensor`` (the current tensor size) is kept when it divides the split; otherwise as much
    fsdp as the global batch allows (fsdp also splits the batch). A tensor size must divide the heads,
    KV heads and MLP width; the data-parallel size must split the global batch.
    """
    data_axis, fsdp_axis, tensor_axis = cfg.mesh.axis_names
    t = cfg.train
    tensors = sorted((d for d in range(1, split + 1) if split % d == 0), key=lambda d: (d != prefer_tensor, d))
    reasons = []
    for tensor in tensors:
        misfit = tensor_misfit(cfg, tensor)
        if misfit is not None:
            reasons.append(misfit)
            continue
        mesh = {data_axis: replicas, fsdp_axis: split // tensor, tensor_axis: tensor}
        dp = math.prod(mesh[a] for a in sharding.batch_axes(cfg.sharding.activation_rules, mesh))
        accum = grad_accum_for(t.global_batch, dp, t.grad_accum)
        if accum is not None:
            return Layout(kind, n_devices, mesh, accum)
        reasons.append(f"train.global_batch={t.global_batch} does not split over data-parallel size {dp} "
                       f"(tensor={tensor})")
    return "; ".join(reasons)


def plan_pipeline_layout(cfg: Config, n_devices: int, replicas: int, split: int, stages: int,
                         prefer_tensor: int = 1) -> Layout | str:
    """``replicas`` copies of the model cut into ``stages`` pipeline stages over ``split`` devices (each stage's
    share split over fsdp x tensor as ``plan_layout`` does), or why none fits."""
    m, t = cfg.model, cfg.train
    if m.n_layers % stages:
        return f"model.n_layers={m.n_layers} is not divisible by {stages} stages"
    found = plan_layout(cfg, "pipeline", n_devices, replicas, split // stages, prefer_tensor)
    if isinstance(found, str):
        return found
    dp = math.prod(found.mesh[a] for a in sharding.batch_axes(cfg.sharding.activation_rules, found.mesh))
    accum = grad_accum_for(t.global_batch, dp * t.pipeline_microbatches, t.grad_accum)  # pieces split like the batch
    if accum is None:
        return (f"train.global_batch={t.global_batch} does not split into train.pipeline_microbatches="
                f"{t.pipeline_microbatches} pieces over data-parallel size {dp}")
    return Layout("pipeline", n_devices, {STAGE: stages, **found.mesh}, accum)


def fit_layout(cfg: Config, kind: str, n_devices: int, replicas: int, split: int, prefer_tensor: int = 1) -> Layout | None:
    """``plan_layout``, None when nothing fits."""
    found = plan_layout(cfg, kind, n_devices, replicas, split, prefer_tensor)
    return found if isinstance(found, Layout) else None


def with_layout(cfg: Config, layout: Layout) -> Config:
    """``cfg`` running on ``layout``: its mesh sizes and accumulation (a fixed micro-batch gives way; ``auto`` re-sizes)."""
    data, fsdp, tensor = (layout.mesh[a] for a in cfg.mesh.axis_names)
    stage = layout.mesh.get(STAGE, 1)
    return dataclasses.replace(
        cfg,
        mesh=dataclasses.replace(cfg.mesh, data=data, fsdp=fsdp, tensor=tensor, stage=stage, dcn_data=1),
        train=dataclasses.replace(cfg.train, grad_accum=layout.grad_accum,
                                  micro_batch="auto" if cfg.train.micro_batch == "auto" else None),
    )


def max_useful_devices(best_by_count: dict[int, float], threshold: float) -> int | None:
    """The device count past which more devices stop raising samples/s by more than ``threshold``."""
    useful = None
    for n in sorted(best_by_count):
        if useful is None or best_by_count[n] > best_by_count[useful] * (1 + threshold):
            useful = n
    return useful


def devices_to_use(best_by_count: dict[int, float], threshold: float, n_usable: int) -> int:
    """``n_usable``, or fewer when ``n_usable`` devices were measured and the max useful count is below it.

    A count never measured is always tried (otherwise a run that grew could never learn what it gains).
    """
    useful = max_useful_devices({n: v for n, v in best_by_count.items() if n <= n_usable}, threshold)
    return useful if n_usable in best_by_count and useful is not None and useful < n_usable else n_usable


class TryRunController:
    """Steers a Trainer's loop: asked at every step boundary, it remeshes on a trigger."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.cfg: Config = trainer.cfg
        self.elastic = self.cfg.elastic
        self.checkpoints = trainer.checkpointer  # the run's, shared by every candidate trainer
        if self.checkpoints is None:
            raise ConfigError("elastic.enabled needs a run dir or checkpoint.dir: try-runs restore from a checkpoint")
        names = list(self.cfg.mesh.axis_names)
        self.data_axis, self.fsdp_axis, self.tensor_axis = names
        self.log_path = Path(trainer.run_dir) / "tryrun.jsonl" if trainer.run_dir is not None else None
        self.decisions: list[dict] = []
        self.dropped: list[dict] = []  # layouts left out of the current decision, with why
        self.best_by_count: dict[int, float] = {}
        self.rolling: deque[float] = deque(maxlen=ROLLING_STEPS)
        self.rolling_warmup = 0  # live steps left out of ``rolling`` as warm-up since the current mesh started
        self._trainers = {self._key(trainer): trainer}  # compiled steps kept: returning to a mesh costs no compile
        self._seen_available = len(trainer.devices)
        self._source, self._source_step, self._restore_s = None, 0, 0.0  # a decision's state: see starting_from

    # ------------------------------------------------------------------ extension points

    def available_devices(self, step: int) -> list[jax.Device]:
        """Devices usable from ``step`` on; ``elastic.device_schedule`` emulates elasticity on one machine."""
        counts = [count for at, count in self.elastic.device_schedule if at <= step]
        return scheduled_devices(jax.devices(), counts[-1] if counts else None, step)

    def usable_devices(self, step: int) -> list[jax.Device]:
        """The available devices, at most ``elastic.max_devices`` of them."""
        available = self.available_devices(step)
        try:
            return spread_over_processes(available, min(self.elastic.max_devices or len(available), len(available)))
        except ConfigError as e:
            raise ConfigError(f"elastic.max_devices={self.elastic.max_devices}: {e}") from None

    def min_devices(self, n_available: int) -> int:
        """Devices one model replica needs: ``elastic.min_devices``, or (auto) the fewest over which the model
        state (params, grads, optimizer state, as the memory planner counts them) fits the device budget.

        Where no budget is known (``memory.device_budget_bytes`` unset on CPU), one device is taken to suffice.
        """
        if self.elastic.min_devices != "auto":
            return self.elastic.min_devices
        budget = memory.resolve_budget(self.cfg.memory, self.trainer.devices)
        if budget is None:
            return 1
        abstract = self.trainer.abstract
        rules = sharding.rules_table(self.cfg.sharding.param_rules)
        for m in range(1, n_available + 1):
            sizes = {self.data_axis: 1, self.fsdp_axis: m, self.tensor_axis: 1}
            param_specs = sharding.param_specs(abstract.shapes.params, abstract.logical_axes, rules, sizes)
            opt_specs = sharding.opt_state_specs(abstract.tx, abstract.shapes.opt_state, param_specs, abstract.shapes.params)
            params = sharding.bytes_per_device(abstract.shapes.params, param_specs, sizes)
            opt_state = sharding.bytes_per_device(abstract.shapes.opt_state, opt_specs, sizes)
            share = params  # the gradients stay on the device
            share += params if self.cfg.memory.params != memory.HOST else 0
            share += opt_state if self.cfg.memory.opt_state != memory.HOST else 0
            if share <= budget:
                return m
        return n_available + 1  # does not fit on what is available

    def candidates(self, n_devices: int, min_devices: int) -> list[Layout]:
        """Horizontal (n / min replicas of the minimal split) only when n is a multiple of min; vertical always.

        A layout that cannot run is left out and noted, with its reason, in ``self.dropped`` (the decision log).
        """
        out = []
        if n_devices % min_devices == 0:
            out.append(self.layout("horizontal", n_devices, n_devices // min_devices, min_devices))
        else:
            self.drop("horizontal", n_devices, min_devices, f"{n_devices} devices are not a multiple of {min_devices}")
        for split in range(min_devices + 1, n_devices + 1):
            if n_devices % split == 0:
                out.append(self.layout("vertical", n_devices, n_devices // split, split))
        out += self.pipeline_candidates(n_devices, min_devices)
        return [c for c in out if c is not None]

    def pipeline_candidates(self, n_devices: int, min_devices: int) -> list[Layout | None]:
        """Vertical by pipeline: for each split of the model over more devices, its stacked layers (``model.scan_layers``)
        cut into the next stage count above the current one that divides the split and the layer count."""
        m = self.cfg.model
        if m.name != "transformer" or not m.scan_layers:
            return []
        now = self.trainer.axis_sizes.get(STAGE, 1)
        out = []
        for split in range(min_devices + 1, n_devices + 1):
            if n_devices % split:
                continue
            stages = next((s for s in range(now + 1, split + 1) if split % s == 0 and m.n_layers % s == 0), None)
            if stages is None:
                self.drop("pipeline", n_devices, split, f"no stage count above {now} divides the split {split} "
                          f"and model.n_layers={m.n_layers}")
                continue
            found = plan_pipeline_layout(self.cfg, n_devices, n_devices // split, split, stages,
                                         self.trainer.axis_sizes[self.tensor_axis])
            if isinstance(found, str):
                self.drop("pipeline", n_devices, split, found)
                found = None
            out.append(found)
        return out

    def drop(self, kind: str, n_devices: int, split: int, reason: str) -> None:
        self.dropped.append({"kind": kind, "n_devices": n_devices, "split": split, "reason": reason})

    def score(self, trial: Trial) -> float:
        """``elastic.objective``: samples/s (``throughput``) or samples/s per device (``efficiency``)."""
        if self.elastic.objective == "efficiency":
            return trial.measured_samples_per_s / trial.layout.n_devices
        return trial.measured_samples_per_s

    def should_adopt(self, best: Trial, baseline: Trial) -> bool:
        return best.improvement > self.elastic.threshold

    # ------------------------------------------------------------------ layouts

    def layout(self, kind: str, n_devices: int, replicas: int, split: int) -> Layout | None:
        found = plan_layout(self.cfg, kind, n_devices, replicas, split, self.trainer.axis_sizes[self.tensor_axis])
        if isinstance(found, Layout):
            return found
        self.drop(kind, n_devices, split, found)
        return None

    def current_layout(self, trainer) -> Layout:
        return Layout("baseline", len(trainer.devices), dict(trainer.axis_sizes), trainer.cfg.train.grad_accum)

    def shrunk_layout(self, trainer, n_devices: int, min_devices: int) -> Layout:
        """The current layout on fewer devices: same model split, fewer replicas; else the nearest split that fits."""
        current = trainer.axis_sizes
        split = current.get(STAGE, 1) * current[self.fsdp_axis] * current[self.tensor_axis]
        splits = sorted((s for s in range(min_devices, n_devices + 1) if n_devices % s == 0), key=lambda s: abs(s - split))
        for s in splits:
            found = self.layout("baseline", n_devices, n_devices // s, s)
            if found is not None:
                return found
        raise ConfigError(f"elastic: no mesh over {n_devices} devices fits train.global_batch={self.cfg.train.global_batch}")

    def _key(self, trainer) -> tuple:
        return tuple(d.id for d in trainer.devices), tuple(trainer.axis_sizes.items()), trainer.cfg.train.grad_accum

    def trainer_for(self, layout: Layout, devices: Sequence[jax.Device]):
        """A Trainer of the same class and config on ``layout`` (cached with its compiled step)."""
        devices = spread_over_processes(devices, layout.n_devices)
        key = tuple(d.id for d in devices), tuple(layout.mesh.items()), layout.grad_accum
        if key not in self._trainers:
            made = type(self.trainer)(with_layout(self.cfg, layout), run_dir=self.trainer.run_dir, devices=devices)
            made.goodput = self.trainer.goodput  # one clock for the run's wall time
            made.checkpointer = self.checkpoints  # one checkpointer (its own was never opened): one last-save time
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
        moved = False  # resuming a checkpoint made on another mesh (another device count, or a fallback layout)
        if trainer.state is None:
            step = self.resume_step()
            if step is not None and step < total and saved_mesh(self.checkpoints, step) != trainer.axis_sizes:
                trainer.check_resume_config(step)  # restore_or_init checks on the other path
                moved = True
                # steps after the checkpoint are trained again: logged no more, and counted as replayed
                replayed = drop_records_after(trainer.run_dir, step)
                trainer.goodput.replay_until = max(trainer.goodput.replay_until, replayed)
            else:
                trainer.state = trainer.restore_or_init()
        records: list[dict] = []
        start = step if moved else int(jax.device_get(trainer.state.step))
        if start < total and (moved or self.elastic.trigger == "startup" or self.triggered(start)):
            trainer = self.decide(trainer, start, "startup" if moved else self._reason(start, at_start=True))
        while True:
            warmup = self.warmup_for(trainer)
            trainer.elastic = self
            try:
                segment = trainer.fit(total)
            finally:
                trainer.elastic = None
            records += segment
            self.add_live_steps(segment, warmup)
            step = int(jax.device_get(trainer.state.step))
            if step >= total:
                break
            trainer = self.decide(trainer, step, self._reason(step, at_start=False))
        if trainer is not origin:
            origin.adopt(trainer)
        self.trainer = origin
        return records

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
        """Start (or go on) only when one model replica fits on the usable devices: wait for more, up to
        ``elastic.wait_timeout_s``, then stop with a ConfigError naming the shortfall (exit code 2)."""
        need = self.min_devices(len(self.usable_devices(step)))
        have = len(self.usable_devices(step))
        if have >= need:
            return
        timeout = self.elastic.wait_timeout_s
        if jax.process_index() == 0:
            print(f"elastic: one model replica needs {need} devices, {have} available; waiting up to {timeout:g} s "
                  "(elastic.wait_timeout_s)", flush=True)
        with self.trainer.goodput.span("waiting_for_devices"):
            deadline = time.monotonic() + timeout
            while have < need and time.monotonic() < deadline:
                time.sleep(min(1.0, max(deadline - time.monotonic(), 0)))
                have = len(self.usable_devices(step))
                need = self.min_devices(have)
        if have < need:
            raise ConfigError(f"elastic: one model replica needs {need} devices (elastic.min_devices="
                              f"{self.elastic.min_devices}), only {have} available: {need - have} short after waiting "
                              f"{timeout:g} s (elastic.wait_timeout_s)")

    def decide(self, trainer, step: int, reason: str):
        """One decision at ``step``: save, candidates, try-runs, adopt or keep. Returns the trainer to continue with."""
        began = time.perf_counter()
        self.trainer = trainer
        clock = trainer.goodput
        t0 = time.perf_counter()
        with clock.span("checkpoint_save"):
            if self.checkpoints.latest_good_step() != step:
                self.checkpoints.save(step, trainer.state)
            self.checkpoints.wait()
        checkpoint_s = time.perf_counter() - t0
        live, trainer.state = trainer.state, None
        self.wait_for_devices(step)  # after a shrink: with the state saved, as long as it takes
        available = self.available_devices(step)
        # try-runs and the chosen layout start from the live state, resharded in memory, while all its devices
        # are still there; else (devices lost, or resumed at start-up) from the checkpoint, restored once
        source = live if live is not None and set(trainer.devices) <= set(available) else None
        del live
        usable = self.usable_devices(step)
        useful = devices_to_use(self.best_by_count, self.elastic.threshold, len(usable))
        idle = len(usable) - useful
        if idle:  # more devices were measured to add less than the threshold: leave them idle
            usable = spread_over_processes(usable, useful)
        n = len(usable)

        with clock.span("tryruns"), self.starting_from(source, step):  # candidates, try-runs, scores, the chosen state
            min_devices = int(from_primary([self.min_devices(n)])[0])  # device capacities may differ between processes
            self.dropped = []
            layouts = self.candidates(n, min_devices)

            current = self.current_layout(trainer)
            runnable = set(trainer.devices) <= set(usable)
            if runnable and len(self.rolling) >= 2:
                step_time = statistics.median(self.rolling)
                baseline = Trial(current, self.cfg.train.global_batch / step_time, "rolling",
                                 warmup_steps=self.rolling_warmup, measured_steps=len(self.rolling))
            else:
                base_layout = current if runnable else self.shrunk_layout(trainer, n, min_devices)
                baseline = self.try_run(base_layout, trainer.devices if runnable else usable, step)

            todo = [c for c in layouts if c.key != baseline.layout.key]
            trainers = [self.trainer_for(c, usable) for c in todo]
            t0 = time.perf_counter()
            compile_s = self.compile_all(trainers)
            compile_wall = time.perf_counter() - t0  # side by side: less than the sum of the candidates' compile_s
            trials = [self.try_run(c, usable, step, compiled_in=s) for c, s in zip(todo, compile_s)]
            # Each process timed its own steps: all decide on process 0's scores, or they would remesh differently.
            baseline.samples_per_s, *scores = from_primary([self.score(baseline), *map(self.score, trials)])
            for trial, score in zip(trials, scores):
                trial.samples_per_s = score
                trial.improvement = trial.samples_per_s / baseline.samples_per_s - 1
            for trial in (baseline, *trials):
                count = trial.layout.n_devices
                self.best_by_count[count] = max(self.best_by_count.get(count, 0.0), trial.samples_per_s)

            best = max(trials, key=lambda tr: tr.samples_per_s, default=None)
            adopted = best is not None and self.should_adopt(best, baseline)
            chosen = best if adopted else baseline
            next_trainer = self.trainer_for(chosen.layout, trainer.devices if chosen is baseline and runnable else usable)
            t0 = time.perf_counter()
            next_trainer.state = self.start_state(next_trainer, fresh=False)  # the values saved at ``step``
            jax.block_until_ready(next_trainer.state)
            restore_s = time.perf_counter() - t0
        next_trainer.compile()
        if next_trainer is not trainer:
            self.rolling.clear()
            self.rolling_warmup = 0
            self.checkpoints.config = config_to_dict(next_trainer.cfg)  # saved with its steps: the mesh that runs them
        self._seen_available = len(available)

        decision = {
            "trigger": reason,
            "step": step,
            "checkpoint_step": step,
            "available_devices": len(available),
            "max_devices": self.elastic.max_devices,
            "min_devices": min_devices,
            "integer_multiple": n % min_devices == 0,
            "baseline": baseline.record(),
            "candidates": [tr.record() for tr in trials],
            "dropped": self.dropped,
            "chosen": chosen.record(),
            "adopted": adopted,
            "threshold": self.elastic.threshold,
            "max_useful_devices": max_useful_devices(self.best_by_count, self.elastic.threshold),
            "idle_devices": idle,
            "state_from": "checkpoint" if source is None else "live",
            "seconds": {
                "checkpoint": checkpoint_s,
                "tryrun_compile": baseline.compile_s + compile_wall,
                "tryrun_restore": sum(tr.restore_s for tr in (baseline, *trials)),
                "checkpoint_restore": self._restore_s,  # of the two above and ``restore``: orbax reads
                "tryrun_measured": sum(tr.measure_s for tr in (baseline, *trials)),
                "restore": restore_s,
                "total": time.perf_counter() - began,
            },
        }
        self.decisions.append(decision)
        self._log(decision)
        return next_trainer

    @staticmethod
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

    def try_run(self, layout: Layout, devices: Sequence[jax.Device], step: int, compiled_in: float | None = None) -> Trial:
        """Start ``layout`` from the decision's state (``start_state``), compile (unless ``compiled_in`` seconds
        already did), warm up (unless its step ran before: ``warmup_for``), measure; the state is thrown away after."""
        tr = self.trainer_for(layout, devices)
        compile_s = self.compile_all([tr])[0] if compiled_in is None else compiled_in
        t0 = time.perf_counter()
        state = self.start_state(tr, fresh=True)
        jax.block_until_ready(state)
        restore_s = time.perf_counter() - t0

        warmup, measured = self.warmup_for(tr), self.elastic.tryrun_steps
        t0 = time.perf_counter()
        step_times = live_step_times(tr, state, warmup + measured)
        measure_s = time.perf_counter() - t0
        # as the live baseline: the warm-up steps do not count, then the median step
        # (one step stalled by a neighbour does not decide)
        return Trial(layout, self.cfg.train.global_batch / statistics.median(step_times[warmup:]), "tryrun",
                     compile_s=compile_s, restore_s=restore_s, measure_s=measure_s,
                     samples=len(step_times) * self.cfg.train.global_batch, warmup_steps=warmup,
                     measured_steps=len(step_times) - warmup)

    @contextlib.contextmanager
    def starting_from(self, state, step: int):
        """Try-runs (and the chosen layout) start from ``state``, or (None) from the checkpoint at ``step``."""
        self._source, self._source_step, self._restore_s = state, step, 0.0
        try:
            yield
        finally:
            self._source = None

    def start_state(self, trainer, fresh: bool):
        """The decision's state on ``trainer``'s shardings: the source state resharded in memory
        (``jax.device_put``: the same values, bit for bit), the checkpoint restored the first time there is none
        (``self._restore_s`` counts it). ``fresh``: in buffers of its own, since a try-run's steps donate them."""
        source = self._source
        if source is None or not can_reshard(source, trainer.devices):
            t0 = time.perf_counter()
            state = self.checkpoints.restore(self._source_step, target_of(trainer))
            self._restore_s += time.perf_counter() - t0
            if source is not None:
                return state
            self._source = source = state  # the source of the layouts that follow
        if not fresh:
            return jax.device_put(source, trainer.state_shardings)
        return copy_buffers(source, jax.device_put(source, trainer.state_shardings, may_alias=False))

    # ------------------------------------------------------------------ the decision log

    def _log(self, decision: dict) -> None:
        if jax.process_index() != 0:
            return
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(decision) + "\n")
        print(format_decision(decision), flush=True)


def live_step_times(trainer, state, steps: int) -> list[float]:
    """Seconds of each of ``steps`` steps from ``state`` (a copy, consumed), run and timed by the loop that
    times live steps (``framework.train.timed_steps``); the trainer's own state is left as it was."""
    live, trainer.state = trainer.state, state
    start = int(jax.device_get(state.step))
    try:
        return [done.seconds for done in timed_steps(trainer, start, start + steps)]
    finally:
        trainer.state = live


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


def saved_mesh(checkpoints: Checkpointer, step: int) -> dict[str, int]:
    """{axis: size} of the mesh the checkpoint at ``step`` was saved from (orbax's sharding metadata)."""
    metadata = ocp.StandardCheckpointHandler().metadata(checkpoints.directory / str(step) / "state")
    leaf = jax.tree.leaves(metadata.tree)[0]
    return dict(zip(leaf.sharding.axis_names, (int(n) for n in leaf.sharding.shape)))


def scheduled_devices(devices: Sequence[jax.Device], n: int | None, step: int) -> list[jax.Device]:
    """The first ``n`` of ``devices`` (all for None) that ``elastic.device_schedule`` makes available at ``step``."""
    n = len(devices) if n is None else n
    if n > len(devices):
        raise ConfigError(f"elastic.device_schedule asks for {n} devices at step {step}, only {len(devices)} exist")
    try:
        return spread_over_processes(devices, n)
    except ConfigError as e:
        raise ConfigError(f"elastic.device_schedule at step {step}: {e}") from None


def elastic_trainer(trainer_cls, cfg: Config, run_dir, devices: Sequence[jax.Device] | None = None):
    """The Trainer an elastic run starts with on the devices there are.

    When a checkpoint will be resumed and the config's own mesh (or batch split) does not fit
    these devices, e.g. a run saved on 8 devices resumed on 6, start on the model split over all
    of them instead (or over as many as a layout fits): the start-up decision then tries the
    alternatives from the checkpoint.

    Compiled steps persist under RUN_DIR/xla_cache unless ``train.compilation_cache_dir`` says
    where: a restarted job (after a lost process, or to grow) compiles its layouts once.
    """
    devices = list(jax.devices() if devices is None else devices)
    for step, n in cfg.elastic.device_schedule:  # refused before anything compiles or is written
        scheduled_devices(jax.devices(), n, step)
    if not cfg.train.compilation_cache_dir and run_dir is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compilation_cache_dir=str(Path(run_dir) / "xla_cache")))
    try:
        return trainer_cls(cfg, run_dir=run_dir, devices=devices)
    except ConfigError:
        checkpoints = Checkpointer.for_run(cfg.checkpoint, run_dir)
        if cfg.checkpoint.resume is False or checkpoints is None or checkpoints.latest_good_step() is None:
            raise
        for n in range(len(devices), 0, -1):  # no layout over all of them (e.g. tensor 3 over 4 heads): fewer
            layout = fit_layout(cfg, "baseline", n, 1, n)
            if layout is not None:
                try:
                    subset = spread_over_processes(devices, n)
                except ConfigError:
                    continue
                return trainer_cls(with_layout(cfg, layout), run_dir=run_dir, devices=subset)
        raise


def target_of(trainer) -> Any:
    """Abstract state carrying the trainer's shardings: what a restore onto its mesh fills."""
    return abstract_target(trainer.abstract.shapes, trainer.state_shardings)


def mesh_text(mesh: dict) -> str:
    """data x fsdp x tensor, with the stage count in front for a pipelined mesh (``s2:1x2x2``)."""
    sizes = "x".join(str(v) for k, v in mesh.items() if k != STAGE)
    return f"s{mesh[STAGE]}:{sizes}" if STAGE in mesh else sizes


def format_decision(d: dict) -> str:
    """A decision as the table printed during training."""
    s = d["seconds"]
    lines = [
        f"try-run at step {d['step']} ({d['trigger']}): {d['available_devices']} devices available, "
        f"{d['min_devices']} per model replica, integer multiple: {'yes' if d['integer_multiple'] else 'no'}",
        f"  {'kind':<11}{'mesh':<11}{'devices':>8}{'accum':>6}{'samples/s':>11}{'vs base':>9}{'compile s':>10}  source",
    ]
    for row in (d["baseline"], *d["candidates"]):
        mesh = mesh_text(row["mesh"])
        vs = "" if row is d["baseline"] else f"{row['improvement']:+.1%}"
        lines.append(
            f"  {row['kind']:<11}{mesh:<11}{row['n_devices']:>8}{row['grad_accum']:>6}{row['samples_per_s']:>11.1f}"
            f"{vs:>9}{row['compile_s']:>10.2f}  {row['source']}"
        )
    for row in d.get("dropped", []):
        lines.append(f"  {row['kind']:<11}{'-':<11}{row['n_devices']:>8}{'':>6}{'dropped':>11}  {row['reason']}")
    chosen = d["chosen"]
    mesh = mesh_text(chosen["mesh"])
    verdict = (f"adopted {chosen['kind']} {mesh} on {chosen['n_devices']} devices ({chosen['improvement']:+.1%} > {d['threshold']:.0%})"
               if d["adopted"] else f"kept baseline {mesh} on {chosen['n_devices']} devices (best candidate not > {d['threshold']:.0%})")
    lines.append(f"  -> {verdict}; max useful devices so far: {d['max_useful_devices']}"
                 + (f"; {d['idle_devices']} devices left idle (they added less than {d['threshold']:.0%})"
                    if d.get("idle_devices") else ""))
    lines.append(
        f"  seconds: checkpoint {s['checkpoint']:.2f}, try-runs compile {s['tryrun_compile']:.2f} + restore "
        f"{s['tryrun_restore']:.2f} + measured {s['tryrun_measured']:.2f}, restore {s['restore']:.2f}, total {s['total']:.2f}"
    )
    return "\n".join(lines)
