"""The plan ("job list"): a mode per layer chosen to move the fewest bytes, pins and budget obeyed."""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import re
from typing import Sequence

from framework.broadcast.cost import (MODES, LayerShape, gather_fraction, held_bytes, mode_costs, splittable,
                                      transition_bytes)
from framework.config import BroadcastConfig, ConfigError


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
        return round(2 * gather_fraction(self.devices) * self.other_param_bytes)

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


@dataclasses.dataclass(frozen=True)
class _Choice:
    """The modes a layer may take, where that came from (``auto`` or the pinning key) and notes on why."""

    allowed: list[str]
    pinned: str
    notes: list[str]


def _choices(layers: Sequence[LayerShape], costs, held, devices: int, cfg: BroadcastConfig,
             budget_bytes: int | None) -> list[_Choice]:
    """Per layer: its pin, less the modes that are impossible or whose buffers exceed the budget."""
    out = []
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
            out.append(_Choice(fits, f"{source} (fell back: {'; '.join(note)})", note))
        else:
            out.append(_Choice([want] if want in MODES else fits, source, note))
    return out


def _cheapest_modes(layers: Sequence[LayerShape], allowed: list[list[str]], costs, trans: list[int]) -> list[str]:
    """The allowed mode per layer with the fewest bytes over the whole call order (dynamic programming).

    State (mode, gathered): this layer's mode, and whether its input group's feature map is
    already gathered by a map-mode member. A map layer's hand-off (all-to-all back to the batch
    layout) is paid once the next mode is known; ties go to ``kernel``.
    """
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
    return [s[0] for s in states]


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
    choices = _choices(layers, costs, held, devices, cfg, budget_bytes)
    modes = _cheapest_modes(layers, [c.allowed for c in choices], costs, trans)

    n = len(layers)
    plans = []
    for i, (layer, cost, choice) in enumerate(zip(layers, costs, choices)):
        channel_in = i > 0 and modes[i] == "map" and modes[i - 1] == "map" and layers[i - 1].chained
        channel_out = i + 1 < n and modes[i] == "map" and modes[i + 1] == "map" and layer.chained
        # XLA merges the group's identical gathers into one; charge it to the group's last map layer
        later_map_in_group = any(modes[j] == "map" and layers[j].input_group == layer.input_group for j in range(i + 1, n))
        if choice.pinned == "auto" and len(choice.allowed) > 1:
            why = f"fewest bytes on the chain (kernel {cost['kernel'].total:,} / map {cost['map'].total:,} + hand-offs)"
        elif len(choice.allowed) == 1 and choice.pinned == "auto":
            why = "only mode left"
        else:
            why = f"pinned by {choice.pinned}"
        why = "; ".join(choice.notes + [why])
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
            pinned=choice.pinned, split_kernel=splittable(layer, devices), out_axis=layer.out_axis,
            kernel_held_bytes=held[i]["kernel"], map_held_bytes=held[i]["map"], reason=why,
            param=layer.param, transposed=layer.transposed,
        ))
    return BroadcastPlan(devices, tuple(axes), cfg.compress, plans, other_param_bytes, budget_bytes, xla_table_bytes)
