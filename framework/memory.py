"""Memory tiers: which memory kind (``device`` or ``pinned_host``) each category of training data lives in.

Every byte a step touches belongs to a category: ``params``, ``grads``, ``opt_state``,
``activations`` (values saved for the backward pass) and ``batch``. The planner counts the
bytes one device holds of each category on a mesh (a real ``Mesh`` or an ``AbstractMesh``;
no devices needed), a ``PlacementPolicy`` maps categories to memory kinds, and the remat
policy builder turns the activation choice into a ``jax.checkpoint`` policy. ``auto``
offloads first what costs least to move per byte saved: optimizer state (touched once per
step), then activation checkpoints (once forward, once backward), then parameters (every
micro-batch, forward and backward).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import optax

from framework import sharding
from framework.config import Config, ConfigError, MemoryConfig
from framework.state import AbstractState, abstract_state

CATEGORIES = ("params", "grads", "opt_state", "activations", "batch")
DEVICE, HOST = "device", "pinned_host"
KINDS = (DEVICE, HOST)
ACTIVATION_MODES = ("save", "remat", "offload")
OFFLOAD_ORDER = ("opt_state", "activations", "params")


# ------------------------------------------------------------------ budget


def device_capacity(device: jax.Device) -> int | None:
    """Bytes of memory the runtime reports for ``device`` (GPU/TPU); None where it reports none (CPU)."""
    stats = device.memory_stats()
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def has_auto(cfg: MemoryConfig) -> bool:
    return "auto" in (cfg.params, cfg.opt_state, cfg.activations)


def needs_budget(cfg: MemoryConfig, micro_batch: Any = None) -> bool:
    return has_auto(cfg) or micro_batch == "auto"


def resolve_budget(cfg: MemoryConfig, devices: Sequence[jax.Device] | None, micro_batch: Any = None) -> int | None:
    """``memory.device_budget_bytes``, else the device's reported capacity; an error if ``auto`` needs one and none is known."""
    if cfg.device_budget_bytes is not None:
        return cfg.device_budget_bytes
    local = [d for d in devices or () if d.process_index == jax.process_index()]  # only these report memory_stats
    capacity = device_capacity(local[0]) if local else None
    if capacity is None and needs_budget(cfg, micro_batch):
        platform = devices[0].platform if devices else "an abstract mesh"
        raise ConfigError(
            f"memory.device_budget_bytes is required for auto placement/micro-batch on {platform} "
            "(jax reports no device memory capacity there)"
        )
    return capacity


# ------------------------------------------------------------------ activation (remat / offload) policies


def tagged_names(fn: Callable, *args) -> list[str]:
    """The ``checkpoint_name`` tags ``fn`` applies, in order of first use (found in its jaxpr)."""
    names: list[str] = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "name" and eqn.params["name"] not in names:
                names.append(eqn.params["name"])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


def activation_choices(mode: str, per_name: Mapping[str, str], tagged: Sequence[str]) -> dict[str, str]:
    """Tag -> ``save``/``remat``/``offload``: ``per_name`` where given, else ``mode``."""
    unknown = sorted(set(per_name) - set(tagged))
    if unknown:
        raise ConfigError(
            f"memory.activation_names: {', '.join(unknown)} not tagged by the model; tags: {', '.join(tagged)}"
        )
    return {name: per_name.get(name, mode) for name in tagged}


def activation_policy(mode: str, per_name: Mapping[str, str], tagged: Sequence[str]) -> Callable | None:
    """A ``jax.checkpoint`` policy for the layers, or None for no checkpointing (``save`` everything).

    With ``remat`` all is recomputed. With ``offload`` or a per-name map, tagged values
    follow their choice and untagged intermediates are recomputed (MaxText's custom
    policy). A name is never listed as both savable and offloadable: each tag has one choice.
    """
    if mode not in ACTIVATION_MODES:
        raise ValueError(f"activation mode {mode!r} must be resolved to one of {ACTIVATION_MODES} first")
    if not per_name:
        if mode == "save":
            return None
        if mode == "remat":
            return jax.checkpoint_policies.nothing_saveable
    choices = activation_choices(mode, per_name, tagged)
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[n for n, c in choices.items() if c == "save"],
        names_which_can_be_offloaded=[n for n, c in choices.items() if c == "offload"],
        offload_src=DEVICE,
        offload_dst=HOST,
    )


@dataclasses.dataclass
class OffloadCheck:
    """Host-transfer annotations found in the program lowered for ``platform``."""

    platform: str
    to_host: int  # annotate_device_placement ops that place a value in pinned_host
    to_device: int  # ... and those that bring one (back) to device memory


_PLACEMENT = re.compile(r"annotate_device_placement.*?_xla_buffer_placement\s*=\s*\"(\w+)\"")


def verify_offload(fn: Callable, *args, platform: str = "cuda") -> OffloadCheck:
    """Lower ``fn`` for ``platform`` and count its transfers between memory kinds.

    Lowering for CPU drops the activation-offload transfers (CPU has one memory), so a CPU
    machine checks the program a GPU would run; ``args`` may be ``ShapeDtypeStruct``s.
    """
    jitted = fn if hasattr(fn, "trace") else jax.jit(fn)
    return count_transfers(jitted.trace(*args).lower(lowering_platforms=(platform,)).as_text(), platform)


def count_transfers(hlo_text: str, platform: str) -> OffloadCheck:
    kinds = _PLACEMENT.findall(hlo_text)
    return OffloadCheck(platform, kinds.count(HOST), kinds.count(DEVICE))


_FUNC = re.compile(r"^(\s*)func\.func\b[^@]*@([\w.$-]+)\(")
_CALL = re.compile(r"\bcall @([\w.$-]+)\(")


def loop_body_transfers(hlo_text: str, platform: str) -> list[OffloadCheck]:
    """Transfers inside each ``stablehlo.while`` body of a lowered module, one entry per loop, in program order.

    A body's count includes the functions it calls (transitively): in a scanned model the
    forward and backward passes over the layers are such loops, so a parameter fetched per
    layer shows up here and one fetched once for the whole step does not.
    """
    lines = hlo_text.splitlines()
    functions: dict[str, list[str]] = {}
    name, indent = None, ""
    for line in lines:  # function bodies, by their closing brace at the function's own indent
        m = _FUNC.match(line)
        if m:
            name, indent = m.group(2), m.group(1)
            functions[name] = []
        elif name is not None:
            if line == indent + "}":
                name = None
            else:
                functions[name].append(line)

    def reachable(body: list[str]) -> list[str]:
        out, todo, seen = list(body), list(body), set()
        while todo:
            for callee in _CALL.findall(todo.pop()):
                if callee not in seen and callee in functions:
                    seen.add(callee)
                    out += functions[callee]
                    todo += functions[callee]
        return out

    checks = []
    for i, line in enumerate(lines):
        if line.strip() != "} do {":
            continue
        close = line[: len(line) - len(line.lstrip())] + "}"
        end = next(j for j in range(i + 1, len(lines)) if lines[j] == close)
        checks.append(count_transfers("\n".join(reachable(lines[i + 1:end])), platform))
    return checks


# ------------------------------------------------------------------ bytes per category


def shard_bytes(tree) -> dict[str, int]:
    """Bytes of real arrays' shards on the most loaded device, per memory kind (the ground truth the planner must match)."""
    per_device: dict[tuple, int] = {}
    for leaf in jax.tree.leaves(tree):
        kind = leaf.sharding.memory_kind or DEVICE
        for shard in leaf.addressable_shards:
            key = (shard.device, kind)
            per_device[key] = per_device.get(key, 0) + shard.data.nbytes
    return {kind: max((b for (_, k), b in per_device.items() if k == kind), default=0) for kind in KINDS}


def residual_bytes(fn: Callable, *args, micro_batch: int, batch_shards: int, n_devices: int) -> dict[str, int]:
    """Estimated bytes per device of what ``fn``'s backward pass keeps from its forward pass, per memory kind.

    Traces ``jax.vjp(fn, *args)`` abstractly and sums the residuals that are not the
    inputs themselves. A residual with a dimension of ``micro_batch`` rows is taken to be
    split over ``batch_shards`` devices, any other over all ``n_devices``: an estimate
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

    def figures(self) -> dict[str, str]:
        """Category -> how its figure was obtained: ``exact`` (shard shapes), ``compiled`` or ``estimated``."""
        measured = "compiled" if self.activation_source.startswith("compiled") else "estimated"
        return {"params": "exact", "grads": measured, "opt_state": "exact", "activations": measured, "batch": "exact"}


@dataclasses.dataclass
class Placement:
    """Memory kind of ``params`` and ``opt_state``, activation mode, and why each was chosen."""

    params: str = DEVICE
    opt_state: str = DEVICE
    activations: str = "save"
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)

    def kinds(self) -> dict[str, str]:
        return {"params": self.params, "opt_state": self.opt_state}

    def key(self) -> tuple[str, str, str]:
        return self.params, self.opt_state, self.activations


def category_bytes(needs: MemoryNeeds, placement: Placement) -> dict[str, dict[str, int]]:
    """Category -> memory kind -> bytes per device under ``placement``."""
    out = {c: {k: 0 for k in KINDS} for c in CATEGORIES}
    out["params"][placement.params] = needs.params
    out["opt_state"][placement.opt_state] = needs.opt_state
    out["grads"][DEVICE] = needs.grads
    out["batch"][DEVICE] = needs.batch
    out["activations"] = dict(needs.activations[placement.activations])
    return out


def device_share(needs: MemoryNeeds, placement: Placement) -> int:
    return sum(b[DEVICE] for b in category_bytes(needs, placement).values())


class PlacementPolicy:
    """Decides the memory kind per category; subclass and override ``place`` (or ``offload_order``) for research.

    Explicit choices in the config are kept. ``auto`` categories start on device (activations
    saved) and are offloaded in ``offload_order``, one at a time, until the step fits the
    budget. ``measure`` gives a candidate's bytes per category on the device: the Trainer
    compiles the step for it; ``scripts/plan.py`` on an abstract mesh estimates.
    """

    offload_order: tuple[str, ...] = OFFLOAD_ORDER

    def place(self, cfg: MemoryConfig, measure: Callable[[Placement], dict[str, int]] | None,
              budget: int | None) -> Placement:
        """``measure`` and ``budget`` may be None when nothing is ``auto``; a ConfigError when nothing fits."""
        requested = {"params": cfg.params, "opt_state": cfg.opt_state, "activations": cfg.activations}
        on_device = {"params": DEVICE, "opt_state": DEVICE, "activations": "save"}
        offloaded = {"params": HOST, "opt_state": HOST, "activations": "offload"}
        placement = Placement(reasons={})
        for category, choice in requested.items():
            setattr(placement, category, on_device[category] if choice == "auto" else choice)
            if choice != "auto":
                placement.reasons[category] = "set in config"
        auto = [c for c in self.offload_order if requested[c] == "auto"]
        if not auto:
            return placement
        for i in range(len(auto) + 1):
            if i:
                setattr(placement, auto[i - 1], offloaded[auto[i - 1]])
            per_category = measure(placement)
            share = sum(per_category.values())
            if share <= budget:
                for j, category in enumerate(auto):
                    placement.reasons[category] = (
                        f"auto: offloaded to pinned_host, device bytes exceeded the budget {budget:,} B with it on device"
                        if j < i else f"auto: kept on device, device bytes {share:,} B fit the budget {budget:,} B")
                return placement
        figures = ", ".join(f"{c} {b:,}" for c, b in per_category.items())
        raise ConfigError(
            f"memory: nothing fits the device budget of {budget:,} B (memory.device_budget_bytes or the device's "
            f"capacity): with {', '.join(auto)} offloaded the step needs {share:,} B per device ({figures} B)"
        )


@dataclasses.dataclass
class MemoryPlan:
    """What the planner reports: bytes per device per category per memory kind, and the placement chosen."""

    mesh: dict[str, int]
    budget_bytes: int | None
    placement: Placement
    bytes: dict[str, dict[str, int]]
    activation_source: str
    figures: dict[str, str]  # category -> exact | compiled | estimated

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
                          "activations": self.placement.activations, "grads": DEVICE, "batch": DEVICE},
            "reasons": self.placement.reasons,
            "activation_source": self.activation_source,
        }


def device_bytes_by_category(needs: MemoryNeeds, placement: Placement) -> dict[str, int]:
    return {c: b[DEVICE] for c, b in category_bytes(needs, placement).items()}


def make_plan(needs: MemoryNeeds, placement: Placement, mesh_axes: Mapping[str, int], budget: int | None) -> MemoryPlan:
    return MemoryPlan(dict(mesh_axes), budget, placement, category_bytes(needs, placement), needs.activation_source,
                      needs.figures())


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
    t = plan["totals"]
    fits = "" if plan["fits"] is None else ("  fits" if plan["fits"] else "  DOES NOT FIT")
    lines.append(f"  {'total':<12}{mib(t[DEVICE]):>14}{mib(t[HOST]):>15}{fits}")
    return lines


# ------------------------------------------------------------------ the run's needs (config -> model -> bytes)


def model_loss(graphdef, params, batch):
    """The step's objective on a (B, T+1) batch, for tracing residuals: the model's own ``loss``
    when it has one (the CNN), else next-token cross-entropy (as ``Trainer.loss_fn``)."""
    from flax import nnx

    model = nnx.merge(graphdef, params)
    if hasattr(model, "loss"):
        return model.loss(batch)
    logits = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def model_tags(cfg: Config, abstract: AbstractState, micro_batch: int = 1) -> list[str]:
    tokens = jax.ShapeDtypeStruct((micro_batch, cfg.train.seq_len + 1), jnp.int32)
    return tagged_names(functools.partial(model_loss, abstract.graphdef), abstract.shapes.params, tokens)


def state_needs(cfg: Config, abstract: AbstractState, axis_sizes: Mapping[str, int], batch_axes: Sequence[str],
                grad_accum: int) -> MemoryNeeds:
    """Exact bytes per device of params, grads, optimizer state and batch (shard shapes); no activations yet."""
    t = cfg.train
    micro = t.global_batch // grad_accum
    dp = math.prod(axis_sizes[a] for a in batch_axes)
    params = sharding.bytes_per_device(abstract.shapes.params, abstract.specs.params, axis_sizes)
    return MemoryNeeds(
        params=params,
        grads=params * (2 if grad_accum > 1 else 1),  # the gradient, plus the accumulator across micro-batches
        opt_state=sharding.bytes_per_device(abstract.shapes.opt_state, abstract.specs.opt_state, axis_sizes),
        batch=grad_accum * -(-micro // dp) * (t.seq_len + 1) * 4,
        activations={},
        activation_source="",
    )


def estimate_needs(cfg: Config, abstract: AbstractState, axis_sizes: Mapping[str, int], batch_axes: Sequence[str],
                   grad_accum: int) -> MemoryNeeds:
    """Bytes per device per category for the run ``cfg`` on a mesh of ``axis_sizes``; no devices needed.

    Params, grads and optimizer state are exact (shard shapes); activations are estimated from
    the residuals of the traced loss (one micro-batch) for each activation mode.
    """
    t = cfg.train
    micro = t.global_batch // grad_accum
    dp = math.prod(axis_sizes[a] for a in batch_axes)
    tokens = jax.ShapeDtypeStruct((micro, t.seq_len + 1), jnp.int32)
    activations = {}
    for mode in ACTIVATION_MODES:
        graphdef = abstract_state(cfg, axis_sizes, remat_policy=layer_policy(cfg, abstract, mode)).graphdef
        activations[mode] = residual_bytes(functools.partial(model_loss, graphdef), abstract.shapes.params, tokens,
                                           micro_batch=micro, batch_shards=dp, n_devices=math.prod(axis_sizes.values()))
    return dataclasses.replace(
        state_needs(cfg, abstract, axis_sizes, batch_axes, grad_accum),
        activations=activations,
        activation_source=f"estimate: residuals of the traced loss for one micro-batch of {micro}",
    )


def with_memory_kinds(shardings, placement: Placement):
    """The state's shardings with ``params``/``opt_state`` in the memory kinds of ``placement``."""
    return dataclasses.replace(
        shardings,
        **{c: jax.tree.map(lambda s: s.with_memory_kind(kind), getattr(shardings, c)) for c, kind in placement.kinds().items()},
    )


def compiled_device_bytes(memory_analysis, host_argument_bytes: int) -> int:
    """Device bytes a compiled step needs: its arguments, outputs not aliased to them, and temporaries.

    Where the runtime counts pinned_host arguments as device bytes (CPU reports no host
    fields), ``host_argument_bytes`` (the planner's count) is taken out of the arguments; the
    state's outputs are donated, so aliased output bytes are not counted twice.
    """
    ma = memory_analysis
    host = host_argument_bytes if ma.host_argument_size_in_bytes == 0 else 0
    return ma.argument_size_in_bytes - host + max(ma.output_size_in_bytes - ma.alias_size_in_bytes, 0) + ma.temp_size_in_bytes


def model_options(remat_policy: Callable | None, stream_params: bool) -> dict:
    """Model constructor options that apply the placement: the layers' checkpoint policy, parameter streaming."""
    return {"remat_policy": remat_policy, "stream_params": stream_params}


def layer_policy(cfg: Config, abstract: AbstractState, mode: str) -> Callable | None:
    """The checkpoint policy for the model's layers under activation ``mode`` (None: no checkpointing)."""
    per_name = cfg.memory.activation_names
    tags = model_tags(cfg, abstract) if (mode == "offload" or per_name) else []
    return activation_policy(mode, per_name, tags)


def host_state_bytes(abstract: AbstractState, placement: Placement, axis_sizes: Mapping[str, int]) -> int:
    """Bytes per device of the state categories placed in pinned_host."""
    return sum(
        sharding.bytes_per_device(getattr(abstract.shapes, c), getattr(abstract.specs, c), axis_sizes)
        for c, kind in placement.kinds().items() if kind == HOST
    )


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
