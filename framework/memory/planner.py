"""Memory tiers, the planner: bytes per device of each category in each memory kind.

Counts what one device holds of each category on a mesh (a real ``Mesh`` or an
``AbstractMesh``; no devices needed): params, optimizer state and batch exactly from shard
shapes, activations estimated from the traced loss's residuals or read from the compiled
step's ``memory_analysis()``. Each figure says which it is.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.extend
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType

from framework import pipeline, sharding
from framework.config import Config, ConfigError, MemoryConfig
from framework.data.batch import batch_fields
from framework.memory.policy import (ACTIVATION_MODES, CATEGORIES, DEVICE, HOST, KINDS, NVME, Placement,
                                     PlacementPolicy, has_auto, layer_policy)


def shard_bytes(tree) -> dict[str, int]:
    """Bytes of real arrays' shards on the most loaded device, per memory kind (the ground truth the planner must match)."""
    per_device: dict[tuple, int] = {}
    for leaf in jax.tree.leaves(tree):
        kind = leaf.sharding.memory_kind or DEVICE
        for shard in leaf.addressable_shards:
            key = (shard.device, kind)
            per_device[key] = per_device.get(key, 0) + shard.data.nbytes
    return {kind: max((b for (_, k), b in per_device.items() if k == kind), default=0) for kind in KINDS}


def residual_bytes(fn: Callable, *args, micro_batch: int, batch_shards: int, n_devices: int, seq_len: int = 0,
                   seq_shards: int = 1) -> dict[str, int]:
    """Estimated bytes per device of what ``fn``'s backward pass keeps from its forward pass, per memory kind.

    Traces ``jax.vjp(fn, *args)`` abstractly and sums the residuals that are not the
    inputs themselves. A residual with a dimension of ``micro_batch`` rows is taken to be
    split over ``batch_shards`` devices (and, with a dimension of ``seq_len`` tokens too, over the
    ``seq_shards`` devices of the context axis), any other over all ``n_devices``: an estimate
    (tensor-parallel splits of activations are not counted).
    """
    closed, out_shape = jax.make_jaxpr(lambda *a: jax.vjp(fn, *a), return_shape=True)(*args)
    n_res = len(jax.tree.leaves(out_shape[1]))
    inputs = set(closed.jaxpr.invars)
    seen: set = set()
    out = {k: 0 for k in KINDS}
    for var in closed.jaxpr.outvars[len(closed.jaxpr.outvars) - n_res:]:
        if not isinstance(var, jax.extend.core.Var) or var in inputs or var in seen:
            continue
        seen.add(var)
        aval = var.aval
        nbytes = math.prod(aval.shape) * aval.dtype.itemsize
        shards = batch_shards if micro_batch in aval.shape else n_devices
        if micro_batch in aval.shape and seq_len in aval.shape:
            shards *= seq_shards
        kind = HOST if str(getattr(aval, "memory_space", "")).endswith("Host") else DEVICE
        out[kind] += -(-nbytes // shards)
    return out


@dataclasses.dataclass
class MemoryNeeds:
    """Bytes per device of each category on one mesh, before placement (plain numbers for the policy)."""

    params: int
    grads: int
    opt_state: int
    batch: int
    activations: dict[str, dict[str, int]]  # activation mode -> memory kind -> bytes
    activation_source: str  # where the activation numbers come from (compiled program or estimate)
    params_compute: int = 0  # the params in the compute dtype (train.dtype): on the device when their master copy is on nvme

    def figures(self) -> dict[str, str]:
        """Category -> how its figure was obtained: ``exact`` (shard shapes), ``compiled`` or ``estimated``."""
        measured = "compiled" if self.activation_source.startswith("compiled") else "estimated"
        return {"params": "exact", "grads": measured, "opt_state": "exact", "activations": measured, "batch": "exact"}


def category_bytes(needs: MemoryNeeds, placement: Placement) -> dict[str, dict[str, int]]:
    """Category -> memory kind -> bytes per device under ``placement``."""
    out = {c: {k: 0 for k in KINDS} for c in CATEGORIES}
    out["params"][placement.params] = needs.params
    if placement.params == NVME:  # the float32 master copy in files, the compute-dtype copy on the device
        out["params"][DEVICE] = needs.params_compute
    out["opt_state"][placement.opt_state] = needs.opt_state
    out["grads"][placement.grads] = needs.grads
    out["batch"][DEVICE] = needs.batch
    out["activations"] = dict(needs.activations[placement.activations])
    return out


def device_share(needs: MemoryNeeds, placement: Placement) -> int:
    return sum(b[DEVICE] for b in category_bytes(needs, placement).values())


def device_bytes_by_category(needs: MemoryNeeds, placement: Placement) -> dict[str, int]:
    return {c: b[DEVICE] for c, b in category_bytes(needs, placement).items()}


@dataclasses.dataclass
class MemoryPlan:
    """What the planner reports: bytes per device per category per memory kind, and the placement chosen."""

    mesh: dict[str, int]
    budget_bytes: int | None
    placement: Placement
    bytes: dict[str, dict[str, int]]
    activation_source: str
    figures: dict[str, str]  # category -> exact | compiled | estimated
    disk_bytes_per_process: int | None = None  # the nvme tier's files of one process (memory/nvme.py), None without it

    @property
    def totals(self) -> dict[str, int]:
        return {k: sum(b[k] for b in self.bytes.values()) for k in KINDS}

    @property
    def fits(self) -> bool | None:
        return None if self.budget_bytes is None else self.totals[DEVICE] <= self.budget_bytes

    def to_dict(self) -> dict:
        return {
            "mesh": self.mesh,
            "budget_bytes": self.budget_bytes,
            "bytes_per_device": self.bytes,
            "figures": self.figures,
            "totals": self.totals,
            "fits": self.fits,
            "placement": {"params": self.placement.params, "opt_state": self.placement.opt_state,
                          "activations": self.placement.activations, "grads": self.placement.grads, "batch": DEVICE},
            "reasons": self.placement.reasons,
            "activation_source": self.activation_source,
            "disk_bytes_per_process": self.disk_bytes_per_process,
        }


def make_plan(needs: MemoryNeeds, placement: Placement, mesh_axes: Mapping[str, int], budget: int | None,
              disk_bytes_per_process: int | None = None) -> MemoryPlan:
    return MemoryPlan(dict(mesh_axes), budget, placement, category_bytes(needs, placement), needs.activation_source,
                      needs.figures(), disk_bytes_per_process)


def plan_memory(cfg: MemoryConfig, needs: MemoryNeeds, mesh_axes: Mapping[str, int], budget: int | None,
                policy: PlacementPolicy | None = None) -> MemoryPlan:
    """The placement and its bytes from estimated ``needs`` (no devices: ``scripts/plan.py`` on an abstract mesh)."""
    if budget is None and has_auto(cfg):
        raise ConfigError("memory.device_budget_bytes is required for auto placement (no device capacity known)")
    placement = (policy or PlacementPolicy()).place(cfg, functools.partial(device_bytes_by_category, needs), budget)
    return make_plan(needs, placement, mesh_axes, budget)


def format_plan(plan: dict) -> list[str]:
    """Text lines of a plan's ``to_dict()`` for ``scripts/plan.py``."""
    mib = lambda b: f"{b / 2**20:10.2f} MiB"
    budget = "none" if plan["budget_bytes"] is None else f"{plan['budget_bytes'] / 2**20:.2f} MiB"
    lines = [f"memory per device (budget {budget}; activations: {plan['activation_source']})",
             f"  {'category':<12}{'device':>14}{'pinned_host':>15}  {'figure':<10}placement"]
    for c, b in plan["bytes_per_device"].items():
        reason = plan["reasons"].get(c, "")
        lines.append(f"  {c:<12}{mib(b[DEVICE]):>14}{mib(b[HOST]):>15}  {plan['figures'][c]:<10}{plan['placement'][c]}"
                     + (f" ({reason})" if reason else ""))
    for c, b in plan["bytes_per_device"].items():
        if b.get("nvme"):
            lines.append(f"  {c:<12}{mib(b['nvme']):>14} per device in files under memory.nvme_dir (nvme)")
    if plan.get("disk_bytes_per_process") is not None:
        lines.append(f"  {'nvme files':<12}{mib(plan['disk_bytes_per_process']):>14} per process (its unique shards)")
    t = plan["totals"]
    fits = "" if plan["fits"] is None else ("  fits" if plan["fits"] else "  DOES NOT FIT")
    lines.append(f"  {'total':<12}{mib(t[DEVICE]):>14}{mib(t[HOST]):>15}{fits}")
    return lines


# ------------------------------------------------------------------ the run's needs (config -> model -> bytes)


def state_needs(cfg: Config, abstract, axis_sizes: Mapping[str, int], batch_axes: Sequence[str],
                grad_accum: int) -> MemoryNeeds:
    """Exact bytes per device of params, grads, optimizer state and batch (shard shapes); no activations yet.

    ``abstract`` is the run's ``framework.state.AbstractState`` on this mesh (shapes and specs).
    """
    t = cfg.train
    micro = t.global_batch // grad_accum
    dp = math.prod(axis_sizes[a] for a in batch_axes)
    params = sharding.bytes_per_device(abstract.shapes.params, abstract.specs.params, axis_sizes)
    compute = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(t.dtype)), abstract.shapes.params)
    return MemoryNeeds(
        params=params,
        grads=params * (2 if grad_accum > 1 else 1),  # the gradient, plus the accumulator across micro-batches
        opt_state=sharding.bytes_per_device(abstract.shapes.opt_state, abstract.specs.opt_state, axis_sizes),
        batch=grad_accum * -(-micro // dp) * (t.seq_len + 1) * 4 * len(batch_fields(cfg.data)),
        activations={},
        activation_source="",
        params_compute=sharding.bytes_per_device(compute, abstract.specs.params, axis_sizes),
    )


def estimate_needs(cfg: Config, abstract, axis_sizes: Mapping[str, int], batch_axes: Sequence[str],
                   grad_accum: int, loss_for: Callable[[Callable | None], Callable]) -> MemoryNeeds:
    """Bytes per device per category for the run ``cfg`` on a mesh of ``axis_sizes``; no devices needed.

    Params, grads and optimizer state are exact (shard shapes); activations are estimated from
    the residuals of the traced loss (one micro-batch) for each activation mode. ``loss_for(remat_policy)``
    gives the run's objective ``(params, batch) -> loss`` on the model built with that layer checkpoint
    policy (``Trainer.loss_for``: a subclass's ``loss_fn`` is what is measured).
    """
    t = cfg.train
    micro = t.global_batch // grad_accum
    dp = math.prod(axis_sizes[a] for a in batch_axes)
    field = jax.ShapeDtypeStruct((micro, t.seq_len + 1), jnp.int32)
    batch = {k: field for k in batch_fields(cfg.data)}  # the fields the run's batches hold (segment ids: masks)
    activations = {}
    params = abstract.shapes.params
    seq_shards, traced_as = context_split(cfg, axis_sizes)
    with traced_as:
        for mode in ACTIVATION_MODES:
            loss = loss_for(layer_policy(cfg, mode, loss_for(None), params))
            activations[mode] = residual_bytes(loss, params, batch, micro_batch=micro, batch_shards=dp,
                                               n_devices=math.prod(axis_sizes.values()), seq_len=t.seq_len,
                                               seq_shards=seq_shards)
    return dataclasses.replace(
        state_needs(cfg, abstract, axis_sizes, batch_axes, grad_accum),
        activations=activations,
        activation_source=f"estimate: residuals of the traced loss for one micro-batch of {micro}",
    )


def context_split(cfg: Config, axis_sizes: Mapping[str, int]):
    """(devices the activation rules split the sequence over, the context to trace the loss in).

    Under context parallelism the loss is traced on an abstract mesh with the run's activation rules, so the
    model's attention is the ring or all-gather it runs (their residuals are the local blocks, not a full
    sequence's scores) and each activation with a sequence dimension counts 1/context of its tokens.
    """
    rules = sharding.rules_table(cfg.sharding.activation_rules)
    shards = math.prod(axis_sizes[a] for a in rules.get("length", ()) if a in axis_sizes)
    if shards == 1:
        return 1, contextlib.nullcontext()
    mesh = AbstractMesh(tuple(axis_sizes.values()), tuple(axis_sizes), axis_types=(AxisType.Auto,) * len(axis_sizes))
    return shards, sharding.activation_sharding(mesh, rules)


def with_compiled_activations(needs: MemoryNeeds, placement: Placement, memory_analysis, platform: str) -> MemoryNeeds:
    """``needs`` with the chosen mode's activations read from the compiled step.

    The step's temporaries hold activations, the gradients and workspace; the planner's
    gradient bytes are taken out. ``host_temp`` is real where the runtime reports host memory
    (GPU/TPU). On CPU, one physical memory, the activation-offload transfers are not in the
    program: offloaded activations stay in the temporaries and count as device bytes.
    """
    ma = memory_analysis
    compiled = {DEVICE: max(ma.temp_size_in_bytes - needs.grads, 0), HOST: ma.host_temp_size_in_bytes}
    source = "compiled: memory_analysis() temporaries of the step less the gradients (shard accounting)"
    if platform == "cpu":
        source += "; cpu: host and device are one memory, state bytes from the shard accounting"
    return dataclasses.replace(needs, activations={**needs.activations, placement.activations: compiled},
                               activation_source=source)


def compiled_device_bytes(memory_analysis, host_argument_bytes: int) -> int:
    """Device bytes a compiled step needs: its arguments, outputs not aliased to them, and temporaries.

    Where the runtime counts pinned_host arguments as device bytes (CPU reports no host
    fields), ``host_argument_bytes`` (the planner's count) is taken out of the arguments; the
    state's outputs are donated, so aliased output bytes are not counted twice.
    """
    ma = memory_analysis
    return compiled_argument_bytes(ma, host_argument_bytes) + max(ma.output_size_in_bytes - ma.alias_size_in_bytes, 0) \
        + ma.temp_size_in_bytes


def compiled_argument_bytes(memory_analysis, host_argument_bytes: int) -> int:
    """Device bytes of a compiled step's arguments (the state and batch it starts from, less those in pinned_host)."""
    ma = memory_analysis
    return ma.argument_size_in_bytes - (host_argument_bytes if ma.host_argument_size_in_bytes == 0 else 0)


def host_state_bytes(abstract, placement: Placement, axis_sizes: Mapping[str, int]) -> int:
    """Bytes per device of the state categories placed in pinned_host."""
    return sum(
        sharding.bytes_per_device(getattr(abstract.shapes, c), getattr(abstract.specs, c), axis_sizes)
        for c, kind in placement.kinds().items() if kind == HOST
    )


def pipeline_plan(cfg: Config, abstract, axis_sizes: Mapping[str, int], batch_axes: Sequence[str],
                  grad_accum: int, param_memory: str) -> pipeline.PipelinePlan | None:
    """Per pipeline stage: layers, parameter bytes per device (exact), activation bytes of the micro-batches in flight
    (estimated: one layer's residuals for one pipeline micro-batch, traced, plus its input, times the stage's layers
    and GPipe's M micro-batches in flight), and the bubble. None without a ``stage`` axis."""
    from flax import nnx

    p = pipeline.for_mesh(cfg, axis_sizes)
    if p is None:
        return None
    t = cfg.train
    micro = t.global_batch // grad_accum
    rows = micro // p.microbatches
    dp = math.prod(axis_sizes[a] for a in batch_axes)
    params = abstract.shapes.params
    is_layer = lambda path: path[0].key == "blocks"
    flat, specs = jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(
        abstract.specs.params, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    layer_bytes = sum(sharding.bytes_per_device([x], [s], axis_sizes) for (path, x), s in zip(flat, specs) if is_layer(path))
    other_bytes = sum(sharding.bytes_per_device([x], [s], axis_sizes) for (path, x), s in zip(flat, specs) if not is_layer(path))
    model = nnx.merge(abstract.graphdef, params)
    fn, layer = model.one_layer()
    x = jax.ShapeDtypeStruct((rows, t.seq_len, cfg.model.d_model), jnp.dtype(t.dtype))
    seq_shards, traced_as = context_split(cfg, axis_sizes)
    with traced_as:
        kept = sum(residual_bytes(fn, layer, x, micro_batch=rows, batch_shards=dp, n_devices=math.prod(axis_sizes.values()),
                                  seq_len=t.seq_len, seq_shards=seq_shards).values())
    kept += -(-math.prod(x.shape) * x.dtype.itemsize // (dp * seq_shards))  # the layer's input, carried by the scan
    if cfg.model.moe.n_experts:  # models/moe.py: the stacked unit is a group of moe.every layers; per layer, on average
        kept //= cfg.model.moe.every
    source = (f"estimate: one layer's traced residuals + its input for a micro-batch of {rows} rows over "
              f"{dp} data-parallel devices, x {cfg.model.n_layers // p.stages} layers x {p.microbatches} in flight")
    return pipeline.plan(cfg.model.n_layers, p, micro, layer_bytes, other_bytes, kept, source, param_memory)
