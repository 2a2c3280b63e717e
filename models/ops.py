"""The layer operations models call: plain computations, unless a runner is installed.

A model runs every layer a broadcast plan may place (dense, conv, the token lookup, the output
head) through this module, under a unique name (``name_layers``: its module path). With no
runner installed each operation is the plain computation: the single-device reference and the
``broadcast.mode: none`` behaviour. ``framework.broadcast`` installs a runner (``use_runner``)
while it records layer shapes or traces a step under a plan, so models never import it: the
hook points down the layer order, from the framework into the models, never back up.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """What a model says about one layer call besides its arrays: enough to plan, record or run it another way."""

    name: str
    kind: str  # "dense", "conv" or "lookup"
    out_axis: int  # kernel dimension holding the (first) output channels
    input_grad: bool  # False when the input is data: no input gradient is computed
    chained: bool  # output reaches the next layer through channel-wise ops only
    param: str  # stored parameter path, when not ``<name>.kernel`` (``embed``, ``unembed``)
    transposed: bool  # the stored parameter is the kernel's transpose (a tied head reads the embedding table)
    repeats: int  # calls per micro-batch: the scan length for a layer inside ``repeated(n)``


class Runner(Protocol):
    """Runs layer calls in place of the plain computations (framework.broadcast's plan runner and shape recorder)."""

    def apply(self, call: LayerCall, compute: Callable, x, kernel, bias): ...

    def lookup(self, call: LayerCall, tokens, table, dtype): ...


_RUNNER: contextvars.ContextVar[Runner | None] = contextvars.ContextVar("meshpilot_layer_runner", default=None)
_REPEATS: contextvars.ContextVar[int] = contextvars.ContextVar("meshpilot_layer_repeats", default=1)


def current_runner() -> Runner | None:
    return _RUNNER.get()


@contextlib.contextmanager
def use_runner(runner: Runner | None):
    """Layer calls traced inside go to ``runner`` (None: the plain computations)."""
    token = _RUNNER.set(runner)
    try:
        yield
    finally:
        _RUNNER.reset(token)


@contextlib.contextmanager
def repeated(n: int):
    """Layers traced inside run ``n`` times per micro-batch (the body of a scan over ``n`` layers)."""
    token = _REPEATS.set(_REPEATS.get() * n)
    try:
        yield
    finally:
        _REPEATS.reset(token)


def plain_apply(compute: Callable, x, kernel, bias):
    y = compute(x, kernel)
    return y if bias is None else y + bias


def plain_lookup(tokens, table, dtype):
    """Rows taken, then cast: the table and its gradient stay in their own dtype."""
    return jnp.take(table, tokens, axis=0).astype(dtype)


def apply(compute: Callable, x, kernel, bias, *, name: str, kind: str, out_axis: int, input_grad: bool = True,
          chained: bool = False, param: str = "", transposed: bool = False):
    """``compute(x, kernel) (+ bias)``, as the installed runner runs layer ``name``.

    ``kernel`` holds output channels from dimension ``out_axis`` on; ``bias`` has the shape of
    those trailing dimensions. ``param``/``transposed`` say where the kernel is stored when it is
    not ``<name>.kernel`` (so a plan can store it split).
    """
    runner = _RUNNER.get()
    if runner is None:
        return plain_apply(compute, x, kernel, bias)
    call = LayerCall(name, kind, out_axis, input_grad, chained, param, transposed, _REPEATS.get())
    return runner.apply(call, compute, x, kernel, bias)


def lookup(tokens, table, *, name: str, param: str = "", dtype=None):
    """``table[tokens]`` as ``dtype``: rows of a (vocab, d) table, as the installed runner runs layer ``name``."""
    dtype = jnp.dtype(dtype or table.dtype)
    runner = _RUNNER.get()
    if runner is None:
        return plain_lookup(tokens, table, dtype)
    call = LayerCall(name, "lookup", 0, False, False, param, False, _REPEATS.get())
    return runner.lookup(call, tokens, table, dtype)


def dense(x, kernel, bias=None, *, name: str, n_in: int = 1, input_grad: bool = True, chained: bool = False):
    """Contract the last ``n_in`` dims of ``x`` with the first ``n_in`` dims of ``kernel``."""
    compute = lambda x, k: jnp.tensordot(x, k, axes=n_in)
    return apply(compute, x, kernel, bias, name=name, kind="dense", out_axis=n_in, input_grad=input_grad, chained=chained)


def conv(x, kernel, bias=None, *, name: str, input_grad: bool = True, chained: bool = False):
    """NHWC x HWIO, stride 1, SAME padding."""
    compute = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return apply(compute, x, kernel, bias, name=name, kind="conv", out_axis=3, input_grad=input_grad, chained=chained)


def name_layers(root, layer_type: type | tuple[type, ...]) -> None:
    """Name every ``layer_type`` module by its path in ``root`` (``blocks.0.mlp.fc_in``): plans and configs use it."""
    for path, node in nnx.iter_graph(root):
        if isinstance(node, layer_type):
            node.name = ".".join(str(k) for k in path)
