"""Attention masks for packed documents (segment ids), shared by the model's attention, its KV-cache decode and
context-parallel attention (models/context.py computes blocks of queries against blocks of keys).

A segment id says which document of its row a token belongs to (framework/data/batch.py). A query attends to a
key when both are in the same segment and the key is not later than the query. ``jax.nn.dot_product_attention``
takes no segment ids in this jax (only sequence lengths, which describe one document per row), so segments reach
every implementation as its boolean ``mask`` with ``is_causal=True``: the ``xla`` implementation applies both,
``cudnn`` takes the mask as a bias and keeps its causal kernel.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def block_mask(q_index, kv_index, q_segment_ids=None, kv_segment_ids=None):
    """(B or 1, 1, Tq, Tk) bool: query ``i`` (row position ``q_index[i]``) sees key ``j`` when ``kv_index[j] <=
    q_index[i]`` and, with segment ids ((B, Tq) and (B, Tk)), both are in the same segment. Blocks of a longer
    sequence pass their global positions as the indices (ring attention, a KV cache)."""
    mask = (kv_index[None, :] <= q_index[:, None])[None, None]
    if q_segment_ids is not None:
        mask = mask & segment_mask(q_segment_ids, kv_segment_ids)
    return mask


def segment_mask(q_segment_ids, kv_segment_ids):
    """(B, 1, Tq, Tk) bool: query and key in the same segment."""
    return (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]


def causal_attention(q, k, v, segment_ids=None, implementation=None):
    """Causal self-attention of (B, T, N, H) queries over (B, T, K, H) keys and values (GQA when K < N),
    kept within segments when ``segment_ids`` (B, T) is given."""
    mask = None if segment_ids is None else segment_mask(segment_ids, segment_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)


def cached_attention(q, cache_k, cache_v, q_index, q_segment_ids=None, cache_segment_ids=None):
    """Queries at row positions ``q_index`` (T,) over a KV cache of (B, S, K, H): causal over the cache and, with
    segment ids ((B, T) and (B, S)), within the query's segment."""
    visible = block_mask(q_index, jnp.arange(cache_k.shape[1]), q_segment_ids, cache_segment_ids)
    return jax.nn.dot_product_attention(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), mask=visible,
                                        implementation="xla")
