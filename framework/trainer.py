"""Trainer: builds the run from a config and trains it, step by step.

config -> mesh -> abstract model and PartitionSpecs -> NamedShardings -> one compiled
train step (in/out shardings, donated state) -> loop: batch -> step -> metrics.
Subclass and override ``loss_fn``, ``train_step`` or ``on_step_end`` for research.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
import yaml
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from framework import broadcast, sharding
from framework.checkpoint import CheckpointError, Checkpointer, abstract_target, warn
from framework.config import Config, ConfigError, config_to_dict
from framework.data import BatchLoader, Prefetcher, make_source
from framework.mesh import MeshManager, describe
from framework.metrics import MetricsWriter, ProgressBar, drop_records_after
from framework.optimizer import learning_rate_schedule
from framework.state import TrainState, abstract_state, init_state


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path | None = None, devices: Sequence[jax.Device] | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if cfg.train.compilation_cache_dir:
            enable_compilation_cache(cfg.train.compilation_cache_dir)
        self.devices = list(jax.devices() if devices is None else devices)
        self.mesh = MeshManager(cfg.mesh).build(self.devices)
        self.axis_sizes = describe(self.mesh)
        self.batch_axes = self._batch_axes()
        self._check_batch()

        self.abstract = abstract_state(cfg, self.axis_sizes)
        self.graphdef, self.tx = self.abstract.graphdef, self.abstract.tx
        self.state_specs = self.abstract.specs
        self.state_shardings = sharding.named(self.mesh, self.state_specs)
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(None, self.batch_axes))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.activation_rules = sharding.rules_table(cfg.sharding.activation_rules)
        self.lr_schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)

        self.loader = BatchLoader(
            make_source(cfg.data, cfg.train, cfg.model.vocab_size, model=cfg.model),
            cfg.train.global_batch,
            cfg.train.grad_accum,
            self.batch_sharding,
        )
        self._jitted_step = jax.jit(
            self._traced_step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=0,
        )
        self._compiled = None
        self.compile_seconds = 0.0
        self.state: TrainState | None = None
        # checkpoints (issue 4): RUN_DIR/checkpoints or checkpoint.dir; None without either
        self.checkpointer = Checkpointer.for_run(cfg.checkpoint, self.run_dir, config_to_dict(cfg))

    # ------------------------------------------------------------------ set-up

    def _batch_axes(self) -> tuple[str, ...]:
        rules = sharding.rules_table(self.cfg.sharding.activation_rules)
        return tuple(a for a in rules.get("batch", ()) if a in self.axis_sizes)

    def _check_batch(self) -> None:
        t = self.cfg.train
        dp = math.prod(self.axis_sizes[a] for a in self.batch_axes)
        micro = t.global_batch // t.grad_accum
        if micro % dp:
            axes = "*".join(f"mesh.{a}" for a in self.batch_axes)
            raise ConfigError(
                f"train.global_batch={t.global_batch} (micro-batch {micro} with train.grad_accum={t.grad_accum}) "
                f"is not divisible by the data-parallel size {dp} ({axes})"
            )

    def init_state(self) -> TrainState:
        """Fresh state, created directly in its shardings (no full copy on one device)."""
        return jax.jit(lambda: init_state(self.cfg, self.tx), out_shardings=self.state_shardings)()

    def restore_or_init(self) -> TrainState:
        """Resume per ``checkpoint.resume``: never a silent fresh start over an earlier run."""
        ck, resume = self.checkpointer, self.cfg.checkpoint.resume
        if ck is None:
            if resume is True:
                raise ConfigError("checkpoint.resume=true needs a run dir or checkpoint.dir to resume from")
            return self.init_state()
        if resume is False:
            moved = ck.set_aside_all()
            if moved is not None:
                warn(f"checkpoint.resume=false: starting over; earlier checkpoints moved to {moved}")
            drop_records_after(self.run_dir, 0)
            return self.init_state()
        if ck.latest_good_step() is None:
            metrics = self.run_dir / "metrics.jsonl" if self.run_dir is not None else None
            if resume is True:
                raise CheckpointError(f"checkpoint.resume=true but {ck.directory} holds no checkpoint")
            if metrics is not None and metrics.is_file() and metrics.stat().st_size:
                raise CheckpointError(
                    f"run dir {self.run_dir} holds an earlier run ({metrics.name}) but no checkpoint in {ck.directory}; "
                    "set checkpoint.resume=false to start over"
                )
            return self.init_state()
        state = ck.restore("latest", abstract_target(self.abstract.shapes, self.state_shardings))
        step = int(jax.device_get(state.step))
        drop_records_after(self.run_dir, step)  # steps after the checkpoint are trained again
        print(f"checkpoint: resumed from step {step} in {ck.directory}", file=sys.stderr, flush=True)
        return state

    def compile(self) -> None:
        """Compile the step ahead of time (its cost is reported apart from step times)."""
        if self._compiled is not None:
            return
        t0 = time.perf_counter()
        batch = jax.ShapeDtypeStruct(self.loader.global_shape, jnp.int32, sharding=self.batch_sharding)
        state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.abstract.shapes, self.state_shardings
        )
        self._compiled = self._jitted_step.lower(state, batch).compile()
        self.compile_seconds = time.perf_counter() - t0

    @property
    def compiled_step(self) -> jax.stages.Compiled:
        """The compiled train step (for benchmarks and HLO inspection)."""
        self.compile()
        return self._compiled

    # ------------------------------------------------------------------ the step

    def model(self, params):
        """The NNX model bound to ``params`` (a pure dict), for use inside traced code."""
        return nnx.merge(self.graphdef, params)

    def loss_fn(self, params, batch: jax.Array, rng: jax.Array) -> tuple[jax.Array, dict]:
        """Mean next-token cross-entropy of one micro-batch (B, T+1) of tokens."""
        model = self.model(params)
        if hasattr(model, "loss"):  # a model with its own objective (e.g. the CNN classifier)
            return model.loss(batch), {}
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return loss, {}

    def train_step(self, state: TrainState, batch: jax.Array) -> tuple[TrainState, dict]:
        """Accumulate gradients over the micro-batches on axis 0, then one optimizer update."""
        accum = batch.shape[0]
        grad_fn = jax.value_and_grad(self.loss_fn, has_aux=True)
        param_shardings = self.state_shardings.params

        def micro_step(carry, micro_batch):
            grads_sum, loss_sum = carry
            (loss, _), grads = grad_fn(state.params, micro_batch, state.rng)
            grads = jax.lax.with_sharding_constraint(grads, param_shardings)
            return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss), None

        if accum == 1:
            (loss, _), grads = grad_fn(state.params, batch[0], state.rng)
            grads = jax.lax.with_sharding_constraint(grads, param_shardings)
        else:
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, loss), _ = jax.lax.scan(micro_step, (zeros, jnp.zeros((), jnp.float32)), batch)
            grads = jax.tree.map(lambda g: g / accum, grads)
            loss = loss / accum

        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": self.lr_schedule(state.step)}
        new_state = TrainState(
            step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng, data_pos=state.data_pos + 1
        )
        return new_state, metrics

    def _traced_step(self, state, batch):
        with sharding.activation_sharding(self.mesh, self.activation_rules), \
                broadcast.use_plan(self.abstract.broadcast_plan, self.mesh):  # per-layer broadcast modes (issue 6)
            return self.train_step(state, batch)

    def step(self, state: TrainState, batch: jax.Array) -> tuple[TrainState, dict]:
        self.compile()
        return self._compiled(state, batch)

    # ------------------------------------------------------------------ the loop

    def on_step_end(self, step: int, record: dict) -> None:
        """Called on every process after each step's metrics arrive (``record`` is a plain dict)."""

    def write_config(self) -> None:
        if self.run_dir is not None and jax.process_index() == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))

    def fit(self, steps: int | None = None) -> list[dict]:
        """Train until ``steps`` (default ``train.steps``) optimizer steps have been taken."""
        total = self.cfg.train.steps if steps is None else steps
        if self.state is None:
            self.state = self.restore_or_init()
        self.write_config()
        self.compile()
        start = int(jax.device_get(self.state.step))
        writer = MetricsWriter(self.run_dir, self.cfg.logging.tensorboard)
        bar = ProgressBar(total, start, self.cfg.logging.progress)
        prefetch = Prefetcher(self.loader, int(jax.device_get(self.state.data_pos)), self.cfg.data.prefetch)
        records: list[dict] = []
        pending = None  # metrics of the step in flight: fetched one step late so dispatch never blocks
        last_done = time.perf_counter()
        try:
            for step in range(start, total):
                _, batch = prefetch.next()
                self.state, metrics = self.step(self.state, batch)
                if pending is not None:
                    last_done = self._finish(pending, last_done, records, writer, bar)
                pending = (step, metrics)
                if self.checkpointer is not None and self.checkpointer.should_save(step + 1):
                    # log the step before saving it: a run resumed from it has lost no metrics
                    last_done = self._finish(pending, last_done, records, writer, bar)
                    pending = None
                    self.checkpointer.save(step + 1, self.state)
            if pending is not None:
                self._finish(pending, last_done, records, writer, bar)
            if self.checkpointer is not None and total > start and not self.checkpointer.should_save(total):
                self.checkpointer.save(total, self.state)  # the final state is always kept
        finally:
            if self.checkpointer is not None:
                self.checkpointer.wait()
            prefetch.close()
            bar.close()
            writer.close()
        return records

    def _finish(self, pending, last_done: float, records, writer, bar) -> float:
        step, metrics = pending
        values = jax.device_get(metrics)
        now = time.perf_counter()
        dt = now - last_done
        t = self.cfg.train
        record = {
            "step": step + 1,
            "loss": float(values["loss"]),
            "grad_norm": float(values["grad_norm"]),
            "lr": float(values["lr"]),
            "step_time_s": dt,
            "samples_per_s": t.global_batch / dt,
            "tokens_per_s": t.global_batch * t.seq_len / dt,
            "mesh": self.axis_sizes,
        }
        if not records:  # the first step's time is its latency (data, transfers, first run); compile is apart
            record["compile_s"] = self.compile_seconds
        records.append(record)
        if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
            writer.write(record)
        bar.update(record)
        self.on_step_end(step + 1, record)
        return now


def enable_compilation_cache(path: str) -> None:
    """Persist compiled executables under ``path``: a restarted or repeated run skips compilation.

    Every compile is cached (no minimum compile time), since the user asked for the cache.
    """
    jax.config.update("jax_compilation_cache_dir", str(Path(path).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
