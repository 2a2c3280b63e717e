"""Mixture-of-experts MLP layer (``model.moe``): a router, routed SwiGLU experts, optional shared experts.

Parameters of one MoE layer (the ``mlp`` of its ``Block``; E = ``n_experts``, D = ``d_model``,
F = ``d_expert_mlp`` or ``d_mlp``), with their logical axes:

- ``router``  [D, E]      (``embed``, ``expert_route``): router logits = x @ router (float32), no bias.
  HF Mixtral ``block_sparse_moe.gate.weight`` / Qwen3-MoE ``mlp.gate.weight`` are its transpose [E, D].
- ``w_gate``  [E, D, F]   (``expert``, ``embed``, ``mlp``): HF Mixtral ``experts.{e}.w1`` / Qwen3 ``gate_proj``, transposed.
- ``w_up``    [E, D, F]   (``expert``, ``embed``, ``mlp``): HF Mixtral ``experts.{e}.w3`` / Qwen3 ``up_proj``, transposed.
- ``w_down``  [E, F, D]   (``expert``, ``mlp``, ``embed``): HF Mixtral ``experts.{e}.w2`` / Qwen3 ``down_proj``, transposed.
  Expert e computes ``(silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]``.
- ``shared`` (only with ``n_shared_experts > 0``): a dense ``transformer.MLP`` of width
  ``n_shared_experts * F`` (``shared.fc_in``, ``shared.gate``, ``shared.fc_out`` kernels, as the model's MLPs:
  ``fc_in`` is the up projection, ``gate`` the gate one), added to the routed output of every token.

Routing (``router: softmax_topk``): p = softmax(logits) over all E experts; the top ``top_k`` of p are kept;
with ``norm_topk_prob`` they are divided by their sum. That is HF Mixtral (softmax, top-k, renormalise:
always on) and Qwen3-MoE (the same, renormalised when its ``norm_topk_prob`` is true). The output is
sum_k weight_k * expert_{id_k}(x) (+ shared(x)).

Layer pattern: layer i is MoE when (i + 1) % ``every`` == 0. Unscanned, ``blocks.{i}.mlp`` is this layer
or a dense MLP. With ``model.scan_layers`` and every == 1 the stack is of Blocks (leading dim n_layers);
with every > 1 it is of ``LayerGroup``s (leading dim n_layers / every) whose ``layers.{j}`` is layer
g * every + j, the last of each group the MoE one.

Routing losses and metrics are per sequence (the group of GShard's capacity and of the load-balancing
loss is one sequence, as DeepSeek-V3's sequence-wise loss), so they are the same however the batch is
split over devices, micro-batches or pipeline stages. Each layer adds a (batch, 3 + E) row of sums
to the residual stream's companion ``stats``: Switch aux loss E * sum_e f_e P_e (f_e: share of the
sequence's assignments routed to e, P_e: mean router probability of e; 1.0 when balanced), z-loss
mean logsumexp(logits)^2, dropped assignments, tokens each expert got. ``finish`` turns them into the
extra loss and the ``moe/*`` metrics.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from framework.config import ModelConfig
from framework.sharding import activation_context, constrain, logical_to_spec
from models import moe_dispatch

EXPERT_AXIS = "expert"  # the mesh axis the experts are split over
STAGE_AXIS = "stage"  # left to the pipeline's vmap: the layer's shard_map is manual over the other axes
N_STATS = 3  # per-row sums before the per-expert token counts: aux loss, z loss, dropped assignments


def is_moe_layer(cfg: ModelConfig, i: int) -> bool:
    return cfg.moe.n_experts > 0 and (i + 1) % cfg.moe.every == 0


def n_moe_layers(cfg: ModelConfig) -> int:
    return sum(is_moe_layer(cfg, i) for i in range(cfg.n_layers))


def shared_config(cfg: ModelConfig) -> ModelConfig:
    """The model config of the shared experts' dense MLP."""
    return dataclasses.replace(cfg, d_mlp=cfg.moe.n_shared_experts * (cfg.moe.d_expert_mlp or cfg.d_mlp))


def _param(rngs, shape, axes, dtype, std):
    return nnx.Param(nnx.with_partitioning(nnx.initializers.normal(std), axes)(rngs.params(), shape, dtype))


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, param_dtype, rngs: nnx.Rngs, shared: nnx.Module | None = None):
        e = cfg.moe
        d, f, n = cfg.d_model, e.d_expert_mlp or cfg.d_mlp, e.n_experts
        self.cfg, self.dtype = cfg, dtype
        self.router = _param(rngs, (d, n), ("embed", "expert_route"), param_dtype, 0.02)
        self.w_gate = _param(rngs, (n, d, f), ("expert", "embed", "mlp"), param_dtype, 0.02)
        self.w_up = _param(rngs, (n, d, f), ("expert", "embed", "mlp"), param_dtype, 0.02)
        self.w_down = _param(rngs, (n, f, d), ("expert", "mlp", "embed"), param_dtype, 0.02 / (2 * cfg.n_layers) ** 0.5)
        self.shared = shared

    def __call__(self, x):
        return self.routed(x)[0]

    def routed(self, x):
        """(output (B, T, D), per-row routing sums (B, 3 + E) float32) of x (B, T, D)."""
        args = (x.astype(self.dtype), self.router[...].astype(jnp.float32),
                *(w[...].astype(self.dtype) for w in (self.w_gate, self.w_up, self.w_down)))
        y, stats = _sharded(functools.partial(layer, self.cfg), args)
        if self.shared is not None:
            y = y + self.shared(x)
        return y, stats


def _sharded(fn, args):
    """``fn`` on each device's rows inside a shard_map, the experts split over the ``expert`` axis; the
    plain computation outside a traced step or where the rows do not split over the expert axis."""
    ctx = activation_context()
    if ctx is None:
        return fn(*args, axis=None, shards=1)
    mesh, rules = ctx
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    x = args[0]
    x_spec = logical_to_spec(("batch",), rules, {a: s for a, s in sizes.items() if a != STAGE_AXIS}, x.shape[:1])
    shards = sizes.get(EXPERT_AXIS, 1)
    row_axes = () if not x_spec else (x_spec[0],) if isinstance(x_spec[0], str) else x_spec[0]
    if shards > 1 and EXPERT_AXIS not in row_axes:
        return fn(*args, axis=None, shards=1)  # XLA's propagation moves the experts (the planner's one-row trace)
    w_spec = PartitionSpec(EXPERT_AXIS) if shards > 1 else PartitionSpec()
    body = functools.partial(fn, axis=EXPERT_AXIS if shards > 1 else None, shards=shards)
    mapped = jax.shard_map(body, mesh=mesh, in_specs=(x_spec, PartitionSpec(), w_spec, w_spec, w_spec),
                           out_specs=(x_spec, x_spec))
    return mapped(*args)


def route(cfg: ModelConfig, x, router):
    """Router logits (f32), full softmax probabilities, top-k expert ids and their weights, of x (..., D)."""
    logits = jnp.einsum("...d,de->...e", x.astype(jnp.float32), router)
    probs = jax.nn.softmax(logits, axis=-1)
    top, ids = jax.lax.top_k(probs, cfg.moe.top_k)
    if cfg.moe.norm_topk_prob:
        top = top / top.sum(-1, keepdims=True)
    return logits, probs, ids, top


def layer(cfg: ModelConfig, x, router, wg, wu, wd, *, axis, shards):
    """One MoE layer on rows x (b, t, D) with this shard's experts; (output, per-row sums (b, 3 + E))."""
    e = cfg.moe
    b, t, d = x.shape
    logits, probs, ids, weights = route(cfg, x, router)
    if e.capacity_factor > 0:
        capacity = moe_dispatch.capacity_of(e.capacity_factor, t, e.top_k, e.n_experts)
        pos, keep = moe_dispatch.capacity_positions(ids, e.n_experts, capacity)
        out = moe_dispatch.with_capacity(x, ids, pos, keep, capacity, e.n_experts, (wg, wu, wd), axis, shards)
    else:
        keep = jnp.ones(ids.shape, bool)
        out = moe_dispatch.dropless(x.reshape(b * t, d), ids.reshape(b * t, -1), e.n_experts, (wg, wu, wd), axis,
                                    shards).reshape(b, t, -1, d)
    y = jnp.einsum("btkd,btk->btd", out, (weights * keep).astype(out.dtype))
    return y, row_stats(logits, probs, ids, keep, e.n_experts)


def row_stats(logits, probs, ids, keep, n_experts: int):
    """Per sequence: Switch aux loss, z-loss, dropped assignments, tokens per expert kept: (b, 3 + E)."""
    onehot = jax.nn.one_hot(ids, n_experts, dtype=jnp.float32)  # (b, t, k, E)
    routed = onehot.sum((1, 2))
    f = routed / routed.sum(-1, keepdims=True)
    aux = n_experts * (f * probs.mean(1)).sum(-1)
    z = jnp.square(jax.nn.logsumexp(logits, axis=-1)).mean(-1)
    dropped = (~keep).sum((1, 2)).astype(jnp.float32)
    kept = (onehot * keep[..., None]).sum((1, 2))
    return jnp.concatenate([aux[:, None], z[:, None], dropped[:, None], kept], axis=-1)


# ------------------------------------------------------------------ the residual stream's companion sums


def start(cfg: ModelConfig, x):
    """The layers' carry: x, or (x, zero routing sums) in an MoE model."""
    if cfg.moe.n_experts == 0:
        return x
    return x, constrain(jnp.zeros((x.shape[0], N_STATS + cfg.moe.n_experts), jnp.float32), ("batch", None))


def split(carry):
    return carry if isinstance(carry, tuple) else (carry, None)


def join(x, stats):
    return x if stats is None else (x, constrain(stats, ("batch", None)))


def mlp_call(mlp, x, stats):
    """The block's MLP on x; an MoE one also adds its routing sums to ``stats`` (None: a caller that runs one layer
    alone, as the planner's ``Transformer.one_layer``, carries none)."""
    if not isinstance(mlp, MoE):
        return mlp(x), stats
    y, s = mlp.routed(x)
    return y, None if stats is None else stats + s


def finish(cfg: ModelConfig, stats, seq_len: int) -> dict:
    """The routing sums of every MoE layer -> {"loss": weighted routing loss, "metrics": {moe/...}}."""
    e, layers = cfg.moe, n_moe_layers(cfg)
    aux = stats[:, 0].mean() / layers
    z = stats[:, 1].mean() / layers
    dropped = stats[:, 2].sum() / (stats.shape[0] * seq_len * e.top_k * layers)
    load = stats[:, N_STATS:].sum(0)
    mean = jnp.maximum(load.mean(), 1e-9)
    metrics = {"moe/aux_loss": aux, "moe/z_loss": z, "moe/load_min": load.min() / mean, "moe/load_max": load.max() / mean,
               "moe/dropped_fraction": dropped}
    loss = e.aux_loss_weight * aux + e.router_z_loss_weight * z
    return {"loss": loss, "metrics": {**metrics, "moe/routing_loss": loss}}
