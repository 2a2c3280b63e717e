"""The plan for a model: trace its layers on an abstract micro-batch, plan them, store their kernels as planned."""
from __future__ import annotations

import functools
import math
import sys

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from framework.broadcast.cost import gather_fraction, splittable
from framework.broadcast.layers import channel_spec, trace_layers
from framework.broadcast.plan import BroadcastPlan, make_plan
from framework.config import ConfigError
from framework.sharding import batch_axes


def kernel_specs(plan: BroadcastPlan) -> dict[str, tuple[PartitionSpec, PartitionSpec]]:
    """Layer name -> (kernel spec, bias spec) as stored: split by output channel over the plan's axes, or replicated.

    A transposed kernel (a tied head reading the embedding table) gets the spec of its transpose.
    """
    out = {}
    for layer in plan.layers:
        if layer.split_kernel:
            k_spec = channel_spec(len(layer.kernel_shape), layer.out_axis, plan.axes)
            if layer.transposed:
                k_spec = PartitionSpec(*reversed(tuple(k_spec) + (None,) * (len(layer.kernel_shape) - len(k_spec))))
            out[layer.name] = (k_spec, PartitionSpec(plan.axes))
        else:
            out[layer.name] = (PartitionSpec(), PartitionSpec())
    return out


def unplannable(cfg, axis_sizes: dict[str, int]) -> str | None:
    """Why no plan can be made on this mesh, or None.

    Pipeline stages (``mesh.stage`` > 1); the micro-batch does not split over the batch axes; or, compiling for CPU, bfloat16 compute
    with a mesh axis of size > 1 outside them (the layers stay automatic on it, and XLA:CPU aborts
    on their bf16 reduce-scatters: see ``layers._manual_axes``). ``auto`` then falls back to XLA's
    propagation (an elastic restart on 6 devices with a global batch of 16 still trains); an
    explicit ``kernel``/``map`` refuses with this line.
    """
    axes = batch_axes(cfg.sharding.activation_rules, axis_sizes)
    devices = math.prod(axis_sizes[a] for a in axes)
    micro = cfg.train.global_batch // cfg.train.grad_accum
    if cfg.broadcast.mode == "none" or devices < 2:
        return None
    if axis_sizes.get("stage", 1) > 1:
        return f"broadcast.mode={cfg.broadcast.mode}: per-layer broadcast modes do not run inside pipeline stages"
    if axis_sizes.get("context", 1) > 1:
        return f"broadcast.mode={cfg.broadcast.mode}: per-layer broadcast modes do not split the sequence (mesh.context)"
    if micro % devices:
        return (f"broadcast.mode={cfg.broadcast.mode}: micro-batch {micro} (train.global_batch / train.grad_accum) "
                f"does not split over the {devices} devices of mesh axes {'*'.join(axes)}")
    auto_axes = [f"{a}={n}" for a, n in axis_sizes.items() if n > 1 and a not in axes]
    if cfg.train.dtype == "bfloat16" and auto_axes and jax.default_backend() == "cpu":
        return (f"broadcast.mode={cfg.broadcast.mode}: train.dtype=bfloat16 with mesh axis {', '.join(auto_axes)} outside "
                f"the batch axes {'*'.join(axes)} aborts XLA:CPU's compiler")
    return None


@functools.cache
def _say_once(line: str) -> None:
    """One line on stderr (the log: scripts print JSON reports on stdout), once per process: a script
    that plans the same model several times (plan.py's memory and broadcast sections) says it once."""
    print(line, file=sys.stderr, flush=True)


def plan_model(cfg, graphdef, abstract_params, axis_sizes: dict[str, int], resident_bytes: int = 0) -> BroadcastPlan | None:
    """Trace the model's forward on one abstract micro-batch and plan its layers.

    None with mode ``none``, on one device, or when ``auto`` falls back (``unplannable``: one line says so).

    With ``memory.device_budget_bytes`` set, a layer's broadcast buffers may use what it leaves
    after ``resident_bytes`` of training state per device; unset, memory limits no mode.
    """
    b = cfg.broadcast
    if b.mode == "none":
        return None
    axes = batch_axes(cfg.sharding.activation_rules, axis_sizes)
    devices = math.prod(axis_sizes[a] for a in axes)
    micro = cfg.train.global_batch // cfg.train.grad_accum
    if devices < 2:
        return None  # one device: nothing to broadcast
    reason = unplannable(cfg, axis_sizes)
    if reason is not None:
        if b.mode != "auto":
            raise ConfigError(reason)
        _say_once(f"{reason}: no plan, XLA's propagation decides every layer (as broadcast.mode=none)")
        return None
    tokens = jax.ShapeDtypeStruct((micro, cfg.train.seq_len), jnp.int32)
    traced = trace_layers(lambda p, t: nnx.merge(graphdef, p)(t), abstract_params, tokens)
    # A vocabulary table whose rows do not divide over P would have to be replicated, its gradient
    # all-reduced once per reader (lookup and tied head): XLA's own layout (width split) moves less.
    layers = [layer for layer in traced if not layer.param or splittable(layer, devices)]
    leaves = jax.tree.leaves(abstract_params)
    param_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
    stored_itemsize = param_bytes / sum(x.size for x in leaves)  # layers record the compute dtype, not the stored one
    # a tied table is read by two layers (lookup and head) but stored, and its gradient synced, once
    elements = {layer.param or layer.name: layer.repeats * (math.prod(layer.kernel_shape) + layer.bias_elements)
                for layer in layers}
    planned = round(stored_itemsize * sum(elements.values()))
    # Tables left to XLA, stored split by width over the batch axes (FSDP): gathered for each reader,
    # their gradient reduce-scattered once. Stored otherwise, they stay with the other parameters.
    left = [layer for layer in traced if layer not in layers]
    width_axes = next((a for logical, a in cfg.sharding.param_rules if logical == "embed"), None) or []
    width_split = any(a in axes and axis_sizes[a] > 1 for a in ([width_axes] if isinstance(width_axes, str) else width_axes))
    table_bytes = 0
    if width_split:
        for param in {layer.param for layer in left}:
            table = round(stored_itemsize * math.prod(next(x for x in left if x.param == param).kernel_shape))
            readers = sum(layer.param == param for layer in left)
            table_bytes += (readers + 1) * round(gather_fraction(devices) * table)
            planned += table
    total = cfg.memory.device_budget_bytes
    budget = None if total is None else max(total - resident_bytes, 0)
    return make_plan(layers, devices, axes, b, other_param_bytes=param_bytes - planned, budget_bytes=budget,
                     xla_table_bytes=table_bytes)


def with_kernel_specs(plan: BroadcastPlan, param_specs: dict, params: dict) -> dict:
    """``param_specs`` with each planned layer's kernel (and bias) stored as the plan needs them.

    A layer's kernel is ``<name>.kernel`` (bias ``<name>.bias``) unless the layer names its
    ``param`` (``embed``, ``unembed``). A scanned layer's stored kernel (in ``params``, shapes)
    has leading stacking dimensions (the layer axis): those keep the spec they had, the
    per-layer dimensions get the plan's.
    """
    out = jax.tree.map(lambda s: s, param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for name, (k_spec, b_spec) in kernel_specs(plan).items():
        layer = plan.get(name)
        path = (layer.param or f"{name}.kernel").split(".")
        node, shapes = out, params
        for key in path[:-1]:
            key = int(key) if key.isdigit() and int(key) in node else key
            node, shapes = node[key], shapes[key]
        leaf = path[-1]
        lead = len(shapes[leaf].shape) - len(layer.kernel_shape)
        node[leaf] = _stacked(node[leaf], k_spec, lead)
        if not layer.param and "bias" in node:
            node["bias"] = _stacked(node["bias"], b_spec, lead)
    return out


def _stacked(stored: PartitionSpec, spec: PartitionSpec, lead: int) -> PartitionSpec:
    """``spec`` behind the ``lead`` stacking dimensions, which keep ``stored``'s entries."""
    entries = tuple(stored) + (None,) * lead
    return PartitionSpec(*entries[:lead], *spec)
