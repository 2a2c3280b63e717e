"""Pipeline stages: the stacked layers cut into ``mesh.stage`` contiguous pieces, GPipe schedule.

The formulation is MaxText's "vmap over stages + shift": the stacked layer params
(layers, ...) are viewed as (stages, layers per stage, ...) with the stage dimension sharded
over the ``stage`` mesh axis, so each stage's devices hold only their own layers. A buffer
(stages, micro-batch, ...) holds each stage's current activation; every tick runs all stages
at once (``jax.vmap`` with ``spmd_axis_name``, each on its own devices) and then shifts the
buffer by one stage (``jnp.roll`` on the stage-sharded dimension, which XLA compiles to a
collective-permute: the ppermute between neighbouring stages). Micro-batch m enters stage 0
at tick m and leaves the last stage at tick m + stages - 1; ``jax.grad`` of the loop is the
backward pipeline. GPipe: all forwards, then all backwards, so each stage keeps the
activations of every micro-batch in flight; the bubble is (S - 1) / (M + S - 1).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from framework.config import Config, ConfigError
from framework.mesh import STAGE
from framework.sharding import constrain


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """How the model's layer stack is pipelined: stage count and micro-batches per forward."""

    stages: int
    microbatches: int

    def run(self, stage_fn: Callable, stacked, x: jax.Array, logical_axes, unroll_ticks: bool = False) -> jax.Array:
        """``stage_fn(stage's layers, h) -> h`` over the stacked layer leaves (layers, ...) as stages (``gpipe``).

        The model calls this on the pipeline it was built with, so it needs no import of this module.
        """
        return gpipe(stage_fn, to_stages(stacked, self.stages), x, self, logical_axes, unroll_ticks)


def check_config(cfg: Config) -> None:
    """What ``mesh.stage`` needs of the model, the slices and the broadcast modes (``framework.state.check_run``).

    A stage count of -1 is checked once the mesh fills it (``for_mesh``).
    """
    stage = cfg.mesh.stage
    if stage == 1:
        return
    check_stages(cfg, stage)
    if cfg.mesh.dcn_data != 1:
        raise ConfigError(f"mesh.stage={stage} with mesh.dcn_data={cfg.mesh.dcn_data}: pipeline stages are not supported "
                          "across slices; use mesh.dcn_data=1")
    if cfg.broadcast.mode in ("kernel", "map"):  # auto falls back to XLA's propagation (framework.broadcast.unplannable)
        raise ConfigError(f"mesh.stage={stage} with broadcast.mode={cfg.broadcast.mode}: per-layer broadcast modes do not "
                          "run inside pipeline stages; use broadcast.mode=none or auto")


def check_stages(cfg: Config, stages: int) -> None:
    """The model can be cut into ``stages`` contiguous pieces of stacked layers."""
    m = cfg.model
    if stages == -1 or stages == 1:
        return
    if m.name != "transformer" or not m.scan_layers:
        raise ConfigError(f"mesh.stage={stages} needs model.name=transformer with model.scan_layers=true "
                          f"(the stages cut the stacked layers), got model.name={m.name} model.scan_layers={m.scan_layers}")
    if m.n_layers % stages:
        raise ConfigError(f"model.n_layers={m.n_layers} is not divisible by mesh.stage={stages}")
    groups = m.n_layers // m.moe.every
    if m.moe.n_experts and m.moe.every > 1 and groups % stages:  # models/moe.py: the stack is of groups of `every` layers
        raise ConfigError(f"mesh.stage={stages} splits the MoE pattern unevenly: model.n_layers={m.n_layers} / "
                          f"model.moe.every={m.moe.every} = {groups} layer groups, not divisible by {stages} stages")


def for_mesh(cfg: Config, axis_sizes: Mapping[str, int]) -> Pipeline | None:
    """The model's pipeline on a mesh with a ``stage`` axis (None without one)."""
    stages = axis_sizes.get(STAGE, 1)
    if stages == 1:
        return None
    check_stages(cfg, stages)
    return Pipeline(stages, cfg.train.pipeline_microbatches)


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Share of the ticks a stage idles in a GPipe schedule: (S - 1) / (M + S - 1)."""
    return (stages - 1) / (microbatches + stages - 1)


def stage_layers(n_layers: int, stages: int) -> list[tuple[int, int]]:
    """[first, last] layer index of each stage: contiguous, equal pieces."""
    per = n_layers // stages
    return [(s * per, (s + 1) * per - 1) for s in range(stages)]


def to_stages(stacked, stages: int):
    """Stacked layer leaves (layers, ...) -> (stages, layers per stage, ...); the layer dim is already stage-sharded."""
    return jax.tree.map(lambda a: a.reshape(stages, a.shape[0] // stages, *a.shape[1:]), stacked)


def gpipe(stage_fn: Callable, stage_params, x: jax.Array, p: Pipeline, logical_axes, unroll_ticks: bool = False) -> jax.Array:
    """``stage_fn(params of one stage, h) -> h`` applied stage after stage to ``x`` (batch first), pipelined.

    ``logical_axes`` name x's dimensions (batch first) for the activation sharding rules.
    Micro-batch m takes rows m, m + M, m + 2M, ...: with the batch split over the data-parallel
    devices, each micro-batch stays split the same way (no data moves to form them).
    ``unroll_ticks``: the M + S - 1 ticks as straight-line code rather than a ``lax.scan``. Needed when
    ``stage_params`` live in pinned_host (memory.params): JAX (0.10.2) transposes a scan by starting
    its constants' cotangents from ``zeros_like_aval``, in device memory, and the gradient of a
    pinned_host constant then fails "Expected cotangent type float32<host>[...] but got float32[...]".
    The stage's own layer loop stays a loop (its weights are scanned-over inputs, not constants).
    """
    # the config makes M divide every step's batch; a trace of fewer rows (the planner's one-row
    # trace for checkpoint names) runs with as many micro-batches as divide it. ``x`` may be a pytree of
    # batch-first arrays (an MoE model's (x, routing sums)), ``logical_axes`` then one tuple per leaf.
    tree = jax.tree
    rows_total = tree.leaves(x)[0].shape[0]
    S, M = p.stages, math.gcd(p.microbatches, rows_total)
    rows = rows_total // M
    xs = tree.map(lambda a: jnp.swapaxes(a.reshape(rows, M, *a.shape[1:]), 0, 1), x)  # (M, rows, ...)
    axes = logical_axes if isinstance(x, tuple) else (logical_axes,)
    buffer_axes = tuple(("stage", *a) for a in axes)

    def pin(t):
        return constrain_tree(t, buffer_axes if isinstance(x, tuple) else buffer_axes[0])

    run_stages = jax.vmap(stage_fn, spmd_axis_name=STAGE)  # each stage on its own devices

    def tick(carry, t):
        prev, outs = carry

        def feed(xs, prev):
            first = (jnp.arange(S) == 0).reshape(S, *(1,) * (xs.ndim - 1))
            shifted = jnp.roll(prev, 1, axis=0)  # stage s takes what stage s-1 gave last tick (collective-permute)
            return jnp.where(first, jax.lax.dynamic_index_in_dim(xs, jnp.minimum(t, M - 1), 0), shifted)

        out = pin(run_stages(stage_params, pin(tree.map(feed, xs, prev))))
        # the last stage finishes micro-batch t - (S-1); earlier ticks write slot 0, which tick S-1 overwrites
        outs = tree.map(lambda o, a: jax.lax.dynamic_update_index_in_dim(o, a[S - 1], jnp.maximum(t - (S - 1), 0), 0), outs, out)
        return (out, outs), None

    carry = (pin(tree.map(lambda a: jnp.zeros((S, *a.shape[1:]), a.dtype), xs)), tree.map(jnp.zeros_like, xs))
    if unroll_ticks:
        for t in range(M + S - 1):
            carry, _ = tick(carry, jnp.int32(t))
    else:
        carry, _ = jax.lax.scan(tick, carry, jnp.arange(M + S - 1))
    return tree.map(lambda o, a: jnp.swapaxes(o, 0, 1).reshape(a.shape), carry[1], x)


def constrain_tree(tree, logical_axes):
    """``constrain`` on each array of ``tree`` (an array, or a tuple of arrays with one logical-axes tuple each)."""
    if not isinstance(tree, tuple):
        return constrain(tree, logical_axes)
    return tuple(constrain(a, axes) for a, axes in zip(tree, logical_axes))


# ------------------------------------------------------------------ the planner's view per stage


@dataclasses.dataclass
class StagePlan:
    stage: int
    layers: tuple[int, int]  # first, last layer index
    param_bytes: int  # per device of this stage: its layers' shards plus the unpipelined params (embeddings, final norm)
    activation_bytes: int  # per device: activations kept for the micro-batches in flight (GPipe: all M)


@dataclasses.dataclass
class PipelinePlan:
    stages: int
    microbatches: int
    rows_per_microbatch: int
    bubble_fraction: float
    per_stage: list[StagePlan]
    activation_source: str
    param_memory: str  # where the param bytes live (memory.params): pinned_host streams them per layer

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan(n_layers: int, p: Pipeline, micro_batch: int, layer_param_bytes: int, other_param_bytes: int,
         layer_activation_bytes: int, source: str, param_memory: str) -> PipelinePlan:
    """Per stage: layers, param bytes per device, activation bytes of the in-flight micro-batches, and the bubble.

    ``layer_param_bytes``: one device's shard of all stacked layers (already divided by the stage count);
    ``layer_activation_bytes``: what one layer keeps for backward, per device, for one pipeline micro-batch.
    """
    per_stage = n_layers // p.stages
    stages = [
        StagePlan(s, layers, layer_param_bytes + other_param_bytes, p.microbatches * per_stage * layer_activation_bytes)
        for s, layers in enumerate(stage_layers(n_layers, p.stages))
    ]
    return PipelinePlan(p.stages, p.microbatches, micro_batch // p.microbatches, bubble_fraction(p.stages, p.microbatches),
                        stages, source, param_memory)


def format_plan(plan: Mapping) -> list[str]:
    """The per-stage table printed by scripts/plan.py."""
    lines = [f"pipeline: {plan['stages']} stages x {plan['microbatches']} micro-batches of {plan['rows_per_microbatch']} rows "
             f"(GPipe), bubble (S-1)/(M+S-1) = {plan['bubble_fraction']:.1%}",
             f"  {'stage':>5}  {'layers':<9} {'param bytes':>15} {'activation bytes':>17}"]
    for s in plan["per_stage"]:
        first, last = s["layers"]
        lines.append(f"  {s['stage']:>5}  {f'{first}-{last}':<9} {s['param_bytes']:>15,} {s['activation_bytes']:>17,}")
    lines.append(f"  (per device; params in {plan['param_memory']}; activations: {plan['activation_source']})")
    return lines
