"""Logical axis rules -> PartitionSpecs for parameters, optimizer state and activations.

Models name the dimensions of every weight and activation (``embed``, ``mlp``, ``heads``...);
this module is the one place that turns those names into mesh axes. Parameter rules and
activation rules are separate tables (FSDP shards a weight's ``embed`` dimension, but an
activation's ``embed`` dimension stays whole while its ``batch`` is split).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

Rules = Mapping[str, tuple[str, ...]]


def rules_table(rules: Sequence[Sequence[Any]]) -> dict[str, tuple[str, ...]]:
    """Config rules ``[[logical, mesh_axis | [axes] | null], ...]`` -> {logical: (mesh axes,)}."""
    table = {}
    for logical, axes in rules:
        if axes is None:
            table[logical] = ()
        elif isinstance(axes, str):
            table[logical] = (axes,)
        else:
            table[logical] = tuple(axes)
    return table


def batch_axes(activation_rules: Sequence[Sequence[Any]], axis_sizes: Mapping[str, int]) -> tuple[str, ...]:
    """The mesh axes the activation rules split the batch over, of those the mesh has: the data-parallel
    devices of the step, the loader, every broadcast plan and every try-run layout (the one place this is worked out)."""
    return tuple(a for a in rules_table(activation_rules).get("batch", ()) if a in axis_sizes)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: Rules,
    axis_sizes: Mapping[str, int],
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Map each named dimension to its mesh axes.

    A mesh axis is used at most once per array (first dimension wins). When ``shape`` is
    given, a dimension whose size the mesh axes do not divide stays whole, since jit
    shardings need even shards (e.g. GPT-2's vocabulary of 50257 over tensor=8).
    """
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        axes = tuple(a for a in rules.get(name, ()) if a in axis_sizes and a not in used) if name else ()
        if shape is not None and axes and shape[i] % math.prod(axis_sizes[a] for a in axes):
            axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _logical_axes_of(variable: nnx.Variable) -> tuple:
    meta = variable.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(key)
        if names is not None:
            return tuple(names)
    return (None,) * len(variable.shape)


def param_logical_axes(abstract_param_state: nnx.State) -> dict:
    """Pure dict (same structure as the params) of each parameter's logical axis names."""
    return nnx.to_pure_dict(
        jax.tree.map(
            lambda v: v.replace(_logical_axes_of(v)),
            abstract_param_state,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
    )


def param_specs(abstract_params: dict, logical_axes: dict, rules: Rules, axis_sizes: Mapping[str, int]) -> dict:
    """PartitionSpec per parameter, from its logical names and shape."""
    return jax.tree.map(
        lambda x, names: logical_to_spec(names, rules, axis_sizes, x.shape),
        abstract_params,
        logical_axes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def opt_state_specs(tx: optax.GradientTransformation, abstract_opt_state, params_specs: dict, abstract_params):
    """Optimizer moments shaped as their parameter get its spec; other per-parameter statistics (adafactor's
    factored rows and columns, its placeholders), counters and scalars are replicated."""
    return optax.tree_map_params(
        tx,
        lambda x, spec, p: spec if x.shape == p.shape else PartitionSpec(),
        abstract_opt_state,
        params_specs,
        abstract_params,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def named(mesh, specs, memory_kind: str | None = None):
    """A pytree of PartitionSpecs -> NamedShardings on ``mesh`` (optionally in a memory kind)."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s, memory_kind=memory_kind),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def bytes_per_device(abstract_tree, specs, axis_sizes: Mapping[str, int]) -> int:
    """Bytes one device holds of a pytree sharded by ``specs`` (no devices needed)."""
    total = 0
    for x, spec in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, PartitionSpec))):
        shard = list(x.shape)
        for i, axes in enumerate(spec):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else axes
            shard[i] //= math.prod(axis_sizes[a] for a in axes)
        total += math.prod(shard) * x.dtype.itemsize
    return total


# ------------------------------------------------------------------ activations

_ACTIVATION_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("meshpilot_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh, rules: Rules):
    """While tracing a step, make ``constrain`` pin activations to ``mesh`` by ``rules``."""
    token = _ACTIVATION_CONTEXT.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVATION_CONTEXT.reset(token)


def activation_context():
    """(mesh, rules) while a step is traced under ``activation_sharding``, else None (layers that shard_map themselves)."""
    return _ACTIVATION_CONTEXT.get()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint at a layer boundary; a no-op outside ``activation_sharding``."""
    ctx = _ACTIVATION_CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    axis_sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    spec = logical_to_spec(logical_axes, rules, axis_sizes, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
