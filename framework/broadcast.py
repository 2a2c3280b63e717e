"""Per-layer broadcast modes: a cost model, a planner, and the shard_map layers that obey it.

Across the P devices that split the batch, a layer with a kernel runs in one of two modes:

- ``kernel``: the kernel is all-gathered to every device (optionally compressed), the
  feature map stays split by batch; the kernel gradient is reduce-scattered.
- ``map``: the feature map is all-gathered to every device, the kernel stays split by
  output channel; the input gradient is reduce-scattered.

Kernels are stored split by output channel in both modes, so a plan changes only what
moves, never where parameters live. A ``map`` layer's output is split by channel; if the
next layer of its chain is also ``map`` it gathers straight from that layout, otherwise an
all-to-all returns it to the batch layout (the transition cost the planner weighs).

The token embedding (kind ``lookup``, the table split by vocabulary) has the same two modes:
``kernel`` gathers the table and looks up the local tokens; ``map`` looks up every device's
tokens in the local vocabulary slice and reduce-scatters the partial embeddings (its gradient
is an all-gather of the embedding gradient). The output head is a dense layer over the
vocabulary: in ``map`` mode the vocabulary is split and the activations are broadcast.

Outside ``use_plan`` the layers are plain einsums/convolutions (the single-device
reference and the ``broadcast.mode: none`` behaviour). Byte counts are per device per
micro-batch (forward + backward), by the convention of ``framework.collectives``.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import fnmatch
import functools
import json
import math
import re
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from framework.collectives import layer_scope
from framework.sharding import batch_axes
from framework.config import BroadcastConfig, ConfigError

MODES = ("kernel", "map")


# ------------------------------------------------------------------ what the cost model reads


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One layer call as traced: global shapes of one micro-batch, and how it connects."""

    name: str
    kind: str  # "dense" or "conv"
    kernel_shape: tuple[int, ...]
    out_axis: int  # kernel dimension holding the (first) output channels
    in_shape: tuple[int, ...]  # feature map entering the layer, batch first
    out_shape: tuple[int, ...]
    act_bytes: int  # bytes per activation element (compute dtype)
    param_bytes: int  # bytes per kernel element (parameter dtype)
    bias: bool
    input_grad: bool  # False when the input is data: no input gradient is computed
    chained: bool  # output reaches the next recorded layer through channel-wise ops only
    input_group: int = 0  # consecutive layers reading the very same feature map share one group
    repeats: int = 1  # calls per micro-batch: the scan length for a layer inside ``repeated(n)``
    out_bytes: int = 0  # bytes per output element, when not act_bytes (a lookup's embeddings, float32 logits)
    param: str = ""  # stored parameter path, when not ``<name>.kernel`` (``embed``, ``unembed``)
    transposed: bool = False  # the stored parameter is the kernel's transpose (a tied head reads the embedding table)

    @property
    def out_channels(self) -> int:
        return self.kernel_shape[self.out_axis]

    @property
    def bias_elements(self) -> int:
        return math.prod(self.kernel_shape[self.out_axis:]) if self.bias else 0

    @property
    def map_bytes(self) -> int:
        """The feature map ``map`` mode moves: the input, or for a lookup its output embeddings."""
        if self.kind == "lookup":
            return math.prod(self.out_shape) * self.out_bytes
        return math.prod(self.in_shape) * self.act_bytes

    @property
    def y_bytes(self) -> int:
        return math.prod(self.out_shape) * (self.out_bytes or self.act_bytes)


def _frac(p: int) -> float:
    return (p - 1) / p


def splittable(layer: LayerShape, p: int) -> bool:
    """Output channels divide over P: the kernel can be stored split and ``map`` mode is possible."""
    return p > 1 and layer.out_channels % p == 0


def compressed_kernel_bytes(layer: LayerShape, compress: str) -> int:
    """Bytes of the whole kernel (+ bias) as it travels in ``kernel`` mode."""
    n = math.prod(layer.kernel_shape)
    per_channel = math.prod(layer.kernel_shape[layer.out_axis:])
    bias = layer.bias_elements * layer.param_bytes
    if compress == "bf16":
        return n * 2 + bias
    if compress == "int8":
        return n + per_channel * 4 + bias  # int8 values + one float32 scale per output channel
    return n * layer.param_bytes + bias


@dataclasses.dataclass(frozen=True)
class ModeCost:
    forward: int
    backward: int

    @property
    def total(self) -> int:
        return self.forward + self.backward


def mode_costs(layer: LayerShape, p: int, compress: str = "none") -> dict[str, ModeCost | None]:
    """Bytes one device moves for this layer in each mode, all its ``repeats`` calls (None: mode impossible)."""
    f, r = _frac(p), layer.repeats
    kernel_full = (math.prod(layer.kernel_shape) + layer.bias_elements) * layer.param_bytes
    x_bytes = layer.map_bytes
    if p == 1:
        return {"kernel": ModeCost(0, 0), "map": None}
    if not splittable(layer, p):  # replicated kernel: nothing to gather, gradients all-reduced
        return {"kernel": ModeCost(0, r * round(2 * f * kernel_full)), "map": None}
    if layer.kind == "lookup":  # map: gather the token ids, reduce-scatter the partial embeddings; all-gather their gradient
        ids = math.prod(layer.in_shape) * layer.act_bytes
        return {"kernel": ModeCost(r * round(f * kernel_full), r * round(f * kernel_full)),
                "map": ModeCost(r * (round(f * ids) + round(f * x_bytes)), r * round(f * x_bytes))}
    return {
        "kernel": ModeCost(r * round(f * compressed_kernel_bytes(layer, compress)), r * round(f * kernel_full)),
        "map": ModeCost(r * round(f * x_bytes), r * round(f * x_bytes) if layer.input_grad else 0),
    }


def held_bytes(layer: LayerShape, p: int, compress: str = "none") -> dict[str, int | None]:
    """Extra bytes one device holds while the layer runs in each mode (None: mode impossible).

    ``kernel``: the gathered kernel (plus its compressed wire copy) and its full gradient
    before the reduce-scatter. ``map``: the gathered feature map, its full gradient before
    the reduce-scatter, and the whole batch's output for this device's channels. One call's
    buffers: a scan runs its layers one at a time.
    """
    kernel_full = (math.prod(layer.kernel_shape) + layer.bias_elements) * layer.param_bytes
    if p == 1 or not splittable(layer, p):
        return {"kernel": 0 if p == 1 else kernel_full, "map": None}  # replicated: only its all-reduced gradient
    if layer.kind == "lookup":  # map: every device's tokens, their partial embeddings and the embeddings' gradient
        return {"kernel": 2 * kernel_full, "map": math.prod(layer.in_shape) * layer.act_bytes + 2 * layer.map_bytes}
    wire = compressed_kernel_bytes(layer, compress) if compress != "none" else 0
    x_bytes = layer.map_bytes
    y_local = layer.y_bytes // p
    return {"kernel": 2 * kernel_full + wire, "map": x_bytes * (2 if layer.input_grad else 1) + y_local}


def transition_bytes(layer: LayerShape, p: int) -> int:
    """All-to-all returning a ``map`` layer's channel-split output to the batch layout (fwd + bwd).

    A lookup's reduce-scatter already leaves its output in the batch layout: nothing to pay.
    """
    if layer.kind == "lookup":
        return 0
    y_local = layer.y_bytes / p
    return layer.repeats * 2 * round(_frac(p) * y_local)


# ------------------------------------------------------------------ the plan ("job list")


@dataclasses.dataclass
class LayerPlan:
    name: str
    kind: str
    kernel_shape: tuple[int, ...]
    kernel_bytes: int  # uncompressed kernel + bias (one call)
    map_bytes: int  # the feature map map mode moves (input; a lookup's output), one micro-batch, global (one call)
    devices: int  # P
    repeats: int  # calls per micro-batch (scan length); the *_bytes below cover all of them
    kernel_mode_bytes: int
    map_mode_bytes: int | None  # None: output channels do not divide over P
    transition_bytes: int  # paid when a map layer hands on in the batch layout
    shared_gather_bytes: int  # map-mode input gather done by a later layer of the same input group
    mode: str
    in_layout: str  # "batch" or "channel": how the input arrives
    out_layout: str  # how the output leaves
    compress: str  # applies to the kernel gather of kernel-mode layers
    pinned: str  # "auto", or the config key that fixed the mode
    split_kernel: bool  # kernel stored split by output channel (else replicated)
    out_axis: int
    kernel_held_bytes: int  # extra bytes one device holds in kernel mode (held_bytes)
    map_held_bytes: int | None
    reason: str  # why this mode: pinned, the only one possible, the only one that fits, or fewest bytes
    param: str = ""  # stored parameter path, when not ``<name>.kernel``
    transposed: bool = False  # stored as the kernel's transpose (a tied head)

    @property
    def predicted_bytes(self) -> int:
        own = self.kernel_mode_bytes if self.mode == "kernel" else self.map_mode_bytes - self.shared_gather_bytes
        return own + (self.transition_bytes if self.mode == "map" and self.out_layout == "batch" else 0)


@dataclasses.dataclass
class BroadcastPlan:
    devices: int
    axes: tuple[str, ...]  # mesh axes that split the batch: the P devices
    compress: str
    layers: list[LayerPlan]
    other_param_bytes: int = 0  # parameters outside the plan (embeddings, norms): XLA syncs their gradients
    budget_bytes: int | None = None  # per-device bytes a layer's broadcast buffers may hold (None: no limit)
    xla_table_bytes: int = 0  # vocabulary tables left to XLA (rows do not divide over P): gathered per reader, gradient reduce-scattered

    @property
    def other_sync_bytes(self) -> int:
        """Their gradient sync, as an all-reduce or a gather + reduce-scatter: 2(P-1)/P of their bytes."""
        return round(2 * _frac(self.devices) * self.other_param_bytes)

    @property
    def layer_bytes(self) -> int:
        return sum(layer.predicted_bytes for layer in self.layers)

    @property
    def total_bytes(self) -> int:
        return self.layer_bytes + self.other_sync_bytes + self.xla_table_bytes

    def get(self, name: str) -> LayerPlan | None:
        return next((layer for layer in self.layers if layer.name == name), None)

    def modes(self) -> dict[str, str]:
        return {layer.name: layer.mode for layer in self.layers}

    def to_dict(self) -> dict:
        layers = []
        for layer in self.layers:
            d = dataclasses.asdict(layer)
            d["kernel_shape"] = list(layer.kernel_shape)
            d["predicted_bytes"] = layer.predicted_bytes
            layers.append(d)
        return {"devices": self.devices, "axes": list(self.axes), "compress": self.compress, "budget_bytes": self.budget_bytes,
                "unit": "bytes per device per micro-batch (forward + backward)",
                "layer_bytes": self.layer_bytes, "other_param_bytes": self.other_param_bytes,
                "other_sync_bytes": self.other_sync_bytes, "xla_table_bytes": self.xla_table_bytes,
                "total_bytes": self.total_bytes, "layers": layers}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def table(self) -> str:
        """The job list as a text table: per layer, sizes, bytes moved and held per device in each mode, the choice and why."""
        w = max([len("layer")] + [len(layer.name) for layer in self.layers])
        dash = lambda v: "-" if v is None else f"{v:,}"
        head = (f"{'layer':<{w}}  {'kind':<5} {'x':>2} {'kernel':>11} {'map':>11} {'moved:kernel':>13} {'moved:map':>13} "
                f"{'held:kernel':>12} {'held:map':>12} {'transition':>11}  {'mode':<6} {'in->out':<15} {'compress':<8} reason")
        budget = "no memory limit" if self.budget_bytes is None else f"budget {self.budget_bytes:,} bytes per device"
        rows = [f"broadcast plan over P={self.devices} devices {self.axes}, {budget}", head]
        for layer in self.layers:
            rows.append(
                f"{layer.name:<{w}}  {layer.kind:<5} {layer.repeats:>2} {layer.kernel_bytes:>11,} {layer.map_bytes:>11,} "
                f"{layer.kernel_mode_bytes:>13,} {dash(layer.map_mode_bytes):>13} {layer.kernel_held_bytes:>12,} "
                f"{dash(layer.map_held_bytes):>12} {layer.transition_bytes:>11,}  {layer.mode:<6} "
                f"{layer.in_layout + '->' + layer.out_layout:<15} {layer.compress:<8} {layer.reason}"
            )
        rows.append("(x: calls per micro-batch; kernel/map: one call's sizes; moved/held: per device, moved over all calls)")
        tables = f" + vocabulary tables left to XLA: {self.xla_table_bytes:,}" if self.xla_table_bytes else ""
        rows.append(f"layers: {self.layer_bytes:,} + other parameters' gradient sync: {self.other_sync_bytes:,}{tables} "
                    f"= predicted total {self.total_bytes:,} bytes per device per micro-batch")
        return "\n".join(rows)


def _pin(name: str, cfg: BroadcastConfig) -> tuple[str, str]:
    """(requested mode, where it came from): the first matching override wins, else ``broadcast.mode``.

    Patterns are fnmatch globs (``blocks.*.mlp.*``) or, prefixed ``re:``, regular expressions.
    """
    for pattern, mode in cfg.overrides.items():
        hit = re.fullmatch(pattern[3:], name) if pattern.startswith("re:") else fnmatch.fnmatchcase(name, pattern)
        if hit:
            return mode, f"broadcast.overrides.{pattern}"
    return cfg.mode, ("auto" if cfg.mode == "auto" else "broadcast.mode")


def check_overrides(cfg: BroadcastConfig) -> None:
    for pattern in cfg.overrides:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise ConfigError(f"broadcast.overrides: pattern {pattern!r} is not a valid regular expression ({e})") from None


def make_plan(layers: Sequence[LayerShape], devices: int, axes: Sequence[str], cfg: BroadcastConfig,
              other_param_bytes: int = 0, budget_bytes: int | None = None, xla_table_bytes: int = 0) -> BroadcastPlan:
    """Choose a mode per layer minimising total bytes, transitions included (dynamic programming).

    A pinned layer keeps its mode; a layer whose output channels do not divide over P can
    only run in ``kernel`` mode (a pin to ``map`` falls back and says so in ``pinned``). A mode
    whose buffers (``held_bytes``) exceed ``budget_bytes`` is excluded, pinned or not; if no
    mode fits, the one holding least stays (and the reason says it does not fit).
    The chain state is the previous layer's mode: a ``map`` layer pays the all-to-all back
    to the batch layout unless the next layer of its chain is ``map`` too.
    """
    check_overrides(cfg)
    costs = [mode_costs(layer, devices, cfg.compress) for layer in layers]
    trans = [transition_bytes(layer, devices) for layer in layers]
    held = [held_bytes(layer, devices, cfg.compress) for layer in layers]
    allowed, pins, notes = [], [], []
    for layer, cost, hold in zip(layers, costs, held):
        want, source = _pin(layer.name, cfg)
        possible = [m for m in MODES if cost[m] is not None]
        fits = [m for m in possible if budget_bytes is None or hold[m] <= budget_bytes]
        note = [f"map impossible ({layer.out_channels} channels over P={devices})"] if "map" not in possible else []
        note += [f"{m} excluded (holds {hold[m]:,} > budget {budget_bytes:,})" for m in possible if m not in fits]
        if not fits:
            fits = [min(possible, key=lambda m: hold[m])]
            note.append(f"nothing fits; {fits[0]} holds least")
        if want in MODES and want not in fits:
            allowed.append(fits)
            pins.append(f"{source} (fell back: {'; '.join(note)})")
        else:
            allowed.append([want] if want in MODES else fits)
            pins.append(source)
        notes.append(note)

    # Dynamic programming over the call order. State (mode, gathered): this layer's mode, and
    # whether its input group's feature map is already gathered by a map-mode member. A map
    # layer's hand-off (all-to-all back to the batch layout) is paid once the next mode is known.
    n = len(layers)
    best: list[dict[tuple[str, bool], float]] = []
    back: list[dict[tuple[str, bool], tuple[str, bool] | None]] = []
    for i in range(n):
        best.append({})
        back.append({})
        prev_states = best[i - 1].items() if i else [(None, 0.0)]
        for m in allowed[i]:
            for prev, so_far in prev_states:
                same_group = prev is not None and layers[i].input_group == layers[i - 1].input_group
                gathered = same_group and prev[1]
                own = costs[i][m].total - (costs[i][m].forward if m == "map" and gathered else 0)
                hand_off = 0
                if prev is not None and prev[0] == "map" and not (m == "map" and layers[i - 1].chained):
                    hand_off = trans[i - 1]
                state, total = (m, gathered or m == "map"), so_far + hand_off + own
                if state not in best[i] or total < best[i][state]:
                    best[i][state], back[i][state] = total, prev
    states: list[tuple[str, bool]] = []
    if n:
        final = {s: v + (trans[-1] if s[0] == "map" else 0) for s, v in best[-1].items()}
        states = [min(final, key=lambda s: (final[s], s[0] != "kernel"))]
        for i in range(n - 1, 0, -1):
            states.insert(0, back[i][states[0]])
    modes = [s[0] for s in states]

    plans = []
    for i, (layer, cost) in enumerate(zip(layers, costs)):
        channel_in = i > 0 and modes[i] == "map" and modes[i - 1] == "map" and layers[i - 1].chained
        channel_out = i + 1 < n and modes[i] == "map" and modes[i + 1] == "map" and layer.chained
        # XLA merges the group's identical gathers into one; charge it to the group's last map layer
        later_map_in_group = any(modes[j] == "map" and layers[j].input_group == layer.input_group for j in range(i + 1, n))
        if pins[i] == "auto" and len(allowed[i]) > 1:
            why = f"fewest bytes on the chain (kernel {cost['kernel'].total:,} / map {cost['map'].total:,} + hand-offs)"
        elif len(allowed[i]) == 1 and pins[i] == "auto":
            why = "only mode left"
        else:
            why = f"pinned by {pins[i]}"
        why = "; ".join(notes[i] + [why])
        plans.append(LayerPlan(
            name=layer.name, kind=layer.kind, kernel_shape=tuple(layer.kernel_shape),
            kernel_bytes=(math.prod(layer.kernel_shape) + layer.bias_elements) * layer.param_bytes,
            map_bytes=layer.map_bytes, devices=devices, repeats=layer.repeats,
            kernel_mode_bytes=cost["kernel"].total,
            map_mode_bytes=None if cost["map"] is None else cost["map"].total,
            transition_bytes=trans[i],
            shared_gather_bytes=cost["map"].forward if modes[i] == "map" and later_map_in_group else 0,
            mode=modes[i],
            in_layout="channel" if channel_in else "batch", out_layout="channel" if channel_out else "batch",
            compress=cfg.compress if modes[i] == "kernel" and splittable(layer, devices) and layer.kind != "lookup" else "none",
            pinned=pins[i], split_kernel=splittable(layer, devices), out_axis=layer.out_axis,
            kernel_held_bytes=held[i]["kernel"], map_held_bytes=held[i]["map"], reason=why,
            param=layer.param, transposed=layer.transposed,
        ))
    return BroadcastPlan(devices, tuple(axes), cfg.compress, plans, other_param_bytes, budget_bytes, xla_table_bytes)


# ------------------------------------------------------------------ recording layer shapes

_RECORDER: contextvars.ContextVar = contextvars.ContextVar("meshpilot_broadcast_recorder", default=None)
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("meshpilot_broadcast_plan", default=None)
_REPEATS: contextvars.ContextVar = contextvars.ContextVar("meshpilot_broadcast_repeats", default=1)


@contextlib.contextmanager
def repeated(n: int):
    """Layers traced inside run ``n`` times per micro-batch (the body of a scan over ``n`` layers)."""
    token = _REPEATS.set(_REPEATS.get() * n)
    try:
        yield
    finally:
        _REPEATS.reset(token)


def trace_layers(fn: Callable, *abstract_args) -> list[LayerShape]:
    """The broadcast layers ``fn`` calls, in call order, with their shapes (abstract trace, no FLOPs).

    Consecutive layers reading the same traced value (attention's query/key/value) get one
    ``input_group``: XLA gathers that feature map once for all of them.
    """
    calls: list[tuple[LayerShape, Any]] = []
    token = _RECORDER.set(calls)
    try:
        jax.eval_shape(lambda *a: fn(*a), *abstract_args)  # a fresh function: a cached trace would record nothing
    finally:
        _RECORDER.reset(token)
    layers, group = [], 0
    for i, (layer, x) in enumerate(calls):
        if any(layer.name == other.name for other in layers):
            raise ValueError(f"broadcast layer name {layer.name!r} is used twice; layer names must be unique")
        group += i > 0 and x is not calls[i - 1][1]
        layers.append(dataclasses.replace(layer, input_group=group))
    return layers


@contextlib.contextmanager
def use_plan(plan: BroadcastPlan | None, mesh):
    """While tracing a step, run the layers named in ``plan`` in their planned modes on ``mesh``."""
    token = _ACTIVE.set(None if plan is None else (plan, mesh))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


# ------------------------------------------------------------------ kernel transfer, compressed or not


def _quantize_int8(w, out_axis: int):
    """Symmetric int8 with one scale per output channel (reduced over the input dimensions)."""
    reduce_axes = tuple(range(out_axis))
    scale = jnp.max(jnp.abs(w), axis=reduce_axes) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale).astype(jnp.float32)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return q, scale


def _gather_kernel(w, axes, out_axis: int, compress: str):
    """All-gather a kernel split by output channel; compressed on the wire, float again on arrival.

    The backward pass reduce-scatters the float gradient (straight-through: the gradient of
    the dequantised kernel is the gradient of the stored one).
    """
    if compress == "none":
        return jax.lax.all_gather(w, axes, axis=out_axis, tiled=True)

    @jax.custom_vjp
    def gather(w):
        if compress == "bf16":  # sent as raw 16-bit words, so XLA cannot hoist the cast past the gather
            bits = jax.lax.bitcast_convert_type(w.astype(jnp.bfloat16), jnp.uint16)
            bits = jax.lax.all_gather(bits, axes, axis=out_axis, tiled=True)
            return jax.lax.bitcast_convert_type(bits, jnp.bfloat16).astype(w.dtype)
        q, scale = _quantize_int8(w, out_axis)
        q = jax.lax.all_gather(q, axes, axis=out_axis, tiled=True)
        scale = jax.lax.all_gather(scale, axes, axis=0, tiled=True)
        return (q.astype(jnp.float32) * scale).astype(w.dtype)

    def fwd(w):
        return gather(w), None

    def bwd(_, g):
        return (jax.lax.psum_scatter(g, axes, scatter_dimension=out_axis, tiled=True),)

    gather.defvjp(fwd, bwd)
    return gather(w)


# ------------------------------------------------------------------ the layers


def _spec(ndim: int, axis: int, axes) -> PartitionSpec:
    parts = [None] * ndim
    parts[axis] = axes
    return PartitionSpec(*parts)


def broadcast_apply(
    compute: Callable,
    x,
    kernel,
    bias,
    *,
    name: str,
    kind: str,
    out_axis: int,
    input_grad: bool = True,
    chained: bool = False,
    param: str = "",
    transposed: bool = False,
):
    """``compute(x, kernel) (+ bias)`` in the mode the active plan gives layer ``name``.

    ``kernel`` holds output channels from dimension ``out_axis`` on; ``bias`` has the shape of
    those trailing dimensions. With no plan active this is the plain computation; while
    ``trace_layers`` records, the call is recorded as well. ``param``/``transposed`` say where
    the kernel is stored when it is not ``<name>.kernel`` (so the plan can store it split).
    """
    def plain(x, kernel, bias):
        y = compute(x, kernel)
        return y if bias is None else y + bias

    calls = _RECORDER.get()
    if calls is not None:
        y = jax.eval_shape(plain, x, kernel, bias)
        calls.append((LayerShape(
            name=name, kind=kind, kernel_shape=tuple(kernel.shape), out_axis=out_axis, in_shape=tuple(x.shape),
            out_shape=tuple(y.shape), act_bytes=jnp.dtype(x.dtype).itemsize,
            param_bytes=jnp.dtype(kernel.dtype).itemsize, bias=bias is not None,
            input_grad=input_grad, chained=chained, repeats=_REPEATS.get(), out_bytes=jnp.dtype(y.dtype).itemsize,
            param=param, transposed=transposed,
        ), x))
    layer = _planned(name)
    if layer is None:
        return plain(x, kernel, bias)
    plan, mesh = _ACTIVE.get()
    axes = plan.axes
    y_ndim = jax.eval_shape(plain, x, kernel, bias).ndim
    y_channel_axis = y_ndim - (kernel.ndim - out_axis)  # first output-channel dimension of y

    def body(x, kernel, bias):
        with layer_scope(name):
            if layer.mode == "kernel":
                if layer.split_kernel:
                    kernel = _gather_kernel(kernel, axes, out_axis, layer.compress)
                    if bias is not None:
                        bias = jax.lax.all_gather(bias, axes, axis=0, tiled=True)
                return plain(x, kernel, bias)
            x = jax.lax.all_gather(x, axes, axis=0 if layer.in_layout == "batch" else x.ndim - 1, tiled=True)
            y = plain(x, kernel, bias)
            if layer.out_layout == "batch":
                y = jax.lax.all_to_all(y, axes, 0, y_channel_axis, tiled=True)
            return y

    channel_split = layer.split_kernel
    x_spec = PartitionSpec(axes) if layer.in_layout == "batch" else _spec(x.ndim, x.ndim - 1, axes)
    k_spec = _spec(kernel.ndim, out_axis, axes) if channel_split else PartitionSpec()
    b_spec = PartitionSpec(axes) if channel_split else PartitionSpec()
    y_spec = PartitionSpec(axes) if layer.out_layout == "batch" else _spec(y_ndim, y_ndim - 1, axes)
    if bias is None:
        fn = jax.shard_map(lambda x, k: body(x, k, None), mesh=mesh, in_specs=(x_spec, k_spec), out_specs=y_spec,
                           axis_names=_manual_axes(mesh, axes))
        return fn(x, kernel)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(x_spec, k_spec, b_spec), out_specs=y_spec, axis_names=_manual_axes(mesh, axes))
    return fn(x, kernel, bias)


def _manual_axes(mesh, axes) -> set[str]:
    """The plan's axes plus every mesh axis of size 1 (which moves nothing), so the layer is manual on them all.

    Left automatic, a size-1 axis makes JAX put a sharding constraint inside the reducer of each
    psum/reduce-scatter, which XLA:CPU lowers to a ``copy`` at the reducer's root; its pass that
    widens bfloat16 reductions to float32 (AllReducePromotion) then aborts with "Invalid binary
    instruction opcode copy" (reproducer: BENCHMARKS.md, "bfloat16 compute").
    """
    return set(axes) | {a for a, n in zip(mesh.axis_names, mesh.axis_sizes) if n == 1}


def _planned(name: str) -> LayerPlan | None:
    active = _ACTIVE.get()
    return None if active is None else active[0].get(name)


def lookup(tokens, table, *, name: str, param: str = "", dtype=None):
    """``table[tokens]`` as ``dtype``: rows of a (vocab, d) table, in the mode the active plan gives layer ``name``.

    Unplanned, the rows are taken, then cast (the table and its gradient stay in their own dtype);
    planned, the table travels in ``dtype``.

    ``kernel``: all-gather the table (split by vocabulary), look up the local tokens; its
    gradient is reduce-scattered. ``map``: gather every device's token ids, look them up in the
    local vocabulary slice (zero elsewhere) and reduce-scatter the partial embeddings back to
    the batch layout; the backward pass all-gathers the embeddings' gradient.
    """
    dtype = jnp.dtype(dtype or table.dtype)
    calls = _RECORDER.get()
    if calls is not None:
        calls.append((LayerShape(
            name=name, kind="lookup", kernel_shape=tuple(table.shape), out_axis=0, in_shape=tuple(tokens.shape),
            out_shape=(*tokens.shape, table.shape[1]), act_bytes=jnp.dtype(tokens.dtype).itemsize,
            param_bytes=dtype.itemsize, bias=False, input_grad=False, chained=False,
            repeats=_REPEATS.get(), out_bytes=dtype.itemsize, param=param,
        ), tokens))
    layer = _planned(name)
    if layer is None:
        return jnp.take(table, tokens, axis=0).astype(dtype)
    table = table.astype(dtype)
    plan, mesh = _ACTIVE.get()
    axes = plan.axes

    def body(tokens, table):
        with layer_scope(name):
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


def dense(x, kernel, bias=None, *, name: str, n_in: int = 1, input_grad: bool = True, chained: bool = False):
    """Contract the last ``n_in`` dims of ``x`` with the first ``n_in`` dims of ``kernel``."""
    compute = lambda x, k: jnp.tensordot(x, k, axes=n_in)
    return broadcast_apply(compute, x, kernel, bias, name=name, kind="dense", out_axis=n_in,
                           input_grad=input_grad, chained=chained)


def conv(x, kernel, bias=None, *, name: str, input_grad: bool = True, chained: bool = False):
    """NHWC x HWIO, stride 1, SAME padding."""
    compute = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return broadcast_apply(compute, x, kernel, bias, name=name, kind="conv", out_axis=3,
                           input_grad=input_grad, chained=chained)


# ------------------------------------------------------------------ storage layout of planned kernels


def kernel_specs(plan: BroadcastPlan) -> dict[str, tuple[PartitionSpec, PartitionSpec]]:
    """Layer name -> (kernel spec, bias spec) as stored: split by output channel over the plan's axes, or replicated.

    A transposed kernel (a tied head reading the embedding table) gets the spec of its transpose.
    """
    out = {}
    for layer in plan.layers:
        if layer.split_kernel:
            k_spec = _spec(len(layer.kernel_shape), layer.out_axis, plan.axes)
            if layer.transposed:
                k_spec = PartitionSpec(*reversed(tuple(k_spec) + (None,) * (len(layer.kernel_shape) - len(k_spec))))
            out[layer.name] = (k_spec, PartitionSpec(plan.axes))
        else:
            out[layer.name] = (PartitionSpec(), PartitionSpec())
    return out


def name_layers(root, layer_type: type | tuple[type, ...]) -> None:
    """Name every ``layer_type`` module by its path in ``root`` (``blocks.0.mlp.fc_in``): plans and configs use it."""
    for path, node in nnx.iter_graph(root):
        if isinstance(node, layer_type):
            node.name = ".".join(str(k) for k in path)


def unplannable(cfg, axis_sizes: dict[str, int]) -> str | None:
    """Why no plan can be made on this mesh, or None.

    Pipeline stages (``mesh.stage`` > 1); the micro-batch does not split over the batch axes; or, compiling for CPU, bfloat16 compute
    with a mesh axis of size > 1 outside them (the layers stay automatic on it, and XLA:CPU aborts
    on their bf16 reduce-scatters: see ``_manual_axes``). ``auto`` then falls back to XLA's
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
            table_bytes += (readers + 1) * round(_frac(devices) * table)
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
