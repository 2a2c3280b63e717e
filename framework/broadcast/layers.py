"""The runners installed into ``models.ops``: shard_map layers that obey a plan, and the shape recorder.

A planned layer runs in its plan's mode over the P devices that split the batch: ``kernel``
all-gathers the kernel (split by output channel, optionally compressed) next to the
batch-split feature map; ``map`` all-gathers the feature map next to the kernel's channel
slice, and an all-to-all returns the output to the batch layout unless the next layer of its
chain is ``map`` too (it then gathers straight from the channel layout). A lookup's ``map``
mode looks every device's tokens up in the local vocabulary slice and reduce-scatters the
partial embeddings. Each layer's collectives sit in its ``layer_scope``, so the bytes XLA
compiles can be checked against the plan layer by layer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from framework.broadcast.compress import gather_kernel
from framework.broadcast.cost import LayerShape
from framework.broadcast.plan import BroadcastPlan
from framework.collectives import layer_scope
from models import ops


def channel_spec(ndim: int, axis: int, axes) -> PartitionSpec:
    """Dimension ``axis`` of an ``ndim``-dimensional array split over ``axes``, the others whole."""
    parts = [None] * ndim
    parts[axis] = axes
    return PartitionSpec(*parts)


def _manual_axes(mesh, axes) -> set[str]:
    """The plan's axes plus every mesh axis of size 1 (which moves nothing), so the layer is manual on them all.

    Left automatic, a size-1 axis makes JAX put a sharding constraint inside the reducer of each
    psum/reduce-scatter, which XLA:CPU lowers to a ``copy`` at the reducer's root; its pass that
    widens bfloat16 reductions to float32 (AllReducePromotion) then aborts with "Invalid binary
    instruction opcode copy" (reproducer: BENCHMARKS.md, "bfloat16 compute").
    """
    return set(axes) | {a for a, n in zip(mesh.axis_names, mesh.axis_sizes) if n == 1}


@dataclasses.dataclass(frozen=True)
class _PlanRunner:
    """Runs each layer named in ``plan`` in its planned mode on ``mesh``; other layers stay plain."""

    plan: BroadcastPlan
    mesh: Any

    def apply(self, call: ops.LayerCall, compute: Callable, x, kernel, bias):
        layer = self.plan.get(call.name)
        if layer is None:
            return ops.plain_apply(compute, x, kernel, bias)
        plain = functools.partial(ops.plain_apply, compute)
        mesh, axes, out_axis = self.mesh, self.plan.axes, call.out_axis
        y_ndim = jax.eval_shape(plain, x, kernel, bias).ndim
        y_channel_axis = y_ndim - (kernel.ndim - out_axis)  # first output-channel dimension of y

        def body(x, kernel, bias):
            with layer_scope(call.name):
                if layer.mode == "kernel":
                    if layer.split_kernel:
                        kernel = gather_kernel(kernel, axes, out_axis, layer.compress)
                        if bias is not None:
                            bias = jax.lax.all_gather(bias, axes, axis=0, tiled=True)
                    return plain(x, kernel, bias)
                x = jax.lax.all_gather(x, axes, axis=0 if layer.in_layout == "batch" else x.ndim - 1, tiled=True)
                y = plain(x, kernel, bias)
                if layer.out_layout == "batch":
                    y = jax.lax.all_to_all(y, axes, 0, y_channel_axis, tiled=True)
                return y

        channel_split = layer.split_kernel
        x_spec = PartitionSpec(axes) if layer.in_layout == "batch" else channel_spec(x.ndim, x.ndim - 1, axes)
        k_spec = channel_spec(kernel.ndim, out_axis, axes) if channel_split else PartitionSpec()
        b_spec = PartitionSpec(axes) if channel_split else PartitionSpec()
        y_spec = PartitionSpec(axes) if layer.out_layout == "batch" else channel_spec(y_ndim, y_ndim - 1, axes)
        if bias is None:
            fn = jax.shard_map(lambda x, k: body(x, k, None), mesh=mesh, in_specs=(x_spec, k_spec), out_specs=y_spec,
                               axis_names=_manual_axes(mesh, axes))
            return fn(x, kernel)
        fn = jax.shard_map(body, mesh=mesh, in_specs=(x_spec, k_spec, b_spec), out_specs=y_spec,
                           axis_names=_manual_axes(mesh, axes))
        return fn(x, kernel, bias)

    def lookup(self, call: ops.LayerCall, tokens, table, dtype):
        """The table travels in ``dtype``.

        ``kernel``: all-gather the table (split by vocabulary), look up the local tokens; its
        gradient is reduce-scattered. ``map``: gather every device's token ids, look them up in the
        local vocabulary slice (zero elsewhere) and reduce-scatter the partial embeddings back to
        the batch layout; the backward pass all-gathers the embeddings' gradient.
        """
        layer = self.plan.get(call.name)
        if layer is None:
            return ops.plain_lookup(tokens, table, dtype)
        table = table.astype(dtype)
        mesh, axes = self.mesh, self.plan.axes

        def body(tokens, table):
            with layer_scope(call.name):
                if layer.mode == "kernel":
                    if layer.split_kernel:
                        table = jax.lax.all_gather(table, axes, axis=0, tiled=True)
                    return jnp.take(table, tokens, axis=0)
                tokens = jax.lax.all_gather(tokens, axes, axis=0, tiled=True)
                local = tokens - jax.lax.axis_index(axes) * table.shape[0]
                hit = (local >= 0) & (local < table.shape[0])
                rows = jnp.take(table, jnp.clip(local, 0, table.shape[0] - 1), axis=0)
                rows = jnp.where(hit[..., None], rows, jnp.zeros((), rows.dtype))
                return jax.lax.psum_scatter(rows, axes, scatter_dimension=0, tiled=True)

        t_spec = PartitionSpec(axes, *([None] * (table.ndim - 1))) if layer.split_kernel else PartitionSpec()
        fn = jax.shard_map(body, mesh=mesh, in_specs=(PartitionSpec(axes), t_spec), out_specs=PartitionSpec(axes),
                           axis_names=_manual_axes(mesh, axes))
        return fn(tokens, table)


@contextlib.contextmanager
def use_plan(plan: BroadcastPlan | None, mesh):
    """While tracing a step, run the layers named in ``plan`` in their planned modes on ``mesh`` (None: all plain)."""
    with ops.use_runner(None if plan is None else _PlanRunner(plan, mesh)):
        yield


def _layer_shape(call: ops.LayerCall, x, kernel_shape, out_shape, param_bytes: int, out_bytes: int,
                 bias: bool) -> LayerShape:
    return LayerShape(
        name=call.name, kind=call.kind, kernel_shape=tuple(kernel_shape), out_axis=call.out_axis, in_shape=tuple(x.shape),
        out_shape=tuple(out_shape), act_bytes=jnp.dtype(x.dtype).itemsize, param_bytes=param_bytes, bias=bias,
        input_grad=call.input_grad, chained=call.chained, repeats=call.repeats, out_bytes=out_bytes,
        param=call.param, transposed=call.transposed,
    )


class _Recorder:
    """Records each layer call's shapes and the value it reads, then runs it as the runner it stands in for would."""

    def __init__(self, inner: ops.Runner | None):
        self.inner = inner
        self.calls: list[tuple[LayerShape, Any]] = []

    def apply(self, call: ops.LayerCall, compute: Callable, x, kernel, bias):
        y = jax.eval_shape(functools.partial(ops.plain_apply, compute), x, kernel, bias)
        self.calls.append((_layer_shape(call, x, kernel.shape, y.shape, jnp.dtype(kernel.dtype).itemsize,
                                        jnp.dtype(y.dtype).itemsize, bias is not None), x))
        if self.inner is None:
            return ops.plain_apply(compute, x, kernel, bias)
        return self.inner.apply(call, compute, x, kernel, bias)

    def lookup(self, call: ops.LayerCall, tokens, table, dtype):
        out_shape = (*tokens.shape, table.shape[1])
        self.calls.append((_layer_shape(call, tokens, table.shape, out_shape, dtype.itemsize, dtype.itemsize, False), tokens))
        if self.inner is None:
            return ops.plain_lookup(tokens, table, dtype)
        return self.inner.lookup(call, tokens, table, dtype)


def trace_layers(fn: Callable, *abstract_args) -> list[LayerShape]:
    """The broadcast layers ``fn`` calls, in call order, with their shapes (abstract trace, no FLOPs).

    Consecutive layers reading the same traced value (attention's query/key/value) get one
    ``input_group``: XLA gathers that feature map once for all of them.
    """
    recorder = _Recorder(ops.current_runner())
    with ops.use_runner(recorder):
        jax.eval_shape(lambda *a: fn(*a), *abstract_args)  # a fresh function: a cached trace would record nothing
    calls = recorder.calls
    layers, group = [], 0
    for i, (layer, x) in enumerate(calls):
        if any(layer.name == other.name for other in layers):
            raise ValueError(f"broadcast layer name {layer.name!r} is used twice; layer names must be unique")
        group += i > 0 and x is not calls[i - 1][1]
        layers.append(dataclasses.replace(layer, input_group=group))
    return layers
