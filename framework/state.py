"""TrainState, and the abstract chain config -> model -> shapes -> PartitionSpecs.

``abstract_state`` is shared by the Trainer and ``scripts/plan.py`` so that what the
planner prints is what training does; it needs no devices (only mesh axis sizes).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec

from framework import broadcast, pipeline, sharding
from framework.memory import nvme_rules
from framework.config import Config
from framework.config.validation import check_expert_axis
from framework.optimizer import build_optimizer
from models import build_model


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything training needs to continue exactly: saved and restored as one pytree."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # nested dict of arrays (the model's nnx.Param state as a pure dict)
    opt_state: Any  # optax state
    rng: jax.Array  # uint32 key data
    data_pos: jax.Array  # int32 scalar: index of the next batch


@dataclasses.dataclass
class AbstractState:
    """Shapes and specs of a run's state for a mesh shape: plain values for the next stages."""

    graphdef: Any  # nnx.GraphDef of the model
    shapes: TrainState  # of jax.ShapeDtypeStruct
    specs: TrainState  # of PartitionSpec
    logical_axes: dict  # params' logical axis names
    tx: optax.GradientTransformation
    broadcast_plan: Any = None  # framework.broadcast.BroadcastPlan, or None with broadcast.mode=none
    resident_bytes: int = 0  # per device: params, grads and optimizer state (what a plan's buffers come on top of)

    @property
    def param_count(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.shapes.params))


def dtype_of(name: str):
    return jnp.dtype(name)


def model_kwargs(cfg: Config) -> dict:
    return dict(dtype=dtype_of(cfg.train.dtype), param_dtype=dtype_of(cfg.train.param_dtype))


def build_params(cfg: Config, seed: int, **model_kw) -> tuple[Any, dict]:
    """(graphdef, params as a pure dict); traced abstractly or under jit, never eagerly sharded."""
    with nnx.use_eager_sharding(False):
        model = build_model(cfg.model, rngs=nnx.Rngs(seed), **model_kwargs(cfg), **model_kw)
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def _device_bytes(shapes, specs, axis_sizes: dict[str, int]) -> int:
    """Bytes of one device's shards of ``shapes`` laid out by ``specs`` (params + grads, opt state: what stays resident)."""
    def one(x, spec):
        split = 1
        for entry in spec:
            for a in (entry,) if isinstance(entry, str) else entry or ():
                split *= axis_sizes.get(a, 1)
        return x.size * x.dtype.itemsize // split
    return sum(jax.tree.leaves(jax.tree.map(one, shapes, specs, is_leaf=lambda s: isinstance(s, PartitionSpec))))


def check_run(cfg: Config) -> None:
    """The checks that need a concern's knowledge (config itself knows no other module): the NVMe tier's
    rules when it is used, and what pipeline stages need. ``abstract_state`` runs them first, so every
    run that is assembled (the Trainer, scripts/plan.py, the benchmarks) gets them."""
    if "nvme" in (cfg.memory.opt_state, cfg.memory.params):
        nvme_rules.check_config(cfg)
    pipeline.check_config(cfg)


def abstract_state(cfg: Config, axis_sizes: dict[str, int], **model_kw) -> AbstractState:
    check_run(cfg)
    check_expert_axis(cfg, axis_sizes)
    p = pipeline.for_mesh(cfg, axis_sizes)
    if p is not None:
        model_kw = {"pipeline": p, **model_kw}
    with nnx.use_eager_sharding(False):
        abstract_model = nnx.eval_shape(
            lambda: build_model(cfg.model, rngs=nnx.Rngs(0), **model_kwargs(cfg), **model_kw)
        )
    graphdef, param_state = nnx.split(abstract_model, nnx.Param)
    logical_axes = sharding.param_logical_axes(param_state)
    params = nnx.to_pure_dict(param_state)
    tx = build_optimizer(cfg.optimizer, cfg.train.steps)
    opt_state = jax.eval_shape(tx.init, params)
    rules = sharding.rules_table(cfg.sharding.param_rules)
    param_specs = sharding.param_specs(params, logical_axes, rules, axis_sizes)
    opt_specs = sharding.opt_state_specs(tx, opt_state, param_specs, params)
    resident = 2 * _device_bytes(params, param_specs, axis_sizes) + _device_bytes(opt_state, opt_specs, axis_sizes)
    broadcast_plan = broadcast.plan_model(cfg, graphdef, params, axis_sizes, resident)  # issue 6: stores planned kernels split
    if broadcast_plan is not None:
        param_specs = broadcast.with_kernel_specs(broadcast_plan, param_specs, params)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    shapes = TrainState(
        step=scalar,
        params=params,
        opt_state=opt_state,
        rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
        data_pos=scalar,
    )
    specs = TrainState(
        step=PartitionSpec(),
        params=param_specs,
        opt_state=sharding.opt_state_specs(tx, opt_state, param_specs, params),
        rng=PartitionSpec(),
        data_pos=PartitionSpec(),
    )
    return AbstractState(graphdef, shapes, specs, logical_axes, tx, broadcast_plan, resident)


def broadcast_plan_for(cfg: Config, abstract: AbstractState, axis_sizes: dict[str, int], grad_accum: int):
    """``abstract``'s broadcast plan re-made for micro-batches of ``train.global_batch // grad_accum`` rows (the
    micro-batch changed: what each mode moves scales with it). Where kernels are stored does not change (a
    layer's split depends on the device count alone), so the state's specs stay as they are."""
    if abstract.broadcast_plan is None:
        return None
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=grad_accum))
    return broadcast.plan_model(cfg, abstract.graphdef, abstract.shapes.params, axis_sizes, abstract.resident_bytes)


def init_state(cfg: Config, tx: optax.GradientTransformation, params: Any = None, **model_kw) -> TrainState:
    """Fresh state; call under ``jax.jit(out_shardings=...)`` so params are born sharded.

    ``params``: start from these (e.g. imported from Hugging Face) instead of the random init.
    """
    if params is None:
        _, param_state = build_params(cfg, cfg.train.seed, **model_kw)
        params = nnx.to_pure_dict(param_state)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(cfg.train.seed + 1)),
        data_pos=jnp.zeros((), jnp.int32),
    )
