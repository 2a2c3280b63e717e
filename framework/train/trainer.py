"""Trainer: builds the run from a config and trains it, step by step.

config -> mesh and batch layout (``MeshLayout``) -> abstract model and PartitionSpecs -> memory placement ->
one train step (in/out shardings, donated state), compiled on first use -> the loop of ``fit``: batch ->
step -> metrics -> hooks -> checkpoint -> elastic check.

Research extension by subclassing: override ``loss_fn`` (its aux dict is logged per step), ``train_step``,
``optimizer_update``, ``eval_step``, ``on_step_end`` or ``on_eval_end``; or add a ``Callback`` to
``trainer.callbacks``. tests/test_extension.py is a worked example (a z-loss term and a custom metric).
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from framework import broadcast, goodput, hf, memory, preemption, sharding
from framework.checkpoint import Checkpointer
from framework.config import Config, ConfigError, config_to_dict
from framework.data import BatchLoader
from framework.optimizer import global_norm, learning_rate_schedule
from framework.state import TrainState, abstract_state, init_state
from framework.trackers import Trackers
from framework.train import artifacts
from framework.train.callbacks import Callback
from framework.train.evaluation import Evaluation
from framework.train.layout import MeshLayout
from framework.train.loop import timed_steps
from framework.train.microbatch import MicroBatchControl, StepOutOfMemory, out_of_memory, with_grad_accum
from framework.train.objective import loss_and_metrics, micro_batch_shares, target_weights
from framework.train.resume import RunResume
from framework.train.segment import Segment
from framework.train.session import RunSession
from framework.train.steps import enable_compilation_cache

# The model ``Trainer.model`` builds while ``loss_for`` traces: the same loss_fn on the model built another way
_MODEL_GRAPHDEF: contextvars.ContextVar = contextvars.ContextVar("meshpilot_model_graphdef", default=None)


class Trainer(RunSession, RunResume, MicroBatchControl, Evaluation):
    placement_policy: memory.PlacementPolicy = memory.PlacementPolicy()  # research: assign a subclass
    memory_monitor: memory.MemoryMonitor = memory.MemoryMonitor()  # research: assign a subclass instance

    def __init__(self, cfg: Config, run_dir: str | Path | None = None, devices: Sequence[jax.Device] | None = None):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.goodput = goodput.GoodputClock()  # where wall time goes; scripts/train.py starts it at process start
        self.goodput_line = ""
        self.callbacks: list[Callback] = []
        self.trackers = Trackers(cfg.logging, self.run_dir)  # where records go (logging.trackers); started with the loop
        if cfg.train.compilation_cache_dir:
            enable_compilation_cache(cfg.train.compilation_cache_dir)
        if isinstance(cfg.train.micro_batch, int):  # memory tiers: a fixed micro-batch sets grad_accum
            cfg = with_grad_accum(cfg, cfg.train.global_batch // cfg.train.micro_batch)
        self.cfg = cfg
        self.layout = MeshLayout(cfg, jax.devices() if devices is None else devices, self.memory_monitor)
        self.activation_rules = sharding.rules_table(cfg.sharding.activation_rules)
        self.lr_schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
        self.compile_seconds = 0.0
        # the micro-batch the run starts with (train.micro_batch=auto: decided on the compiled step, at first use)
        self._largest_micro, self._roomy_steps = (None if cfg.train.micro_batch == "auto" else self.micro_batch), 0
        if not memory.has_auto(cfg.memory):  # placed as configured; ``auto`` is decided on the compiled step, at first use
            self._place(self.placement_policy.place(cfg.memory, None, None))
        self.layout.loader = self.layout.make_loader(cfg, "train")
        if cfg.train.eval_every:  # a bad eval split fails at start
            self.layout.eval_loader = self.layout.make_loader(cfg, "eval")
        self.state: TrainState | None = None
        self.elastic = None  # the TryRunController steering fit() (framework/tryrun), while it does
        # checkpoints: RUN_DIR/checkpoints or checkpoint.dir; None without either
        self.checkpointer = Checkpointer.for_run(cfg.checkpoint, self.run_dir, config_to_dict(cfg))

    # ------------------------------------------------------------------ what the layout fixes

    devices = property(lambda self: self.layout.devices)
    mesh = property(lambda self: self.layout.mesh)
    axis_sizes = property(lambda self: self.layout.axis_sizes, doc="{axis: size} of the mesh")
    batch_axes = property(lambda self: self.layout.batch_axes, doc="the mesh axes the batch is split over")
    base_abstract = property(lambda self: self.layout.base_abstract, doc="the model as configured (no remat, no streaming)")
    batch_sharding = property(lambda self: self.layout.batch_sharding, doc="of a (grad_accum, micro-batch, seq+1) batch")
    loader = property(lambda self: self.layout.loader, lambda self, loader: setattr(self.layout, "loader", loader),
                      doc="training batches in the step's layout (research: assign another BatchLoader)")
    memory_budget = property(lambda self: self.layout.memory_budget)
    # decided by the memory placement (``auto``: on the compiled step, at first use)
    placement = property(lambda self: self._placed().placement)
    abstract = property(lambda self: self._placed().abstract, doc="shapes and specs of the state as placed")
    graphdef = property(lambda self: self._placed().abstract.graphdef)
    tx = property(lambda self: self._placed().abstract.tx)
    state_shardings = property(lambda self: self._placed().state_shardings, doc="in the placement's memory kinds")
    device_state_shardings = property(lambda self: self._placed().device_state_shardings)
    nvme = property(lambda self: self._placed().nvme, doc="the NVMe tier (memory/nvme.py), or None")
    broadcast_plan = property(lambda self: self._placed().broadcast_plan(self.cfg, self.cfg.train.grad_accum),
                              doc="the per-layer broadcast plan of the current micro-batch (None: XLA decides)")

    def adopt(self, other: Trainer) -> None:
        """Continue the run on ``other``'s layout, the try-run controller's choice: its mesh, placement, compiled
        steps and batches, the config that fixes them, and the state on it become this trainer's, so the caller's
        Trainer stays the handle to the run."""
        self.cfg, self.layout, self.state = other.cfg, other.layout, other.state
        self.compile_seconds, self._largest_micro, self._roomy_steps = other.compile_seconds, other._largest_micro, 0

    # ------------------------------------------------------------------ placement and compilation, on first use

    def _place(self, placement: memory.Placement) -> None:
        remat = memory.layer_policy(self.cfg, placement.activations, self.loss_for(), self.base_abstract.shapes.params)
        dump = self.cfg.logging.dump_hlo and self.run_dir is not None and jax.process_index() == 0
        self.layout.place(self.cfg, placement, remat, self._traced_step, self._traced_eval,
                          self.run_dir / artifacts.COMPILED_DIR if dump else None)

    def _placed(self) -> MeshLayout:
        """The layout once placed: an ``auto`` placement is measured on the compiled step the first time it is needed."""
        if self.layout.placement is None:
            self._place(self.placement_policy.place(self.cfg.memory, self._measure_placement, self.memory_budget))
        return self.layout

    def _measure_placement(self, placement: memory.Placement) -> dict[str, int]:
        """Device bytes per category of the step compiled for ``placement``: the policy's measure for ``auto``.

        With ``train.micro_batch=auto`` the placement is decided at the smallest micro-batch; the
        micro-batch then grows as far as that placement allows.
        """
        memory.check_auto_offload(self.cfg, placement, self.memory_budget)
        self._place(placement)
        t = self.cfg.train
        accum = t.grad_accum if t.micro_batch != "auto" else t.global_batch // min(self._micro_batch_candidates())
        return memory.device_bytes_by_category(self._compiled_needs(accum), placement)

    def _resolve(self) -> None:
        """Decide what is decided on the compiled program: ``auto`` placement, then ``train.micro_batch=auto``."""
        self._placed()
        if self._largest_micro is None:
            self.cfg = with_grad_accum(self.cfg, self._auto_grad_accum())
            self._largest_micro = self.micro_batch
            self.layout.loader = BatchLoader(self.loader.source, self.cfg.train.global_batch, self.cfg.train.grad_accum,
                                             self.layout.batch_sharding)
            if self.checkpointer is not None:  # saved with each step: the micro-batch that runs them
                self.checkpointer.config = config_to_dict(self.cfg)

    def _compiled_needs(self, grad_accum: int) -> memory.MemoryNeeds:
        """Compile the step for ``grad_accum`` (kept for when it runs) and read its needs."""
        t = self.cfg.train
        needs = memory.state_needs(self.cfg, self.base_abstract, self.axis_sizes, self.batch_axes, grad_accum)
        compiled = self.layout.steps.compiled(t.global_batch, t.seq_len, grad_accum)
        return memory.with_compiled_activations(needs, self.layout.placement, compiled.memory_analysis(),
                                                self.devices[0].platform)

    def compile(self) -> None:
        """Compile the step for the current micro-batch ahead of time (its cost is reported apart from step times)."""
        self._resolve()
        if self.layout.current is not None:
            return
        t, t0 = self.cfg.train, time.perf_counter()
        with self.goodput.span("compile"):
            self.layout.current = self.layout.steps.compiled(t.global_batch, t.seq_len, t.grad_accum)
        self.compile_seconds = time.perf_counter() - t0

    @property
    def compiled_step(self) -> jax.stages.Compiled:
        """The compiled train step (for benchmarks and HLO inspection)."""
        self.compile()
        return self.layout.current

    def lower(self, grad_accum: int, platform: str | None = None):
        """The step lowered for ``grad_accum`` micro-batches; for another ``platform`` (e.g. ``cuda``) to inspect its program."""
        return self._placed().steps.lower(self.cfg.train.global_batch, self.cfg.train.seq_len, grad_accum, platform)

    @property
    def has_run(self) -> bool:
        """Whether the step compiled for the current micro-batch has already run in this process: its first-run
        effects are behind it, so the try-run controller measures its steps without a warm-up step."""
        return self.cfg.train.grad_accum in self._placed().steps.ran

    def memory_needs(self) -> memory.MemoryNeeds:
        return memory.estimate_needs(self.cfg, self.base_abstract, self.axis_sizes, self.batch_axes,
                                     self.cfg.train.grad_accum, self.loss_for)

    def memory_plan(self, compiled_activations: bool = True) -> memory.MemoryPlan:
        """Bytes per device per category and memory kind; activations from the compiled step unless told otherwise."""
        if compiled_activations:
            self.compile()
            needs = self._compiled_needs(self.cfg.train.grad_accum)
        else:
            needs = self.memory_needs()
        nvme = self.nvme
        disk = None if nvme is None else memory.disk_bytes(self.cfg, self.base_abstract.shapes.params,
                                                           self.device_state_shardings.params)
        return memory.make_plan(needs, self.placement, self.axis_sizes, self.memory_budget, disk)

    # ------------------------------------------------------------------ the state

    def init_state(self) -> TrainState:
        """Fresh state, created directly in its shardings (no full copy on one device).

        With ``model.init_from`` the params are a Hugging Face checkpoint's, each read straight
        into its device sharding (framework/hf/); the optimizer state starts fresh. With the master
        copy on nvme the float32 params are made in host memory, written to its file, and the device
        gets them in the compute dtype.
        """
        layout, shardings = self._placed(), self.state_shardings
        if layout.nvme is not None and layout.nvme.master:  # float32 parameters in host memory, bound for the master file
            shardings = dataclasses.replace(shardings, params=layout.nvme.host_shardings())
        if self.cfg.model.init_from:
            params = hf.load_params(self.cfg.model.init_from, self.cfg.model, self.base_abstract.shapes.params,
                                    self.abstract.logical_axes, shardings.params)
            state = jax.jit(lambda p: layout.held(init_state(self.cfg, self.tx, params=p)), out_shardings=shardings,
                            donate_argnums=0)(params)
        else:
            state = jax.jit(lambda: layout.held(init_state(self.cfg, self.tx)), out_shardings=shardings)()
        return state if layout.nvme is None else layout.nvme.init(state)

    def checkpoint_state(self) -> TrainState:
        """The state to checkpoint, in the all-device layout: with the nvme tier, the optimizer state (and the
        float32 master parameters) read from its files."""
        return self.state if self.nvme is None else self.nvme.checkpoint_state(self.state)

    # ------------------------------------------------------------------ the step (extension points)

    def model(self, params):
        """The NNX model bound to ``params`` (a pure dict), for use inside traced code."""
        graphdef = _MODEL_GRAPHDEF.get()
        return nnx.merge(self.graphdef if graphdef is None else graphdef, params)

    def loss_fn(self, params, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        """(loss, metrics) of one micro-batch (a dict of (B, T+1) fields, framework/data/batch.py): mean next-token
        cross-entropy over its targets; an MoE model adds its routing losses and ``moe/*`` metrics (models/moe.py).

        The metrics dict's scalars are averaged over the step's micro-batches and logged with the step. Packed or
        masked, the step weighs each micro-batch's loss by its share of the targets (``_shared_loss``)."""
        return loss_and_metrics(self.model(params), batch)

    def loss_for(self, remat_policy=None):
        """``(params, batch) -> loss``: this trainer's ``loss_fn`` on the model built with ``remat_policy``
        (default: as configured). The memory planner traces it, so it measures the objective training runs."""
        graphdef = self.base_abstract.graphdef if remat_policy is None else abstract_state(
            self.cfg, self.axis_sizes, **memory.model_options(remat_policy, False)).graphdef
        rng = jax.random.key_data(jax.random.key(self.cfg.train.seed))

        def loss(params, batch):
            token = _MODEL_GRAPHDEF.set(graphdef)
            try:
                return self.loss_fn(params, batch, rng)[0]
            finally:
                _MODEL_GRAPHDEF.reset(token)

        return loss

    def _shared_loss(self, params, batch: dict, rng: jax.Array, share) -> tuple[jax.Array, dict]:
        """``loss_fn`` times the micro-batch's share of the step's targets (``micro_batch_shares``; None: as it is). An
        MoE model's routing loss (``moe/routing_loss`` of the metrics) is per token routed, not per target: unweighed."""
        loss, aux = self.loss_fn(params, batch, rng)
        if share is None:
            return loss, aux
        routing = aux.get("moe/routing_loss", 0.0)
        return (loss - routing) * share + routing, aux

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """Accumulate gradients (and ``loss_fn``'s metrics) over the micro-batches on axis 0, then one optimizer update;
        packed or masked micro-batches count by their targets (``micro_batch_shares``)."""
        layout, accum = self.layout, jax.tree.leaves(batch)[0].shape[0]
        first, shares = jax.tree.map(lambda x: x[0], batch), micro_batch_shares(batch)
        grad_fn = jax.value_and_grad(self._shared_loss, has_aux=True)
        add, mean = functools.partial(jax.tree.map, jnp.add), functools.partial(jax.tree.map, lambda g: g / accum)
        on_host = layout.placement.grads == memory.HOST
        if on_host:  # memory tiers: gradients accumulate in host memory, so the sums run there
            add, mean = memory.on_host(add), memory.on_host(mean)

        def micro_step(carry, xs):
            (grads_sum, loss_sum, aux_sum), (micro_batch, share) = carry, xs
            (loss, aux), grads = grad_fn(state.params, micro_batch, state.rng, share)
            return (add(grads_sum, layout.to_grads_tier(grads)), loss_sum + loss, jax.tree.map(jnp.add, aux_sum, aux)), None

        if accum == 1:
            (loss, aux), grads = grad_fn(state.params, first, state.rng, None)
            grads = layout.to_grads_tier(grads)
        else:
            zeros = jax.tree.map(jnp.zeros_like, layout.on_device(state.params))
            zeros = jax.device_put(zeros, layout.grad_shardings) if on_host else zeros
            aux_zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                                     jax.eval_shape(self.loss_fn, state.params, first, state.rng)[1])
            (grads, loss, aux), _ = jax.lax.scan(micro_step, (zeros, jnp.zeros((), jnp.float32), aux_zeros),
                                         (batch, shares))
            grads, loss, aux = mean(grads), loss / accum, jax.tree.map(lambda a: a / accum, aux)

        grad_norm = memory.on_host(global_norm)(grads) if on_host else optax.tree.norm(grads)
        metrics = {**aux, "loss": loss, "grad_norm": grad_norm, "lr": self.lr_schedule(state.step)}
        if target_weights(batch) is not None:  # packed or masked: the targets trained on (else every one, segment.py)
            metrics["trained_tokens"] = target_weights(batch).sum()
        if layout.nvme is not None:  # memory tiers: the update streams the state from disk after this program (memory/nvme.py)
            clip = layout.nvme.clip
            clipped = grads if clip is None else clip.update(grads, optax.EmptyState())[0]
            return dataclasses.replace(state, step=state.step + 1, data_pos=state.data_pos + 1), metrics, clipped
        params, opt_state = self.optimizer_update(state.params, grads, state.opt_state)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng,
                          data_pos=state.data_pos + 1), metrics

    def optimizer_update(self, params, grads, opt_state):
        """New params and optimizer state: on the device, or on the host where pinned_host optimizer state lives.

        On the host (ZeRO-Offload) the gradients and parameters travel to host memory, the update
        runs there as one host computation, and the optimizer state never comes to the device.
        """
        def update(params, grads, opt_state):
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        layout = self.layout
        if layout.host_update:
            host = layout.host_params_shardings()
            return memory.on_host(update)(jax.device_put(params, host), jax.device_put(grads, host), opt_state)
        if layout.placement.grads == memory.HOST:
            grads = jax.device_put(grads, layout.device_state_shardings.params)
        return update(layout.on_device(params), grads, opt_state)

    def _traced_step(self, state, batch: dict):
        # memory tiers: pinned_host state is used where it lives (the model streams params per layer, the
        # update runs on the host), and what the step returns goes back to the state's kinds
        layout, held = self.layout, state.params
        state = dataclasses.replace(state, params=layout.master_view(held, self.cfg.train.param_dtype))
        plan = layout.broadcast_plan(self.cfg, jax.tree.leaves(batch)[0].shape[0])  # for this step's micro-batch
        with sharding.activation_sharding(self.mesh, self.activation_rules), \
                broadcast.use_plan(plan, self.mesh):  # per-layer broadcast modes
            state, *outputs = self.train_step(state, batch)  # outputs: metrics (and the gradients, with opt_state on nvme)
        if layout.nvme is not None:  # the update after this program makes the new parameters
            state = dataclasses.replace(state, params=held)
        return layout.to_state_kinds(state), *outputs

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One train step, following the device's memory (framework/train/microbatch.py).

        With free memory under ``memory.headroom_bytes``, or when the step fails at dispatch with
        RESOURCE_EXHAUSTED and its donated state is intact, it is recompiled with a smaller micro-batch (more
        accumulation, the same global batch, the micro-batch all processes agree on) and run from the same state;
        the batch is regrouped to match. (A failure after the state was handed over: ``_fit`` restarts.)
        """
        self._follow_memory(state)
        while True:
            self.compile()
            layout, accum = self.layout, self.cfg.train.grad_accum
            try:
                outputs = layout.current(state, layout.regroup(batch, accum))
                layout.steps.ran.add(accum)
                return outputs if layout.nvme is None else layout.nvme.apply(*outputs)
            except jax.errors.JaxRuntimeError as e:  # the donated state is intact if the step never started
                if not out_of_memory(e) or any(x.is_deleted() for x in jax.tree.leaves(state)) or not \
                        self._shrink_after_oom(int(jax.device_get(state.step)),
                                               "the step ran out of device memory (RESOURCE_EXHAUSTED at dispatch)"):
                    raise

    # ------------------------------------------------------------------ hooks

    def on_step_end(self, step: int, record: dict) -> None:
        """Called on every process after each step's metrics arrive (``record`` is a plain dict)."""

    # ------------------------------------------------------------------ the loop

    def fit(self, steps: int | None = None) -> list[dict]:
        """Train until ``steps`` (default ``train.steps``) optimizer steps have been taken.

        With ``elastic.enabled`` the try-run controller owns the loop (``framework.tryrun.TryRunController(trainer)
        .fit()``, as scripts/train.py runs it) and calls this for each segment between its decisions.
        """
        total = self.cfg.train.steps if steps is None else steps
        if self.elastic is not None:  # one segment of the try-run controller's loop
            return self._fit(total)
        if self.cfg.elastic.enabled:
            raise ConfigError("elastic.enabled=true: the try-run controller runs the loop; call "
                              "framework.tryrun.TryRunController(trainer).fit() (scripts/train.py does)")
        with self.session():
            return self._fit(total)

    def _fit(self, total: int) -> list[dict]:
        """One segment: from the state's step to ``total``, or to a stop (a preemption, a try-run trigger). A step
        that runs out of memory after its state was handed over restarts it smaller (microbatch.py)."""
        while True:
            try:
                return self._segment(total)
            except StepOutOfMemory as e:
                if not self._shrink_after_oom(e.step, f"{e}; the run restarts from its latest checkpoint (or its first state)"):
                    raise
                self.state = self.restart_state()

    def _segment(self, total: int) -> list[dict]:
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
        self.write_plans(start)
        with Segment(self, start, total) as run:
            for done in timed_steps(self, start, total, stop_before=run.stop_before, pause_after=run.work_due,
                                    before_step=run.before_step):
                run.log_step(done)  # the trackers (metrics.jsonl, TensorBoard, wandb), progress bar, goodput, hooks
                if done.paused:
                    run.work(done.step + 1)  # an evaluation, a checkpoint
            run.finish()  # the checkpoint a segment ends with
        if run.preempted_at is not None:
            raise preemption.Preempted(run.preempted_at, preemption.received(),
                                       self.checkpointer.directory if self.checkpointer is not None else None)
        return run.records
