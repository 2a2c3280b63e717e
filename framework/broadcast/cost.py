"""The cost model: bytes one device moves and holds for a layer in each broadcast mode.

Reads only a layer's traced shapes (``LayerShape``) and the device count P. Byte counts are
per device per micro-batch (forward + backward), by the convention of ``framework.collectives``.
"""
from __future__ import annotations

import dataclasses
import math

MODES = ("kernel", "map")


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


def gather_fraction(p: int) -> float:
    """Share of a buffer one device receives when P devices all-gather (or reduce-scatter) it."""
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
    f, r = gather_fraction(p), layer.repeats
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
    return layer.repeats * 2 * round(gather_fraction(p) * y_local)
