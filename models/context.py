"""Attention with the sequence split over the mesh axis the activation rules give ``length`` (``context``).

Under context parallelism every activation is split along the sequence: each of the C devices of the
axis holds T/C tokens. Attention is the one layer that mixes tokens, so it alone talks across the axis:

- ``ring``: K/V blocks go round the axis with ``ppermute`` (C-1 hops) while each device folds the block it
  holds into an online softmax (flash-attention style running max and sum). The backward pass is a second
  ring (a ``custom_vjp``): the block's dK/dV travel with it and reach their owner after one more hop, so a
  device keeps only its own q, k, v, output and log-sum-exp, never the full sequence.
- ``allgather``: K/V (and their segment ids) are gathered whole, then each device attends its own queries.
- ``auto``: ``choose`` (a small cost model, printed by scripts/plan.py).

Causal load balancing: the sequence is cut into 2C chunks and device d holds chunks d and 2C-1-d (the
zig-zag split), so every device has an early and a late chunk. In the ring, a block from an earlier
device is seen by all of d's queries through its first chunk only, a block from a later device by d's
second chunk only: each hop computes half a block on every device, equal work everywhere.

The token order on the mesh is therefore the zig-zag order: ``to_layout`` puts per-token arrays into it
(the objective does, for inputs, targets and any segment ids), ``positions`` are the true positions of
the tokens in that order (RoPE and learned positions use them), and the causal mask compares true
positions. With no context axis every function here is the identity, and ``attention`` is the plain
``jax.nn.dot_product_attention``.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from framework import sharding
from models.attention import block_mask, causal_attention

MODES = ("ring", "allgather", "auto")
RING_INTENSITY = 1000.0  # flops per byte moved above which a ring hop's compute hides its permute (accelerator: matmul rate / link bandwidth)
ALLGATHER_SCORE_BYTES = 1 << 30  # per row and layer: above this the all-gathered local score matrix is too large; ring
_NEG = -1e30  # the score of a masked pair (finite: fully masked rows stay free of NaNs)


def context_axis():
    """(mesh, axis name, size) of the axis activations split the sequence over, while a step is traced; None without one."""
    ctx = sharding.activation_context()
    if ctx is None:
        return None
    mesh, rules = ctx
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    axes = [a for a in rules.get("length", ()) if sizes.get(a, 1) > 1]
    if not axes:
        return None
    if len(axes) > 1:
        raise ValueError(f"activation rule length -> {axes}: context parallelism splits the sequence over one mesh axis")
    return mesh, axes[0], sizes[axes[0]]


def zigzag_order(seq_len: int, size: int) -> np.ndarray:
    """True positions of the tokens in the zig-zag layout over ``size`` devices (device d: chunks d and 2*size-1-d)."""
    if seq_len % (2 * size):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 * context = {2 * size} (the zig-zag split)")
    chunks = np.arange(seq_len).reshape(2 * size, seq_len // (2 * size))
    return np.concatenate([np.concatenate([chunks[d], chunks[2 * size - 1 - d]]) for d in range(size)])


def positions(seq_len: int) -> jax.Array:
    """The true position of each token of the sequence as the mesh holds it: 0..T-1 without a context axis."""
    axis = context_axis()
    return jnp.arange(seq_len) if axis is None else jnp.asarray(zigzag_order(seq_len, axis[2]))


def to_layout(tree, axis: int = 1):
    """Per-token arrays (sequence along ``axis``) in the mesh's token order (the zig-zag order under a context axis)."""
    ctx = context_axis()
    if ctx is None:
        return tree
    return jax.tree.map(lambda x: jnp.take(x, jnp.asarray(zigzag_order(x.shape[axis], ctx[2])), axis=axis), tree)


def from_layout(x, size: int, axis: int = 1):
    """Arrays in the zig-zag order over ``size`` devices back in true order (tests, and reading logits on the host)."""
    return jnp.take(x, jnp.asarray(np.argsort(zigzag_order(x.shape[axis], size))), axis=axis)


def choose(seq_len: int, n_heads: int, n_kv_heads: int, head_dim: int, context: int, itemsize: int) -> tuple[str, str]:
    """(``ring`` or ``allgather``, the reason): the cost model behind ``model.context_attention: auto``.

    A ring hop moves one K/V block (2 T/C K H bytes) and computes half a block of scores for it
    (4 (T/C)^2/2 N H flops): its arithmetic intensity T/C * N / (K * itemsize) says whether the permute hides
    behind the compute. Short local blocks (or heavy K/V) gather once instead. All-gather keeps the local
    (T/C, T) score matrix of every head, so past ``ALLGATHER_SCORE_BYTES`` per row it is the ring regardless.
    """
    local = seq_len // context
    intensity = local * n_heads / (n_kv_heads * itemsize)
    scores = local * seq_len * n_heads * 4
    if scores > ALLGATHER_SCORE_BYTES:
        return "ring", f"all-gather's local scores {scores / 2**20:.0f} MiB per row > {ALLGATHER_SCORE_BYTES / 2**20:.0f} MiB"
    if intensity >= RING_INTENSITY:
        return "ring", f"ring hop intensity {intensity:.0f} flop/byte >= {RING_INTENSITY:.0f}: permutes hide behind compute"
    return "allgather", f"ring hop intensity {intensity:.0f} flop/byte < {RING_INTENSITY:.0f}: one gather is cheaper"


def mode_for(cfg, seq_len: int, context: int, itemsize: int) -> tuple[str, str]:
    """(the attention ``cfg`` (a ModelConfig) runs under ``context`` devices, why): its ``context_attention``, or the
    cost model's choice for ``auto``."""
    if cfg.context_attention != "auto":
        return cfg.context_attention, f"model.context_attention={cfg.context_attention}"
    return choose(seq_len, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, cfg.d_model // cfg.n_heads, context, itemsize)


def attention(q, k, v, *, segment_ids=None, mode: str = "auto", implementation=None):
    """Causal attention of q (B, T, N, H) over k, v (B, T, K, H), K dividing N; tokens of different ``segment_ids``
    (B, T) never see each other. Under a context axis: ``mode`` ring or allgather (auto: ``choose``)."""
    ctx = context_axis()
    if ctx is None:
        return causal_attention(q, k, v, segment_ids, implementation=implementation)
    mesh, axis, size = ctx
    if mode == "auto":
        mode = choose(q.shape[1], q.shape[2], k.shape[2], q.shape[3], size, q.dtype.itemsize)[0]
    rows = _batch_axes(mesh, q.shape[0])
    seq = P(rows or None, axis)  # manual over the batch and context axes; heads stay with XLA (tensor)
    inner = functools.partial(_ring if mode == "ring" else _allgather, axis=axis, size=size)
    body, args = inner, (q, k, v, segment_ids)
    if segment_ids is None:
        body, args = (lambda q, k, v: inner(q, k, v, None)), (q, k, v)
    # a pipeline runs the layers under vmap(spmd_axis_name=stage): that axis must be manual here too
    stages = {a for a in sharding.activation_context()[1].get("stage", ()) if a in mesh.axis_names}
    fn = jax.shard_map(body, mesh=mesh, in_specs=(seq,) * len(args), out_specs=seq, axis_names={axis, *rows, *stages},
                       check_vma=False)
    return fn(*args)


def _batch_axes(mesh, batch: int) -> tuple[str, ...]:
    """The mesh axes the activation rules split the batch over, when they divide ``batch`` (else XLA keeps them)."""
    _, rules = sharding.activation_context()
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    axes = tuple(a for a in sharding.batch_axes([["batch", list(rules.get("batch", ()))]], sizes) if sizes[a] > 1)
    return axes if batch % math.prod(sizes[a] for a in axes) == 0 else ()


def _local_positions(device, local: int, size: int):
    """True positions of the ``local`` tokens device ``device`` holds in the zig-zag layout."""
    half = local // 2
    r = jnp.arange(half)
    return jnp.concatenate([device * half + r, (2 * size - 1 - device) * half + r])


def _mask(q_pos, k_pos, q_seg, k_seg):
    """(B or 1, Tq, Tk) visibility: causal over true positions, within a segment (models/attention.py's mask)."""
    return block_mask(q_pos, k_pos, q_seg, k_seg)[:, 0]


def _allgather(q, k, v, seg, *, axis, size):
    local = q.shape[1]
    q_pos = _local_positions(jax.lax.axis_index(axis), local, size)
    k_pos = jnp.asarray(zigzag_order(local * size, size))
    k, v = (jax.lax.all_gather(a, axis, axis=1, tiled=True) for a in (k, v))
    k_seg = None if seg is None else jax.lax.all_gather(seg, axis, axis=1, tiled=True)
    mask = _mask(q_pos, k_pos, seg, k_seg)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")


# ------------------------------------------------------------------ ring attention


def _ring(q, k, v, seg, *, axis, size):
    """The ring over ``axis`` on one device's (B, T/C, N, H) block; heads grouped (B, T, K, G, H) for GQA."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, n // kv, h)
    out = _ring_attention(axis, size)(qg, k, v, seg)
    return out.reshape(b, t, n, h)


@functools.cache
def _ring_attention(axis: str, size: int):
    """The custom-vjp ring attention for one axis and size: f(q (B,T,K,G,H), k, v (B,T,K,H), seg (B,T) | None)."""

    @jax.custom_vjp
    def ring(q, k, v, seg):
        return _ring_forward(q, k, v, seg, axis, size)[0]

    def fwd(q, k, v, seg):
        out, lse = _ring_forward(q, k, v, seg, axis, size)
        return out, (q, k, v, seg, out, lse)

    def bwd(res, d_out):
        q, k, v, seg, out, lse = res
        dq, dk, dv = _ring_backward(q, k, v, seg, out, lse, d_out, axis, size)
        return dq, dk, dv, None

    ring.defvjp(fwd, bwd)
    return ring


def _hop(axis, size, *xs):
    perm = [(i, (i + 1) % size) for i in range(size)]
    return tuple(None if x is None else jax.lax.ppermute(x, axis, perm) for x in xs)


def _scores(q, k, mask):
    """(B, K, G, Tq, Tk) scaled scores in float32, masked pairs at -1e30."""
    s = jnp.einsum("bqkgh,bskh->bkgqs", q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(q.shape[-1])
    return jnp.where(mask[:, None, None], s, _NEG)


def _block_stats(q, k, v, mask):
    """Running-softmax statistics of q over one K/V block: max (B,K,G,Tq), sum, unnormalised output (B,Tq,K,G,H)."""
    s = _scores(q, k, mask)
    m = jax.lax.stop_gradient(s.max(-1))
    p = jnp.where(mask[:, None, None], jnp.exp(s - m[..., None]), 0.0)
    return m, p.sum(-1), jnp.einsum("bkgqs,bskh->bqkgh", p, v.astype(jnp.float32))


def _merge(a, b):
    (m1, l1, o1), (m2, l2, o2) = a, b
    m = jnp.maximum(m1, m2)
    a1, a2 = jnp.exp(m1 - m), jnp.exp(m2 - m)
    scale = lambda o, s: o * jnp.moveaxis(s, -1, 1)[..., None]  # (B,K,G,T) -> (B,T,K,G,1)
    return m, l1 * a1 + l2 * a2, scale(o1, a1) + scale(o2, a2)


def _half(x, second: bool):
    c = x.shape[1] // 2
    return x[:, c:] if second else x[:, :c]


def _visiting(device, step, size):
    """Whose block device ``device`` holds after ``step`` hops, and whether that device comes earlier in the ring."""
    src = (device - step) % size
    return src, src < device


def _ring_forward(q, k, v, seg, axis, size):
    device, t = jax.lax.axis_index(axis), q.shape[1]
    q_pos = _local_positions(device, t, size)
    stats = _block_stats(q, k, v, _mask(q_pos, q_pos, seg, seg))

    def hop(carry, step):
        k, v, k_seg, stats = carry
        k, v, k_seg = _hop(axis, size, k, v, k_seg)
        src, earlier = _visiting(device, step, size)
        k_pos = _local_positions(src, t, size)
        seg_half = lambda x, second: None if x is None else _half(x, second)

        def from_earlier():  # all queries see the block's first chunk only
            return _block_stats(q, _half(k, False), _half(v, False),
                                _mask(q_pos, k_pos[: t // 2], seg, seg_half(k_seg, False)))

        def from_later():  # only the second query chunk sees the block (all of it)
            m, l, o = _block_stats(_half(q, True), k, v, _mask(q_pos[t // 2:], k_pos, seg_half(seg, True), k_seg))
            pad = lambda x, axis, fill: jnp.concatenate([jnp.full_like(x, fill), x], axis=axis)
            return pad(m, -1, _NEG), pad(l, -1, 0.0), pad(o, 1, 0.0)

        return (k, v, k_seg, _merge(stats, jax.lax.cond(earlier, from_earlier, from_later))), None

    (_, _, _, (m, l, o)), _ = jax.lax.scan(hop, (k, v, seg, stats), jnp.arange(1, size))
    out = o / jnp.moveaxis(l, -1, 1)[..., None]
    return out.astype(q.dtype), m + jnp.log(l)


def _block_grads(q, k, v, mask, d_out, lse, delta):
    """dq, dk, dv of one (query rows, K/V block) pair given the final log-sum-exp and delta = rowsum(dO * O)."""
    s = _scores(q, k, mask)
    p = jnp.where(mask[:, None, None], jnp.exp(s - lse[..., None]), 0.0)
    do = d_out.astype(jnp.float32)
    dv = jnp.einsum("bkgqs,bqkgh->bskh", p, do)
    dp = jnp.einsum("bqkgh,bskh->bkgqs", do, v.astype(jnp.float32))
    ds = p * (dp - delta[..., None]) / math.sqrt(q.shape[-1])
    dq = jnp.einsum("bkgqs,bskh->bqkgh", ds, k.astype(jnp.float32))
    dk = jnp.einsum("bkgqs,bqkgh->bskh", ds, q.astype(jnp.float32))
    return dq, dk, dv


def _ring_backward(q, k, v, seg, out, lse, d_out, axis, size):
    device, t = jax.lax.axis_index(axis), q.shape[1]
    q_pos = _local_positions(device, t, size)
    delta = jnp.einsum("bqkgh,bqkgh->bkgq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    dq, dk, dv = _block_grads(q, k, v, _mask(q_pos, q_pos, seg, seg), d_out, lse, delta)

    def hop(carry, step):
        k, v, k_seg, dk, dv, dq = carry
        k, v, k_seg, dk, dv = _hop(axis, size, k, v, k_seg, dk, dv)  # a block's gradients travel with it
        src, earlier = _visiting(device, step, size)
        k_pos = _local_positions(src, t, size)
        seg_half = lambda x, second: None if x is None else _half(x, second)

        def from_earlier():
            gq, gk, gv = _block_grads(q, _half(k, False), _half(v, False),
                                      _mask(q_pos, k_pos[: t // 2], seg, seg_half(k_seg, False)),
                                      d_out, lse, delta)
            pad = lambda x: jnp.concatenate([x, jnp.zeros_like(x)], axis=1)
            return gq, pad(gk), pad(gv)

        def from_later():
            gq, gk, gv = _block_grads(_half(q, True), k, v, _mask(q_pos[t // 2:], k_pos, seg_half(seg, True), k_seg),
                                      _half(d_out, True), lse[..., t // 2:], delta[..., t // 2:])
            return jnp.concatenate([jnp.zeros_like(gq), gq], axis=1), gk, gv

        gq, gk, gv = jax.lax.cond(earlier, from_earlier, from_later)
        return (k, v, k_seg, dk + gk, dv + gv, dq + gq), None

    (_, _, _, dk, dv, dq), _ = jax.lax.scan(hop, (k, v, seg, dk, dv, dq), jnp.arange(1, size))
    dk, dv = _hop(axis, size, dk, dv)  # the last hop brings each block's gradients home
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
