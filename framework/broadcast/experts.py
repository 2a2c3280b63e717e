"""The broadcast plan's entry for mixture-of-experts layers: expert-parallel, kernels never broadcast, tokens travel.

An MoE layer (models/moe.py) with experts split over the ``expert`` mesh axis is its own shard_map: each
device keeps its experts' weights and exchanges tokens with ``all_to_all`` (models/moe_dispatch.py). Its
cost is what those exchanges move, per device per micro-batch (forward + backward), by the convention of
``framework.collectives`` (an all-to-all moves its buffer x (G-1)/G):

- dropless: the (G, n*k, d) token buffer goes out and comes back (2), the two transposes in the backward
  pass (2), and the (G, n*k) int32 expert ids once: 4 * G*n*k*d*bytes + G*n*k*4, times (G-1)/G;
- capacity: the (rows, E, C, d) buffer, 4 times, no ids;

n = the device's tokens (rows x seq_len), k = top_k, per MoE layer; ``model.remat`` recomputes the forward
exchanges in the backward pass (+2 buffers, +1 ids).
"""
from __future__ import annotations

import dataclasses
import math

from framework.config import Config
from framework.sharding import batch_axes

EXPERT_AXIS = "expert"


@dataclasses.dataclass(frozen=True)
class ExpertPlan:
    mode: str  # "expert-parallel"
    axis_size: int
    moe_layers: int
    all_to_all_bytes: int  # per device per micro-batch, forward + backward, all MoE layers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan_experts(cfg: Config, axis_sizes: dict[str, int], micro_batch: int) -> ExpertPlan | None:
    """The MoE layers' entry for a micro-batch of ``micro_batch`` rows; None without an expert axis (or when the rows
    do not split over it: the layer then leaves the experts to XLA's propagation)."""
    m, e = cfg.model, cfg.model.moe
    shards = axis_sizes.get(EXPERT_AXIS, 1)
    axes = batch_axes(cfg.sharding.activation_rules, {a: s for a, s in axis_sizes.items() if a != "stage"})
    devices = math.prod(axis_sizes[a] for a in axes)
    if not e.n_experts or shards == 1 or EXPERT_AXIS not in axes or micro_batch % devices:
        return None
    rows, t = micro_batch // devices, cfg.train.seq_len
    act = 2 if cfg.train.dtype in ("bfloat16", "float16") else 4
    exchanges, id_exchanges = (6, 1) if m.remat else (4, 1)
    if e.capacity_factor > 0:
        capacity = max(1, math.ceil(e.capacity_factor * t * e.top_k / e.n_experts))
        per_layer = exchanges * rows * e.n_experts * capacity * m.d_model * act
    else:
        assignments = shards * rows * t * e.top_k
        per_layer = exchanges * assignments * m.d_model * act + id_exchanges * assignments * 4
    layers = sum((i + 1) % e.every == 0 for i in range(m.n_layers))
    return ExpertPlan("expert-parallel", shards, layers, layers * per_layer * (shards - 1) // shards)


def format_experts(plan: dict) -> str:
    return (f"experts: {plan['mode']} over expert={plan['axis_size']} ({plan['moe_layers']} MoE layers): kernels never "
            f"broadcast, tokens travel; all-to-all {plan['all_to_all_bytes']:,} bytes per device per micro-batch")
