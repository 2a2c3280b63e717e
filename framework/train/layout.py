"""What a mesh fixes for a run, kept together so that the try-run controller can hand it from one Trainer to
another as one value (``Trainer.adopt``).

``MeshLayout(cfg, devices)``: devices -> mesh -> the batch's sharding -> the model's abstract state on that
mesh. ``place(...)`` then fixes what a memory placement decides (framework/memory): the state's shardings
in their memory kinds, the NVMe tier, parameter streaming, the host update, and the jitted steps that
placement compiles to (``CompiledSteps``). The ``to_*`` methods are the placement's moves inside the traced
step, so the step itself reads the same on every tier.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from framework import memory, sharding
from framework.config import Config, ConfigError
from framework.data import BatchLoader, make_source
from framework.mesh import STAGE, MeshManager, describe
from framework.state import AbstractState, abstract_state, broadcast_plan_for
from framework.train import artifacts
from framework.train.steps import CompiledSteps


class MeshLayout:
    """Devices, mesh and batch layout of a run, and (after ``place``) its state's placement and compiled steps."""

    def __init__(self, cfg: Config, devices: Sequence[jax.Device], monitor: memory.MemoryMonitor):
        self.devices = list(devices)
        self.mesh = MeshManager(cfg.mesh).build(self.devices)
        self.axis_sizes = describe(self.mesh)
        self.batch_axes = sharding.batch_axes(cfg.sharding.activation_rules, self.axis_sizes)
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(None, self.batch_axes))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.pipeline_microbatches = cfg.train.pipeline_microbatches if STAGE in self.axis_sizes else 1
        if cfg.train.micro_batch != "auto":  # (auto: the micro-batch is chosen among those that split)
            self.check_batch(cfg)
        self.base_abstract = abstract_state(cfg, self.axis_sizes)  # the model as configured (no remat, no streaming)
        self._regroup = jax.jit(lambda b, accum: jax.tree.map(lambda x: x.reshape(accum, -1, x.shape[-1]), b),
                                static_argnums=1, out_shardings=self.batch_sharding)
        # per-device bytes ``auto`` placement and ``train.micro_batch=auto`` may use
        self.memory_budget = memory.resolve_budget(cfg.memory, self.devices, cfg.train.micro_batch, monitor)
        self.placement: memory.Placement | None = None
        self.steps: CompiledSteps | None = None
        self.current: jax.stages.Compiled | None = None  # the compiled step in use (for the current micro-batch)
        self._compiled_bytes: dict[int, tuple[int, int]] = {}  # id(compiled step) -> compiled_bytes()
        self.loader: BatchLoader | None = None  # training batches; set once the micro-batch is known
        self.eval_loader: BatchLoader | None = None

    @property
    def data_parallel(self) -> int:
        """Devices the batch is split over."""
        return math.prod(self.axis_sizes[a] for a in self.batch_axes)

    def check_batch(self, cfg: Config) -> None:
        """The micro-batch (and the pipeline's pieces of it) split over the data-parallel devices."""
        t = cfg.train
        dp = self.data_parallel
        micro = t.global_batch // t.grad_accum
        axes = "*".join(f"mesh.{a}" for a in self.batch_axes)
        if micro % dp:
            raise ConfigError(
                f"train.global_batch={t.global_batch} (micro-batch {micro} with train.grad_accum={t.grad_accum}) "
                f"is not divisible by the data-parallel size {dp} ({axes})"
            )
        if micro % (dp * self.pipeline_microbatches):  # pipeline micro-batches split as the micro-batch does
            raise ConfigError(
                f"train.pipeline_microbatches={t.pipeline_microbatches} cuts the micro-batch {micro} into pieces of "
                f"{micro // t.pipeline_microbatches} rows, not divisible by the data-parallel size {dp} ({axes})"
            )

    def make_loader(self, cfg: Config, split: str) -> BatchLoader:
        """Batches of ``split`` in the step's layout: the global batch, cut into micro-batches, on the batch sharding."""
        source = make_source(cfg.data, cfg.train, cfg.model.vocab_size, model=cfg.model, split=split)
        return BatchLoader(source, cfg.train.global_batch, cfg.train.grad_accum, self.batch_sharding)

    def regroup(self, batch: dict, grad_accum: int) -> dict:
        """A batch (every field) cut into another number of micro-batches (the micro-batch changed after it was built)."""
        return batch if jax.tree.leaves(batch)[0].shape[0] == grad_accum else self._regroup(batch, grad_accum)

    # ------------------------------------------------------------------ a placement on this mesh

    def place(self, cfg: Config, placement: memory.Placement, remat_policy: Callable | None,
              traced_step: Callable, traced_eval: Callable, dump_dir: Path | None = None) -> None:
        """Shardings, memory kinds and jitted steps for ``placement`` (kept when already placed the same way); with
        ``dump_dir`` (``logging.dump_hlo``) every train step compiled for it is written there (artifacts.py)."""
        if self.placement is not None and self._placed_key == placement.key():  # (a policy may mutate its placement)
            self.placement = placement  # the same kinds; its reasons may say more
            return
        self.stream_params = placement.params == memory.HOST
        abstract = self.base_abstract
        if remat_policy is not None or self.stream_params:
            abstract = abstract_state(cfg, self.axis_sizes, **memory.model_options(remat_policy, self.stream_params))
        self.nvme = None  # with opt_state on nvme the step leaves the update to files on disk (memory/nvme.py)
        if placement.opt_state == memory.NVME:  # (and with params on nvme the float32 master copy lives there too)
            self.nvme = memory.NvmeOptimizer(cfg, self.mesh, abstract.shapes.params,
                                             sharding.named(self.mesh, abstract.specs.params),
                                             abstract.shapes.opt_state, abstract.specs.opt_state)
            abstract = memory.held_abstract(abstract, cfg)
        self.abstract: AbstractState = abstract
        self._broadcast_plans: dict[int, object] = {}  # grad_accum -> the broadcast plan for its micro-batch
        self.device_state_shardings = sharding.named(self.mesh, abstract.specs)
        self.state_shardings = memory.with_memory_kinds(self.device_state_shardings, placement)
        self.host_update = placement.opt_state == memory.HOST  # ZeRO-Offload: the update runs where the state lives
        self.grad_shardings = jax.tree.map(lambda s: s.with_memory_kind(placement.grads), self.device_state_shardings.params)
        self.placement, self._placed_key, self.current = placement, placement.key(), None
        outputs = (self.state_shardings, self.replicated) + ((self.device_state_shardings.params,) if self.nvme else ())
        self.steps = CompiledSteps(
            jax.jit(traced_step, in_shardings=(self.state_shardings, self.batch_sharding), out_shardings=outputs,
                    donate_argnums=0),
            # params are read, not donated: training goes on from them
            jax.jit(traced_eval, in_shardings=(self.state_shardings.params, self.batch_sharding),
                    out_shardings=self.replicated),
            self.abstract_inputs, None if dump_dir is None else functools.partial(self._dump, dump_dir, placement))

    def broadcast_plan(self, cfg: Config, grad_accum: int):
        """The per-layer broadcast plan for ``grad_accum`` micro-batches (made on first use): a step compiled for
        another micro-batch follows the plan for its own, the state's layout stays."""
        if grad_accum not in self._broadcast_plans:
            self._broadcast_plans[grad_accum] = broadcast_plan_for(cfg, self.abstract, self.axis_sizes, grad_accum)
        return self._broadcast_plans[grad_accum]

    def compiled_bytes(self) -> tuple[int, int]:
        """Per-device bytes of the compiled step in use, as the memory planner reads them: its arguments (the state
        and batch a step starts from) and its peak (arguments, unaliased outputs, temporaries), pinned_host left out."""
        key = id(self.current)
        if key not in self._compiled_bytes:
            analysis = self.current.memory_analysis()
            host = memory.host_state_bytes(self.abstract, self.placement, self.axis_sizes)
            self._compiled_bytes[key] = (memory.compiled_argument_bytes(analysis, host),
                                         memory.compiled_device_bytes(analysis, host))
        return self._compiled_bytes[key]

    def _dump(self, dump_dir: Path, placement: memory.Placement, grad_accum: int, compiled) -> None:
        """One compiled train step into ``dump_dir/<layout>/`` (framework/train/artifacts.py)."""
        about = {"mesh": self.axis_sizes, "devices": [d.id for d in self.devices], "grad_accum": grad_accum,
                 "placement": dict(zip(("params", "opt_state", "activations", "grads"), placement.key()))}
        host = memory.host_state_bytes(self.abstract, placement, self.axis_sizes)
        artifacts.dump_compiled(dump_dir / artifacts.layout_name(self.axis_sizes, grad_accum, placement), compiled,
                                about, host)

    def abstract_inputs(self, global_batch: int, seq_len: int, grad_accum: int) -> tuple:
        """The step's arguments as ShapeDtypeStructs on their shardings: the state, a batch of ``grad_accum`` micro-batches
        with the training loader's fields."""
        field = jax.ShapeDtypeStruct((grad_accum, global_batch // grad_accum, seq_len + 1), jnp.int32,
                                     sharding=self.batch_sharding)
        batch = {k: field for k in self.loader.fields}
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.abstract.shapes,
                             self.state_shardings)
        return state, batch

    # ------------------------------------------------------------------ the placement's moves inside the traced step

    def to_grads_tier(self, grads):
        """One micro-batch's gradients, sharded as the params, in ``memory.grads``'s kind (streamed params give them in pinned_host)."""
        if self.placement.grads == memory.HOST:
            return jax.device_put(grads, self.grad_shardings)
        return jax.lax.with_sharding_constraint(self.on_device(grads), self.device_state_shardings.params)

    def on_device(self, params_like):
        """Streamed parameters (and their gradients) to device memory for the update; otherwise unchanged."""
        return jax.device_put(params_like, self.device_state_shardings.params) if self.stream_params else params_like

    def host_params_shardings(self):
        """The params' shardings in pinned_host: where a host update (ZeRO-Offload) takes params and gradients."""
        return jax.tree.map(lambda s: s.with_memory_kind(memory.HOST), self.device_state_shardings.params)

    def master_view(self, params, param_dtype: str):
        """With the float32 master parameters on nvme: the device's compute-dtype parameters as float32, so that the
        model casts them as it casts the master copy and the gradients come out in float32 (memory/nvme.py)."""
        if self.nvme is None or not self.nvme.master:
            return params
        return jax.tree.map(lambda p: p.astype(param_dtype), params)

    def to_state_kinds(self, state):
        """What the step returns, back in the state's memory kinds (pinned_host state was used where it lives)."""
        return jax.device_put(state, self.state_shardings) if memory.HOST in self.placement.kinds().values() else state

    def held(self, state):
        """The state without the optimizer state when that lives in files (memory/nvme.py)."""
        return state if self.nvme is None else dataclasses.replace(state, opt_state=None)
