"""Tables -> one Placement per meshpilot param, and reading a device's slice of it from safetensors.

Import places every tensor straight into its sharding: ``jax.make_array_from_callback`` asks
for the slice each local device holds, and only that slice is read from disk (safetensors'
``get_slice``), so no process reads what its devices do not hold, and no device ever holds
the whole model.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import jax
import numpy as np

from framework.config import ModelConfig
from framework.hf.tables import Rule, table_of


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + "/") if isinstance(v, dict) else {key: v})
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        parts = [int(p) if p.isdigit() else p for p in path.split("/")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return tree


@dataclasses.dataclass(frozen=True)
class Placement:
    """How one meshpilot param relates to Hugging Face tensors (one layer's view)."""

    rule: Rule
    # Hugging Face names (object array), one per index of the param's leading stack dims: a layer dim when
    # layer-stacked (scan_layers), then an expert dim when the rule has {e}; 0-d for a param of one tensor
    names: np.ndarray
    layer_shape: tuple[int, ...]  # the meshpilot shape of one Hugging Face tensor (stack dims removed)
    groups: tuple[tuple[int, ...], ...]  # meshpilot dims whose product is each (transposed, unsplit) Hugging Face dim

    @property
    def merged_shape(self) -> tuple[int, ...]:  # meshpilot dims merged: (d, n, hd) -> (d, n*hd)
        return tuple(math.prod(self.layer_shape[j] for j in g) for g in self.groups)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        h = self.merged_shape[::-1] if self.rule.transpose else self.merged_shape
        return h[:-1] + (h[-1] * self.rule.parts,)


def _groups(axes) -> tuple[tuple[int, ...], ...]:
    """Hugging Face keeps heads and head_dim as one dim (n*hd); every other named dim stands alone."""
    groups: list[list[int]] = []
    for j, name in enumerate(axes):
        if name == "head_dim" and groups:
            groups[-1].append(j)
        else:
            groups.append([j])
    return tuple(tuple(g) for g in groups)


def plan(m: ModelConfig, shapes: dict[str, Any], axes: dict[str, tuple]) -> dict[str, Placement]:
    """meshpilot param path -> Placement, from the architecture's table (flat "/" paths in, table order out)."""
    out: dict[str, Placement] = {}

    def add(path, rule, layers):
        """``layers``: the layer index of an unstacked param, the stacked layers' indices, or None (no layer)."""
        lead = int(isinstance(layers, range))
        experts = range(shapes[path].shape[lead]) if "{e}" in rule.hf else None

        def at(i):
            hf = rule.hf if i is None else rule.hf.replace("{i}", str(i))
            return hf if experts is None else [hf.replace("{e}", str(e)) for e in experts]

        names = np.array([at(i) for i in layers] if lead else at(layers), dtype=object)
        shape, ax = tuple(shapes[path].shape)[names.ndim:], tuple(axes[path])[names.ndim:]
        out[path] = Placement(rule, names, shape, _groups(ax))

    for rule in table_of(m):
        if "{i}" not in rule.path:
            if rule.path in shapes:
                add(rule.path, rule, None)
        elif m.scan_layers:  # stacked layers; an MoE model with moe.every > 1 stacks groups (models/moe.py)
            every = m.moe.every if m.moe.n_experts and m.moe.every > 1 else 1
            for j in range(every):
                path = rule.path.replace("{i}/", f"layers/{j}/" if every > 1 else "")
                if path in shapes:
                    add(path, rule, range(j, m.n_layers, every))
        else:
            for i in range(m.n_layers):
                if rule.path.format(i=i) in shapes:
                    add(rule.path.format(i=i), rule, i)
    unmapped = sorted(set(shapes) - set(out))
    if unmapped:
        raise ValueError(f"no Hugging Face tensor maps to meshpilot params {unmapped}")
    return out


def read_slice(tensor, p: Placement, index: tuple[slice, ...]) -> np.ndarray:
    """One layer's meshpilot ``[index]`` read from the Hugging Face tensor: only the rows and columns it covers."""
    merged, expand, rest = [], [], []
    for g in p.groups:
        start, stop, _ = index[g[0]].indices(p.layer_shape[g[0]])
        inner = math.prod(p.layer_shape[j] for j in g[1:])
        merged.append(slice(start * inner, stop * inner))  # whole heads: contiguous along the merged dim
        expand += [stop - start] + [p.layer_shape[j] for j in g[1:]]
        rest += [slice(None)] + [index[j] for j in g[1:]]  # a split head_dim is cut after reading
    h = merged[::-1] if p.rule.transpose else merged
    width = p.hf_shape[-1] // p.rule.parts
    h[-1] = slice(h[-1].start + p.rule.part * width, h[-1].stop + p.rule.part * width)
    x = tensor[tuple(h)]
    x = x.T if p.rule.transpose else x
    return x.reshape(expand)[tuple(rest)]


def place(p: Placement, tensor, shape: jax.ShapeDtypeStruct, sharding) -> jax.Array:
    """The param as a global array in ``sharding``; each device's slice read on demand (once per distinct slice)."""
    cache: dict[tuple, np.ndarray] = {}

    def read(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple(s.indices(n)[:2] for s, n in zip(index, shape.shape))
        if key not in cache:
            k = p.names.ndim  # stack dims: one Hugging Face tensor per index (layers, experts)
            ranges = [range(*key[d]) for d in range(k)]
            parts = [read_slice(tensor(p.names[at]), p, index[k:]) for at in itertools.product(*ranges)]
            x = np.stack(parts).reshape(*map(len, ranges), *parts[0].shape) if k else parts[0]
            cache[key] = np.asarray(x, dtype=shape.dtype)
        return cache[key]

    return jax.make_array_from_callback(shape.shape, sharding, read)
