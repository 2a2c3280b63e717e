"""How an MoE layer's tokens reach their experts and come back (models/moe.py calls these).

Dropless (``capacity_factor: 0``): the (token, choice) assignments are sorted by expert and each expert's
contiguous rows run through grouped matmuls (``jax.lax.ragged_dot``): nothing is padded or dropped.
With experts split over the ``expert`` mesh axis, each shard sends every other shard the assignments of
its experts with one ``all_to_all`` on padded groups: a (shards, n*k, d) buffer, each row block holding
the assignments for that shard first (a shard may receive every assignment, so dropless pads to n*k), and
one ``all_to_all`` brings the results back. ``jax.lax.ragged_all_to_all`` would send only the filled rows,
but XLA:CPU does not implement it ("HLO opcode `ragged-all-to-all` is not supported by XLA:CPU").

Capacity (``capacity_factor > 0``): per sequence, each expert has ``capacity`` slots; assignments take
them in priority order (every token's first choice before any second choice, then tokens in order, as
GShard), and those beyond are dropped. The (rows, experts, capacity, d) buffer has a fixed shape, so
the expert shards exchange it with a plain ``all_to_all`` and the experts run as a batched matmul.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp


def capacity_of(capacity_factor: float, seq_len: int, top_k: int, n_experts: int) -> int:
    """Slots per expert per sequence: ceil(capacity_factor * seq_len * top_k / n_experts), at least 1."""
    return max(1, math.ceil(capacity_factor * seq_len * top_k / n_experts))


def grouped_ffn(wg, wu, wd) -> Callable:
    """``(rows sorted by expert, rows per expert) -> SwiGLU expert outputs`` with grouped matmuls; rows past
    the groups' total come out zero (ragged_dot leaves them out)."""
    def ffn(xs, group_sizes):
        h = jax.nn.silu(jax.lax.ragged_dot(xs, wg, group_sizes)) * jax.lax.ragged_dot(xs, wu, group_sizes)
        return jax.lax.ragged_dot(h, wd, group_sizes)

    return ffn


def batched_ffn(xs, wg, wu, wd):
    """SwiGLU of (experts, rows, d) through each expert's own weights."""
    h = jax.nn.silu(jnp.einsum("erd,edf->erf", xs, wg)) * jnp.einsum("erd,edf->erf", xs, wu)
    return jnp.einsum("erf,efd->erd", h, wd)


def _inverse(order, values):
    """``values`` sorted by ``order`` put back in the original order."""
    return jnp.zeros_like(values).at[order].set(values)


def dropless(x, ids, n_experts: int, weights, axis: str | None = None, shards: int = 1):
    """Expert outputs (n, k, d) of tokens ``x`` (n, d) for their expert choices ``ids`` (n, k).

    ``weights`` (w_gate, w_up, w_down) hold the experts of this shard: all of them, or
    ``n_experts / shards`` when the experts are split over mesh axis ``axis`` (inside a shard_map).
    """
    n, k = ids.shape
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    xs = x[order // k]
    if shards == 1:
        ys = grouped_ffn(*weights)(xs, jnp.bincount(flat, length=n_experts).astype(jnp.int32))
    else:
        ys = _exchanged(xs, flat[order], n_experts // shards, shards, axis, grouped_ffn(*weights))
    return _inverse(order, ys).reshape(n, k, -1)


def _exchanged(xs, experts, local: int, shards: int, axis: str, ffn: Callable):
    """Rows ``xs`` sorted by their (global) ``experts`` run on the shard holding each expert and come back."""
    nk, d = xs.shape
    dest = experts // local
    counts = jnp.bincount(dest, length=shards)
    pos = jnp.arange(nk) - (jnp.cumsum(counts) - counts)[dest]  # row within its destination's block
    send = jnp.zeros((shards, nk, d), xs.dtype).at[dest, pos].set(xs)
    send_e = jnp.full((shards, nk), local, jnp.int32).at[dest, pos].set(experts % local)  # local: an empty row
    recv = jax.lax.all_to_all(send, axis, 0, 0, tiled=True).reshape(shards * nk, d)  # blocks by source shard
    recv_e = jax.lax.all_to_all(send_e, axis, 0, 0, tiled=True).reshape(-1)
    order = jnp.argsort(recv_e, stable=True)  # empty rows last: no group holds them
    group_sizes = jnp.bincount(recv_e, length=local + 1)[:local].astype(jnp.int32)
    ys = _inverse(order, ffn(recv[order], group_sizes)).reshape(shards, nk, d)
    back = jax.lax.all_to_all(ys, axis, 0, 0, tiled=True)  # blocks by the shard that ran them
    return back[dest, pos]


def capacity_positions(ids, n_experts: int, capacity: int):
    """Each assignment's slot in its expert's buffer within its sequence, and whether it is kept.

    ``ids`` (b, t, k); priority: every token's first choice before any second choice, tokens in order.
    """
    b, t, k = ids.shape
    prio = jnp.swapaxes(ids, 1, 2).reshape(b, k * t)
    onehot = jax.nn.one_hot(prio, n_experts, dtype=jnp.int32)
    pos = ((jnp.cumsum(onehot, axis=1) - 1) * onehot).sum(-1)
    pos = jnp.swapaxes(pos.reshape(b, k, t), 1, 2)
    return pos, pos < capacity


def with_capacity(x, ids, pos, keep, capacity: int, n_experts: int, weights, axis: str | None = None, shards: int = 1):
    """Expert outputs (b, t, k, d) of ``x`` (b, t, d) through fixed-capacity buffers; dropped assignments give 0."""
    b, t, d = x.shape
    k = ids.shape[-1]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], ids.shape)
    slot = jnp.where(keep, pos, capacity)  # out of range: the scatter drops it
    buf = jnp.zeros((b, n_experts, capacity, d), x.dtype).at[rows, ids, slot].set(
        jnp.broadcast_to(x[:, :, None, :], (b, t, k, d)), mode="drop")
    local = n_experts // shards
    if shards > 1:  # (b, shards, local, C, d): block s goes to shard s, which returns its results in place
        buf = jax.lax.all_to_all(buf.reshape(b, shards, local, capacity, d), axis, 1, 1, tiled=True)
    xs = jnp.moveaxis(buf.reshape(b, shards, local, capacity, d), 2, 0).reshape(local, -1, d)
    ys = jnp.moveaxis(batched_ffn(xs, *weights).reshape(local, b, shards, capacity, d), 0, 2)
    if shards > 1:
        ys = jax.lax.all_to_all(ys, axis, 1, 1, tiled=True)
    ys = ys.reshape(b, n_experts, capacity, d)
    out = ys[rows, ids, jnp.minimum(slot, capacity - 1)]
    return jnp.where(keep[..., None], out, jnp.zeros((), out.dtype))
