"""Compressed kernel gathers: bf16 or int8 (one scale per output channel) on the wire, float on arrival."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _quantize_int8(w, out_axis: int):
    """Symmetric int8 with one scale per output channel (reduced over the input dimensions)."""
    reduce_axes = tuple(range(out_axis))
    scale = jnp.max(jnp.abs(w), axis=reduce_axes) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale).astype(jnp.float32)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return q, scale


def gather_kernel(w, axes, out_axis: int, compress: str):
    """All-gather a kernel split by output channel; compressed on the wire, float again on arrival.

    The backward pass reduce-scatters the float gradient (straight-through: the gradient of
    the dequantised kernel is the gradient of the stored one).
    """
    if compress == "none":
        return jax.lax.all_gather(w, axes, axis=out_axis, tiled=True)

    @jax.custom_vjp
    def gather(w):
        if compress == "bf16":  # sent as raw 16-bit words, so XLA cannot hoist the cast past the gather
            bits = jax.lax.bitcast_convert_type(w.astype(jnp.bfloat16), jnp.uint16)
            bits = jax.lax.all_gather(bits, axes, axis=out_axis, tiled=True)
            return jax.lax.bitcast_convert_type(bits, jnp.bfloat16).astype(w.dtype)
        q, scale = _quantize_int8(w, out_axis)
        q = jax.lax.all_gather(q, axes, axis=out_axis, tiled=True)
        scale = jax.lax.all_gather(scale, axes, axis=0, tiled=True)
        return (q.astype(jnp.float32) * scale).astype(w.dtype)

    def fwd(w):
        return gather(w), None

    def bwd(_, g):
        return (jax.lax.psum_scatter(g, axes, scatter_dimension=out_axis, tiled=True),)

    gather.defvjp(fwd, bwd)
    return gather(w)
