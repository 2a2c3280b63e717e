"""Trainer: builds the run from a config and trains it, step by step.

config -> mesh -> abstract model and PartitionSpecs -> NamedShardings -> one compiled
train step (in/out shardings, donated state) -> loop: batch -> step -> metrics.
Subclass and override ``loss_fn``, ``train_step``, ``eval_step``, ``on_step_end`` or ``on_eval_end`` for research.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from framework import broadcast, goodput, hf, memory, preemption, rundir, sharding
from framework.checkpoint import CheckpointError, Checkpointer, abstract_target, warn
from framework.config import Config, ConfigError, config_to_dict
from framework.data import BatchLoader, Prefetcher, make_source
from framework.mesh import STAGE, MeshManager, describe
from framework.metrics import MetricsWriter, ProgressBar, drop_records_after
from framework.optimizer import global_norm, learning_rate_schedule
from framework.state import TrainState, abstract_state, init_state


class Trainer:
    placement_policy: memory.PlacementPolicy = memory.PlacementPolicy()  # research: assign a subclass
    memory_monitor: memory.MemoryMonitor = memory.MemoryMonitor()  # research: assign a subclass instance

    def __init__(self, cfg: Config, run_dir: str | Path | None = None, devices: Sequence[jax.Device] | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.goodput = goodput.GoodputClock()  # where wall time goes; scripts/train.py starts it at process start
        self.goodput_line = ""
        if cfg.train.compilation_cache_dir:
            enable_compilation_cache(cfg.train.compilation_cache_dir)
        self.devices = list(jax.devices() if devices is None else devices)
        self.mesh = MeshManager(cfg.mesh).build(self.devices)
        self.axis_sizes = describe(self.mesh)
        self.batch_axes = sharding.batch_axes(cfg.sharding.activation_rules, self.axis_sizes)
        # ---- memory tiers (framework/memory/): a fixed micro-batch sets grad_accum
        if isinstance(cfg.train.micro_batch, int):
            self.cfg = cfg = self._with_grad_accum(cfg.train.global_batch // cfg.train.micro_batch)
        if cfg.train.micro_batch != "auto":
            self._check_batch()

        self.abstract = self.base_abstract = abstract_state(cfg, self.axis_sizes)  # base: the model as configured
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(None, self.batch_axes))
        self._regroup = jax.jit(lambda b, accum: b.reshape(accum, -1, b.shape[-1]), static_argnums=1,
                                out_shardings=self.batch_sharding)  # a batch into another micro-batch size
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.activation_rules = sharding.rules_table(cfg.sharding.activation_rules)
        self.lr_schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
        self._compiled = None
        self.compile_seconds = 0.0
        # ---- memory tiers: placement per category, decided on the compiled step when any category is auto
        self.memory_budget = memory.resolve_budget(cfg.memory, self.devices, cfg.train.micro_batch, self.memory_monitor)
        self._built_for = None
        measure = self._measure_placement if memory.has_auto(cfg.memory) else None
        self._build_step(self.placement_policy.place(cfg.memory, measure, self.memory_budget))
        if cfg.train.micro_batch == "auto":  # ---- memory tiers: largest micro-batch whose compiled step fits
            self.cfg = cfg = self._with_grad_accum(self._auto_grad_accum())
        self._largest_micro, self._roomy_steps = cfg.train.global_batch // cfg.train.grad_accum, 0  # see _follow_memory
        self.loader = self._loader("train")
        self._eval_loader = self._loader("eval") if cfg.train.eval_every else None  # a bad eval split fails at start
        self.state: TrainState | None = None
        self.elastic = None  # the TryRunController steering fit() (framework/tryrun.py), while it does
        # checkpoints (issue 4): RUN_DIR/checkpoints or checkpoint.dir; None without either
        self.checkpointer = Checkpointer.for_run(cfg.checkpoint, self.run_dir, config_to_dict(cfg))

    # ------------------------------------------------------------------ set-up

    def _build_step(self, placement: memory.Placement) -> None:
        """Model, state shardings and jitted step for ``placement`` (nothing to do if already built for it)."""
        self.placement = placement
        if self._built_for == placement.key():
            return
        remat_policy = memory.layer_policy(self.cfg, self.base_abstract, placement.activations)
        self.stream_params = placement.params == memory.HOST
        self.abstract = self.base_abstract
        if remat_policy is not None or self.stream_params:
            self.abstract = abstract_state(self.cfg, self.axis_sizes, **memory.model_options(remat_policy, self.stream_params))
        self.nvme = None  # memory tiers: with opt_state on nvme the step leaves the update to files on disk (memory/nvme.py)
        if placement.opt_state == memory.NVME:  # (and with params on nvme the float32 master copy lives there too)
            self.nvme = memory.NvmeOptimizer(self.cfg, self.mesh, self.abstract.shapes.params,
                                             sharding.named(self.mesh, self.abstract.specs.params),
                                             self.abstract.shapes.opt_state, self.abstract.specs.opt_state)
            self.abstract = memory.held_abstract(self.abstract, self.cfg)
        self.graphdef, self.tx = self.abstract.graphdef, self.abstract.tx
        self.state_specs = self.abstract.specs
        self.device_state_shardings = sharding.named(self.mesh, self.state_specs)
        self.state_shardings = memory.with_memory_kinds(self.device_state_shardings, placement)
        self.host_update = placement.opt_state == memory.HOST  # ZeRO-Offload: the update runs where the state lives
        self.grad_shardings = jax.tree.map(lambda s: s.with_memory_kind(placement.grads), self.device_state_shardings.params)
        self._jitted_step = jax.jit(
            self._traced_step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, self.replicated) + ((self.device_state_shardings.params,) if self.nvme else ()),
            donate_argnums=0,
        )
        self._jitted_eval = jax.jit(  # params are read, not donated: training goes on from them
            self._traced_eval,
            in_shardings=(self.state_shardings.params, self.batch_sharding),
            out_shardings=self.replicated,
        )
        self._compiled, self._steps = None, {}  # the step to run; compiled steps by grad_accum
        self._ran: set[int] = set()  # grad_accums whose compiled step has run in this process (see has_run)
        self._built_for = placement.key()

    def _measure_placement(self, placement: memory.Placement) -> dict[str, int]:
        """Device bytes per category of the step compiled for ``placement``: the policy's measure for ``auto``.

        With ``train.micro_batch=auto`` the placement is decided at the smallest micro-batch; the
        micro-batch then grows as far as that placement allows.
        """
        memory.check_auto_offload(self.cfg, placement, self.memory_budget)
        self._build_step(placement)
        accum = self.cfg.train.grad_accum if self.cfg.train.micro_batch != "auto" else self.cfg.train.global_batch // min(
            self._micro_batch_candidates())
        return memory.device_bytes_by_category(self._compiled_needs(accum), placement)

    def _compiled_step(self, grad_accum: int) -> jax.stages.Compiled:
        if grad_accum not in self._steps:
            self._steps[grad_accum] = self._lower(grad_accum).compile()
        return self._steps[grad_accum]

    def _compiled_needs(self, grad_accum: int) -> memory.MemoryNeeds:
        """Compile the step for ``grad_accum`` (kept for when it runs) and read its needs."""
        needs = memory.state_needs(self.cfg, self.base_abstract, self.axis_sizes, self.batch_axes, grad_accum)
        return memory.with_compiled_activations(needs, self.placement, self._compiled_step(grad_accum).memory_analysis(),
                                                self.devices[0].platform)

    @property
    def _pipeline_microbatches(self) -> int:
        """Pieces each micro-batch is cut into by the pipeline (1 without a ``stage`` axis)."""
        return self.cfg.train.pipeline_microbatches if STAGE in self.axis_sizes else 1

    def _check_batch(self) -> None:
        t = self.cfg.train
        dp = math.prod(self.axis_sizes[a] for a in self.batch_axes)
        micro = t.global_batch // t.grad_accum
        axes = "*".join(f"mesh.{a}" for a in self.batch_axes)
        if micro % dp:
            raise ConfigError(
                f"train.global_batch={t.global_batch} (micro-batch {micro} with train.grad_accum={t.grad_accum}) "
                f"is not divisible by the data-parallel size {dp} ({axes})"
            )
        if micro % (dp * self._pipeline_microbatches):  # pipeline micro-batches split as the micro-batch does
            raise ConfigError(
                f"train.pipeline_microbatches={t.pipeline_microbatches} cuts the micro-batch {micro} into pieces of "
                f"{micro // t.pipeline_microbatches} rows, not divisible by the data-parallel size {dp} ({axes})"
            )

    def _loader(self, split: str) -> BatchLoader:
        """Batches of ``split`` in the train step's layout: same global batch, micro-batches and sharding."""
        c = self.cfg
        source = make_source(c.data, c.train, c.model.vocab_size, model=c.model, split=split)
        return BatchLoader(source, c.train.global_batch, c.train.grad_accum, self.batch_sharding)

    def _with_grad_accum(self, grad_accum: int) -> Config:
        return dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train, grad_accum=grad_accum))

    def _lower(self, grad_accum: int, platform: str | None = None):
        """The step lowered for ``grad_accum`` micro-batches; for another ``platform`` (e.g. ``cuda``) to inspect its program."""
        t = self.cfg.train
        batch = jax.ShapeDtypeStruct((grad_accum, t.global_batch // grad_accum, t.seq_len + 1), jnp.int32,
                                     sharding=self.batch_sharding)
        state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.abstract.shapes, self.state_shardings
        )
        if platform is not None:
            return self._jitted_step.trace(state, batch).lower(lowering_platforms=(platform,))
        return self._jitted_step.lower(state, batch)

    def _micro_batch_candidates(self) -> list[int]:
        """Micro-batch sizes that divide the global batch and split over the data-parallel devices, largest first."""
        t = self.cfg.train
        dp = math.prod(self.axis_sizes[a] for a in self.batch_axes)
        candidates = [m for m in range(t.global_batch, 0, -1) if t.global_batch % m == 0
                      and m % t.pipeline_microbatches == 0 and m % (dp * self._pipeline_microbatches) == 0]
        if not candidates:
            raise ConfigError(f"train.global_batch={t.global_batch} has no micro-batch divisible by the data-parallel size {dp}")
        return candidates

    def _auto_grad_accum(self) -> int:
        """Compile the step for each micro-batch (largest first) and keep the first whose device bytes fit the budget."""
        t = self.cfg.train
        tried = []
        for micro in self._micro_batch_candidates():
            need = sum(memory.device_bytes_by_category(self._compiled_needs(t.global_batch // micro), self.placement).values())
            tried.append(f"{micro}: {need:,} B")
            if need <= self.memory_budget:
                if jax.process_index() == 0:
                    print(f"train.micro_batch=auto: micro-batch {micro} x grad_accum {t.global_batch // micro} "
                          f"(step needs {need:,} B per device, budget {self.memory_budget:,} B)", flush=True)
                return t.global_batch // micro
        raise ConfigError(
            f"train.micro_batch=auto: no micro-batch fits memory.device_budget_bytes={self.memory_budget:,} "
            f"(device bytes per micro-batch size: {'; '.join(tried)})"
        )

    def memory_needs(self) -> memory.MemoryNeeds:
        return memory.estimate_needs(self.cfg, self.base_abstract, self.axis_sizes, self.batch_axes, self.cfg.train.grad_accum)

    def memory_plan(self, compiled_activations: bool = True) -> memory.MemoryPlan:
        """Bytes per device per category and memory kind; activations from the compiled step unless told otherwise."""
        if compiled_activations:
            self.compile()
            needs = memory.state_needs(self.cfg, self.base_abstract, self.axis_sizes, self.batch_axes, self.cfg.train.grad_accum)
            needs = memory.with_compiled_activations(needs, self.placement, self._compiled.memory_analysis(),
                                                     self.devices[0].platform)
        else:
            needs = self.memory_needs()
        disk = None if self.nvme is None else memory.disk_bytes(self.cfg, self.base_abstract.shapes.params,
                                                                self.device_state_shardings.params)
        return memory.make_plan(needs, self.placement, self.axis_sizes, self.memory_budget, disk)

    def init_state(self) -> TrainState:
        """Fresh state, created directly in its shardings (no full copy on one device).

        With ``model.init_from`` the params are a Hugging Face checkpoint's, each read straight
        into its device sharding (framework/hf.py); the optimizer state starts fresh. With the master
        copy on nvme the float32 params are made in host memory, written to its file, and the device
        gets them in the compute dtype.
        """
        shardings = self.state_shardings
        if self.nvme is not None and self.nvme.master:  # float32 parameters in host memory, bound for the master file
            shardings = dataclasses.replace(shardings, params=self.nvme.host_shardings())
        if self.cfg.model.init_from:
            params = hf.load_params(self.cfg.model.init_from, self.cfg.model, self.base_abstract.shapes.params,
                                    self.abstract.logical_axes, shardings.params)
            state = jax.jit(lambda p: self._held(init_state(self.cfg, self.tx, params=p)), out_shardings=shardings,
                            donate_argnums=0)(params)
        else:
            state = jax.jit(lambda: self._held(init_state(self.cfg, self.tx)), out_shardings=shardings)()
        return state if self.nvme is None else self.nvme.init(state)

    def _held(self, state: TrainState) -> TrainState:
        """The state without the optimizer state when that lives in files (memory/nvme.py)."""
        return state if self.nvme is None else dataclasses.replace(state, opt_state=None)

    def checkpoint_state(self) -> TrainState:
        """The state to checkpoint, in the all-device layout: with the nvme tier, the optimizer state (and the
        float32 master parameters) read from its files."""
        return self.state if self.nvme is None else self.nvme.checkpoint_state(self.state)

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
        self.check_resume_config(ck.latest_good_step())
        with self.goodput.span("checkpoint_restore"):
            target = abstract_target(self.abstract.shapes, self.state_shardings)
            if self.nvme is not None:  # the optimizer state (and master parameters) come to host memory, then go to files
                target = self.nvme.restore_target(target)
            state = ck.restore("latest", target)
            step = int(jax.device_get(state.step))
            if self.nvme is not None:
                state = self.nvme.restored(state)
        # steps after the checkpoint are trained again: logged no more, and counted as replayed
        self.goodput.replay_until = max(self.goodput.replay_until, drop_records_after(self.run_dir, step))
        print(f"checkpoint: resumed from step {step} in {ck.directory}", file=sys.stderr, flush=True)
        return state

    def check_resume_config(self, step: int) -> None:
        """Before resuming ``step``: refuse config changes the saved state cannot take, name those that change the run."""
        saved = self.checkpointer.restore_config(step)
        if saved is None and self.run_dir is not None and (self.run_dir / "config.yaml").is_file():
            saved = yaml.safe_load((self.run_dir / "config.yaml").read_text())
        if saved is None:
            return
        breaking, trajectory = rundir.compare(saved, config_to_dict(self.cfg))
        if breaking:
            raise CheckpointError(f"cannot resume step {step} in {self.checkpointer.directory} with this config: "
                                  f"{'; '.join(breaking)} (the saved state has the old shape or optimizer); "
                                  "undo the change, or set checkpoint.resume=false to start over")
        if jax.process_index() == 0:
            for change in trajectory:
                warn(f"resuming step {step} with a changed {change}: the run continues on a different course from here")

    def compile(self) -> None:
        """Compile the step ahead of time (its cost is reported apart from step times)."""
        if self._compiled is not None:
            return
        t0 = time.perf_counter()
        with self.goodput.span("compile"):
            self._compiled = self._compiled_step(self.cfg.train.grad_accum)
        self.compile_seconds = time.perf_counter() - t0

    @property
    def compiled_step(self) -> jax.stages.Compiled:
        """The compiled train step (for benchmarks and HLO inspection)."""
        self.compile()
        return self._compiled

    @property
    def has_run(self) -> bool:
        """Whether the step compiled for the current micro-batch has already run in this process: its first-run
        effects (first execution, buffer allocation) are behind it, so the try-run controller measures its
        steps without a warm-up step (framework/tryrun.py)."""
        return self.cfg.train.grad_accum in self._ran

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
        add, mean = functools.partial(jax.tree.map, jnp.add), functools.partial(jax.tree.map, lambda g: g / accum)
        on_host = self.placement.grads == memory.HOST
        if on_host:  # memory tiers: gradients accumulate in host memory, so the sums run there
            add, mean = memory.on_host(add), memory.on_host(mean)

        def micro_step(carry, micro_batch):
            grads_sum, loss_sum = carry
            (loss, _), grads = grad_fn(state.params, micro_batch, state.rng)
            return (add(grads_sum, self._to_grads_tier(grads)), loss_sum + loss), None

        if accum == 1:
            (loss, _), grads = grad_fn(state.params, batch[0], state.rng)
            grads = self._to_grads_tier(grads)
        else:
            zeros = jax.tree.map(jnp.zeros_like, self._on_device(state.params))
            zeros = jax.device_put(zeros, self.grad_shardings) if on_host else zeros
            (grads, loss), _ = jax.lax.scan(micro_step, (zeros, jnp.zeros((), jnp.float32)), batch)
            grads = mean(grads)
            loss = loss / accum

        grad_norm = memory.on_host(global_norm)(grads) if on_host else optax.tree.norm(grads)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": self.lr_schedule(state.step)}
        if self.nvme is not None:  # memory tiers: the update streams the state from disk after this program (memory/nvme.py)
            clipped = grads if self.nvme.clip is None else self.nvme.clip.update(grads, optax.EmptyState())[0]
            return dataclasses.replace(state, step=state.step + 1, data_pos=state.data_pos + 1), metrics, clipped
        params, opt_state = self.optimizer_update(state.params, grads, state.opt_state)
        new_state = TrainState(
            step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng, data_pos=state.data_pos + 1
        )
        return new_state, metrics

    def optimizer_update(self, params, grads, opt_state):
        """New params and optimizer state: on the device, or on the host where pinned_host optimizer state lives.

        On the host (ZeRO-Offload) the gradients and parameters travel to host memory, the update
        runs there as one host computation, and the optimizer state never comes to the device.
        """
        def update(params, grads, opt_state):
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        if self.host_update:
            host = jax.tree.map(lambda s: s.with_memory_kind(memory.HOST), self.device_state_shardings.params)
            return memory.on_host(update)(jax.device_put(params, host), jax.device_put(grads, host), opt_state)
        if self.placement.grads == memory.HOST:
            grads = jax.device_put(grads, self.device_state_shardings.params)
        return update(self._on_device(params), grads, opt_state)

    def _to_grads_tier(self, grads):
        """One micro-batch's gradients, sharded as the params, in ``memory.grads``'s kind (streamed params give them in pinned_host)."""
        if self.placement.grads == memory.HOST:
            return jax.device_put(grads, self.grad_shardings)
        return jax.lax.with_sharding_constraint(self._on_device(grads), self.device_state_shardings.params)

    def _on_device(self, params_like):
        """Streamed parameters (and their gradients) to device memory for the update; otherwise unchanged."""
        return jax.device_put(params_like, self.device_state_shardings.params) if self.stream_params else params_like

    def _master_view(self, params):
        """With the float32 master parameters on nvme: the device's compute-dtype parameters as float32, so that the
        model casts them as it casts the master copy and the gradients come out in float32 (memory/nvme.py)."""
        if self.nvme is None or not self.nvme.master:
            return params
        return jax.tree.map(lambda p: p.astype(self.cfg.train.param_dtype), params)

    def _traced_step(self, state, batch):
        # memory tiers: pinned_host state is used where it lives (the model streams params per layer, the
        # update runs on the host), and what the step returns goes back to the state's kinds
        held = state.params
        state = dataclasses.replace(state, params=self._master_view(held))
        with sharding.activation_sharding(self.mesh, self.activation_rules), \
                broadcast.use_plan(self.abstract.broadcast_plan, self.mesh):  # per-layer broadcast modes (issue 6)
            state, *outputs = self.train_step(state, batch)  # outputs: metrics (and the gradients, with opt_state on nvme)
        if self.nvme is not None:  # the update after this program makes the new parameters
            state = dataclasses.replace(state, params=held)
        if memory.HOST in self.placement.kinds().values():
            state = jax.device_put(state, self.state_shardings)
        return state, *outputs

    def step(self, state: TrainState, batch: jax.Array) -> tuple[TrainState, dict]:
        """One train step, following the device's memory (framework/memory/monitor.py).

        With free memory under ``memory.headroom_bytes``, or when the step fails with
        RESOURCE_EXHAUSTED, it is recompiled with a smaller micro-batch (more accumulation, the
        same global batch) and run from the same state; the batch is regrouped to match.
        """
        self._follow_memory(state)
        while True:
            self.compile()
            accum = self.cfg.train.grad_accum
            try:
                outputs = self._compiled(state, batch if batch.shape[0] == accum else self._regroup(batch, accum))
                self._ran.add(accum)
                return outputs if self.nvme is None else self.nvme.apply(*outputs)
            except jax.errors.JaxRuntimeError as e:  # the donated state is intact if the step never started
                if "RESOURCE_EXHAUSTED" not in str(e) or any(x.is_deleted() for x in jax.tree.leaves(state)) \
                        or not self._shrink_micro_batch(state, "the step ran out of device memory (RESOURCE_EXHAUSTED)"):
                    raise

    def adopt(self, other: "Trainer") -> None:
        """Continue the run on ``other``'s layout (the try-run controller's choice): its mesh, shardings,
        compiled steps and state become this trainer's, so the caller's Trainer stays the handle to the run."""
        vars(self).update(vars(other))

    # ------------------------------------------------------------------ the micro-batch follows device memory

    @property
    def micro_batch(self) -> int:
        return self.cfg.train.global_batch // self.cfg.train.grad_accum

    def _follow_memory(self, state: TrainState) -> None:
        """Before a step: shrink the micro-batch when free memory is under the headroom; grow it back
        (up to the one the run started with) after ``memory.regrow_after_steps`` steps with room for it."""
        headroom, regrow = self.cfg.memory.headroom_bytes, self.cfg.memory.regrow_after_steps
        free = None if headroom is None else self.memory_monitor.read(self.devices).free
        if free is not None and jax.process_count() > 1:  # every process decides on the tightest one
            from jax.experimental import multihost_utils

            free = int(np.min(multihost_utils.process_allgather(np.int64(free))))
        if free is None:
            return
        if free < headroom:
            self._roomy_steps = 0
            self._shrink_micro_batch(state, f"free device memory {free:,} B is under memory.headroom_bytes={headroom:,}")
            return
        self._roomy_steps += 1
        larger = [m for m in self._micro_batch_candidates() if self.micro_batch < m <= self._largest_micro]
        if regrow and larger and self._roomy_steps >= regrow:
            bytes_of = lambda micro: sum(memory.device_bytes_by_category(
                self._compiled_needs(self.cfg.train.global_batch // micro), self.placement).values())
            extra = bytes_of(larger[-1]) - bytes_of(self.micro_batch)
            if free - extra >= headroom:
                self._set_micro_batch(state, larger[-1], f"free device memory {free:,} B for {self._roomy_steps} steps "
                                      f"covers memory.headroom_bytes={headroom:,} and the {extra:,} B more it needs")

    def _shrink_micro_batch(self, state: TrainState, why: str) -> bool:
        smaller = [m for m in self._micro_batch_candidates() if m < self.micro_batch]
        if smaller:
            self._set_micro_batch(state, smaller[0], why)
        return bool(smaller)

    def _set_micro_batch(self, state: TrainState, micro: int, why: str) -> None:
        old, old_accum = self.micro_batch, self.cfg.train.grad_accum
        self.cfg = self._with_grad_accum(self.cfg.train.global_batch // micro)
        self._compiled, self._roomy_steps = None, 0
        if jax.process_index() == 0:
            print(f"memory: step {int(jax.device_get(state.step)) + 1}: micro-batch {old} -> {micro} (grad_accum {old_accum} "
                  f"-> {self.cfg.train.grad_accum}, same global batch): {why}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ evaluation

    def eval_step(self, params, batch: jax.Array) -> dict:
        """Metrics of one (accum, micro, seq+1) held-out batch, no gradient: the mean ``loss_fn`` of its micro-batches.

        The rng is fixed so that an evaluation is a pure function of params and batch.
        """
        rng = jax.random.key_data(jax.random.key(self.cfg.train.seed))
        losses = jax.lax.map(lambda micro: self.loss_fn(params, micro, rng)[0], batch)
        return {"loss": losses.mean()}

    def _traced_eval(self, params, batch):
        # params stay in their memory kind (pinned_host ones stream per layer), as in _traced_step
        with sharding.activation_sharding(self.mesh, self.activation_rules), \
                broadcast.use_plan(self.abstract.broadcast_plan, self.mesh):
            return self.eval_step(self._master_view(params), batch)

    def evaluate(self, state: TrainState | None = None) -> dict:
        """``eval_step``'s metrics averaged over eval batches 0..``train.eval_batches``-1, keyed ``eval_<name>``.

        Always the same held-out batches, so evaluations compare across steps, runs and meshes.
        """
        state = self.state if state is None else state
        if state is None:
            raise ValueError("Trainer.evaluate: no state yet; pass one or call fit() first")
        if self._eval_loader is None:
            self._eval_loader = self._loader("eval")
        per_batch = [self._jitted_eval(state.params, self._eval_loader.batch(pos))
                     for pos in range(self.cfg.train.eval_batches)]
        per_batch = jax.device_get(per_batch)
        return {f"eval_{key}": float(np.mean([m[key] for m in per_batch])) for key in per_batch[0]}

    # ------------------------------------------------------------------ the loop

    def on_step_end(self, step: int, record: dict) -> None:
        """Called on every process after each step's metrics arrive (``record`` is a plain dict)."""

    def on_eval_end(self, step: int, record: dict) -> None:
        """Called on every process after each evaluation; ``record`` is ``{"step": step, "eval_loss": ...}``."""

    def write_config(self) -> None:
        """RUN_DIR/config.yaml; a different earlier one is kept as config.yaml.1, .2, ..."""
        if self.run_dir is not None and jax.process_index() == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            text = yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False)
            rundir.keep_previous(self.run_dir / "config.yaml", text)
            (self.run_dir / "config.yaml").write_text(text)

    def fit(self, steps: int | None = None) -> list[dict]:
        """Train until ``steps`` (default ``train.steps``) optimizer steps have been taken."""
        total = self.cfg.train.steps if steps is None else steps
        if self.elastic is not None:  # one segment of the try-run controller's loop
            return self._fit(total)
        with preemption.watching():  # SIGTERM/SIGINT: stop at a step boundary with a checkpoint (framework/preemption.py)
            try:
                if self.cfg.elastic.enabled:  # elastic remeshing: the controller runs the loop in segments
                    from framework.tryrun import TryRunController

                    records = TryRunController(self).fit(total)
                else:
                    records = self._fit(total)
            except preemption.Preempted:
                self.record_goodput()
                raise
        self.record_goodput()
        return records

    def record_goodput(self) -> None:
        """RUN_DIR/goodput.json, TensorBoard ``goodput/*`` and ``goodput_line`` (framework/goodput.py)."""
        if not self.goodput.started:  # nothing was trained: the run dir stays as it was
            return
        report = self.goodput.report()
        history = goodput.write(self.run_dir, report)
        if self.cfg.logging.tensorboard and self.state is not None:
            goodput.write_tensorboard(self.run_dir, report, int(jax.device_get(self.state.step)))
        self.goodput_line = goodput.summary_line(history["total"], len(history["runs"]))

    def _fit(self, total: int) -> list[dict]:
        eval_every = self.cfg.train.eval_every
        if self.state is None:
            self.state = self.restore_or_init()
        start = int(jax.device_get(self.state.step))
        if start >= total:
            if jax.process_index() == 0:
                print(f"nothing to train: the run is at step {start} of {total} (raise train.steps to train on, "
                      "or choose another --run-dir for a new run)", flush=True)
            return []
        self.write_config()
        self.compile()
        writer = MetricsWriter(self.run_dir, self.cfg.logging.tensorboard)
        bar = ProgressBar(total, start, self.cfg.logging.progress)
        records: list[dict] = []
        preempted_at = None

        def stop_before(step: int) -> bool:
            nonlocal preempted_at
            if preemption.requested(step):
                preempted_at = step  # the step in flight finishes; this one never starts
                return True
            # the try-run controller remeshes at this step boundary, then calls fit() again
            return self.elastic is not None and step > start and self.elastic.triggered(step)

        def work_after(step: int):
            evaluate = eval_every and ((step + 1) % eval_every == 0 or step + 1 == total)
            save = self.checkpointer is not None and self.checkpointer.should_save(step + 1)
            if not (evaluate or save):
                return None

            def work():  # the step is logged first: metrics.jsonl stays in step order, a resumed run lost no metrics
                if evaluate:
                    with self.goodput.span("evaluation"):
                        self._log_eval(step + 1, writer)
                if save:
                    with self.goodput.span("checkpoint_save"):
                        self.checkpointer.save(step + 1, self.checkpoint_state())
            return work

        self.goodput.loop_started()
        if self.checkpointer is not None:
            self.checkpointer.new_segment()
        try:
            self.run_steps(start, total, lambda step, values, dt: self._finish(step, values, dt, records, writer, bar),
                           stop_before, work_after)
            reached = int(jax.device_get(self.state.step))  # below total when the try-run controller stopped the loop
            with self.goodput.span("checkpoint_save"):
                if self.checkpointer is not None and preempted_at is not None:
                    if self.checkpointer.latest_good_step() != reached:
                        self.checkpointer.save(reached, self.checkpoint_state())
                    self.checkpointer.wait()  # synchronous: the process may be gone soon after
                elif self.checkpointer is not None and reached == total > start and self.checkpointer.last_saved_step != total:
                    self.checkpointer.save(total, self.checkpoint_state())  # the final state is always kept
        finally:
            if self.checkpointer is not None:
                with self.goodput.span("checkpoint_save"):
                    self.checkpointer.wait()
            bar.close()
            writer.close()
        if preempted_at is not None:
            raise preemption.Preempted(preempted_at, preemption.received(),
                                       self.checkpointer.directory if self.checkpointer is not None else None)
        return records

    def run_steps(self, start: int, stop: int, on_step, stop_before=None, work_after=None) -> None:
        """Steps ``start``..``stop``-1 on ``self.state``: the one loop that live training and the try-runs
        (framework/tryrun.py) both time their steps with, so that their samples/s compare fairly.

        Batches come from the prefetcher; each step is dispatched before the previous one's metrics are
        fetched, so dispatch never waits on the host. ``on_step(step, metrics, seconds)`` gets each step's
        metrics (host values) as they arrive; a step's seconds are the interval between two arrivals, the
        first one's from when its batch is ready (the prefetcher's start-up is no step's: a loop's first
        step is timed as any other, so a one-step try-run compares with live steps).
        ``stop_before(step)`` true ends the loop before ``step``; ``work_after(step)`` may return work to run
        once ``step`` has finished (evaluation, a checkpoint): its time is no step's.
        """
        prefetch = Prefetcher(self.loader, int(jax.device_get(self.state.data_pos)), self.cfg.data.prefetch)
        pending = None  # (step, metrics) of the step in flight

        def finish() -> None:
            nonlocal last_done
            values = jax.device_get(pending[1])
            now = time.perf_counter()
            on_step(pending[0], values, now - last_done)
            last_done = now

        try:
            first = prefetch.next()[1] if start < stop else None  # the first batch is ready before the clock starts
            last_done = time.perf_counter()
            for step in range(start, stop):
                if stop_before is not None and stop_before(step):
                    break
                if step == start:
                    batch, first = first, None
                else:
                    _, batch = prefetch.next()
                self.state, metrics = self.step(self.state, batch)
                if pending is not None:
                    finish()
                pending = (step, metrics)
                work = work_after(step) if work_after is not None else None
                if work is not None:
                    finish()
                    pending = None
                    work()
                    last_done = time.perf_counter()
            if pending is not None:
                finish()
        finally:
            prefetch.close()

    def _log_eval(self, step: int, writer: MetricsWriter) -> None:
        record = {"step": step, **self.evaluate()}
        writer.write(record)
        self.on_eval_end(step, record)

    def _finish(self, step: int, values: dict, dt: float, records, writer, bar) -> None:
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
        if not records:  # the first step's time is its latency (transfers, first run); data and compile are apart
            record["compile_s"] = self.compile_seconds
        records.append(record)
        self.goodput.step(step + 1, dt)
        if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
            writer.write(record)
        bar.update(record)
        self.on_step_end(step + 1, record)


def enable_compilation_cache(path: str) -> None:
    """Persist compiled executables under ``path``: a restarted or repeated run skips compilation.

    Every compile is cached (no minimum compile time), since the user asked for the cache.
    """
    jax.config.update("jax_compilation_cache_dir", str(Path(path).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
