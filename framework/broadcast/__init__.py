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

One idea a file: ``cost`` (bytes moved and held per mode), ``plan`` (the job list and its
dynamic programme), ``layers`` (the runners installed into ``models.ops``: shard_map layers,
the shape recorder), ``compress`` (bf16/int8 gathers), ``model`` (planning a model, storing
its kernels as planned). Models call ``models.ops``; outside ``use_plan`` those are plain
einsums/convolutions (the single-device reference and the ``broadcast.mode: none`` behaviour).
Byte counts are per device per micro-batch (forward + backward), by the convention of
``framework.collectives``.
"""
from framework.broadcast.cost import (MODES, LayerShape, ModeCost, compressed_kernel_bytes, held_bytes, mode_costs,
                                      splittable, transition_bytes)
from framework.broadcast.layers import trace_layers, use_plan
from framework.broadcast.model import kernel_specs, plan_model, unplannable, with_kernel_specs
from framework.broadcast.plan import BroadcastPlan, LayerPlan, check_overrides, make_plan

__all__ = [
    "MODES", "BroadcastPlan", "LayerPlan", "LayerShape", "ModeCost", "check_overrides", "compressed_kernel_bytes",
    "held_bytes", "kernel_specs", "make_plan", "mode_costs", "plan_model", "splittable", "trace_layers",
    "transition_bytes", "unplannable", "use_plan", "with_kernel_specs",
]
