"""Count the bytes every collective in a compiled XLA program moves, per device.

The cost model predicts bytes; this module reads what XLA actually compiled
(``jax.jit(f).lower(...).compile().as_text()``, post-SPMD-partitioning HLO, where every
shape is already a per-device shape) so predictions can be checked, not trusted.

Counting convention (bytes one device receives, which equals what it sends in the ring
algorithms collectives use), with G the size of the op's replica group:

- all-gather:          result bytes * (G-1)/G      (it receives every shard but its own)
- reduce-scatter:      result bytes * (G-1)        (= operand bytes * (G-1)/G)
- all-reduce:          bytes * 2(G-1)/G            (a reduce-scatter then an all-gather)
- all-to-all:          bytes * (G-1)/G             (it keeps 1/G of its buffer)
- collective-permute:  bytes                       (the whole buffer goes to one peer)

Async pairs (``*-start`` / ``*-done``, as on GPU) are counted once, at the start.
An op inside a loop body (a scan over layers or micro-batches) counts once per iteration:
its bytes are multiplied by the loop's ``known_trip_count`` (loops without one count once).
An op is attributed to a layer when its ``op_name`` metadata carries a scope made by
``layer_scope(name)``; everything else is ``None`` (unattributed).
"""
from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from typing import Iterable

import jax

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1,
}
_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>\(.*?\)|[\w]+\[[^\]]*\](?:\{[^}]*\})?)\s+"
    r"(?P<kind>all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)(?P<start>-start)?\("
)
_ARRAY = re.compile(r"(?P<dtype>[a-z]+\d*[a-z\d]*)\[(?P<dims>[^\]]*)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{(?P<first>[\d,\s]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(?P<dims>[\d,]+)\]<=")
_OP_NAME = re.compile(r'op_name="(?P<name>[^"]*)"')
_SCOPE_PREFIX = "layer__"
_SCOPE = re.compile(_SCOPE_PREFIX + r"(?P<layer>[\w.\-]+)")
_COMPUTATION = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\{\s*$")
_CALLEE = re.compile(r"\b(?P<key>body|condition|calls|to_apply|branch_computations)=(?:\{(?P<names>[^}]*)\}|%?(?P<name>[\w.\-]+))")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(?P<n>\d+)"')


def layer_scope(name: str):
    """A ``jax.named_scope`` whose name survives into HLO metadata and maps back to ``name``."""
    return jax.named_scope(_SCOPE_PREFIX + re.sub(r"[^\w.\-]", "_", name))


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    bytes: int  # per device, by the convention above
    buffer_bytes: int  # the per-device result buffer the op produces
    group_size: int
    layer: str | None
    dtype: str
    executions: int = 1  # times it runs per step (product of enclosing loops' trip counts); bytes include them


def _array_bytes(text: str) -> list[tuple[str, int]]:
    out = []
    for m in _ARRAY.finditer(text):
        dims = [int(d) for d in m["dims"].split(",") if d.strip()]
        n = 1
        for d in dims:
            n *= d
        out.append((m["dtype"], n * _DTYPE_BYTES.get(m["dtype"], 4)))
    return out


def _group_size(line: str, n_devices: int) -> int:
    if m := _GROUPS_LIST.search(line):
        return max(len([d for d in m["first"].split(",") if d.strip()]), 1)
    if m := _GROUPS_IOTA.search(line):
        return int(m["dims"].split(",")[-1])
    return n_devices  # replica_groups={} : every device


def _buffer(kind: str, is_start: bool, arrays: list[tuple[str, int]]) -> tuple[str, int]:
    """The result buffer of one op; async starts carry (operand, result, ...) tuples."""
    if is_start and len(arrays) > 1:
        if kind == "all-gather":
            return max(arrays, key=lambda a: a[1])
        if kind == "collective-permute":
            return arrays[0]
        if kind == "all-reduce":  # all-reduce-start's tuple is the combined results
            return arrays[0][0], sum(b for _, b in arrays)
    return arrays[0][0], sum(b for _, b in arrays)


def _executions(lines: list[str]) -> list[int]:
    """Per line: how often the computation holding it runs per call of ENTRY (loop bodies x trip count)."""
    owner, calls, entry, current = [], {}, None, None
    for line in lines:
        if (c := _COMPUTATION.match(line)) and not line.startswith(" "):
            current = c["name"]
            calls.setdefault(current, [])
            entry = current if c["entry"] else entry
        owner.append(current)
        if current is None:
            continue
        trips = int(t["n"]) if (t := _TRIP_COUNT.search(line)) else 1
        for m in _CALLEE.finditer(line):
            for callee in (m["names"] or m["name"]).split(","):
                calls[current].append((callee.strip().lstrip("%"), trips if m["key"] == "body" else 1))
    runs: dict[str, int] = {}
    stack = [(entry, 1)] if entry else []
    while stack:  # the call graph is a DAG; a computation called from several places sums their counts
        name, n = stack.pop()
        runs[name] = runs.get(name, 0) + n
        stack.extend((callee, n * k) for callee, k in calls.get(name, []))
    return [runs.get(name, 1) if name is not None else 1 for name in owner]


def parse_collectives(hlo_text: str, n_devices: int) -> list[Collective]:
    """Every collective op in compiled HLO text, with its per-device byte count (loop iterations included)."""
    ops = []
    lines = hlo_text.splitlines()
    for line, runs in zip(lines, _executions(lines)):
        m = _OP.match(line)
        if not m:
            continue
        kind = m["kind"]
        dtype, buf = _buffer(kind, bool(m["start"]), _array_bytes(m["shape"]))
        g = _group_size(line, n_devices)
        if g <= 1 and kind != "collective-permute":
            continue
        moved = {
            "all-gather": buf * (g - 1) // g,
            "reduce-scatter": buf * (g - 1),
            "all-reduce": 2 * buf * (g - 1) // g,
            "all-to-all": buf * (g - 1) // g,
            "collective-permute": buf,
        }[kind]
        name = _OP_NAME.search(line)
        scope = _SCOPE.search(name["name"]) if name else None
        ops.append(Collective(kind, moved * runs, buf, g, scope["layer"] if scope else None, dtype, runs))
    return ops


@dataclasses.dataclass
class CollectiveReport:
    """Bytes per device per training step: total, by op kind, and by layer (None: unattributed)."""

    ops: list[Collective]

    @property
    def total(self) -> int:
        return sum(op.bytes for op in self.ops)

    def by_kind(self) -> dict[str, int]:
        out = {k: 0 for k in KINDS}
        for op in self.ops:
            out[op.kind] += op.bytes
        return out

    def by_layer(self) -> dict[str | None, int]:
        out: dict[str | None, int] = defaultdict(int)
        for op in self.ops:
            out[op.layer] += op.bytes
        return dict(out)

    def select(self, kinds: Iterable[str] = KINDS, layers: Iterable[str] | None = None) -> int:
        kinds, layers = set(kinds), None if layers is None else set(layers)
        return sum(op.bytes for op in self.ops if op.kind in kinds and (layers is None or op.layer in layers))

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "by_kind": self.by_kind(),
            "by_layer": {("(unattributed)" if k is None else k): v for k, v in self.by_layer().items()},
        }


def count_compiled(compiled, n_devices: int) -> CollectiveReport:
    """Collectives of a ``jax.stages.Compiled`` (the result of ``.lower(...).compile()``)."""
    return CollectiveReport(parse_collectives(compiled.as_text(), n_devices))
