"""What a batch holds: a dict of same-shaped int32 arrays, (grad_accum, micro_batch, seq_len + 1) each.

  tokens       token ids (every source; ``images``: a row's pixel values, then its label)
  segment_ids  ``data.packing: eos``: 1, 2, ... per document within a row; the token after an EOS starts
               the next one. Attention never crosses a segment (causal within each).
  positions    ``data.packing: eos``: a token's position in its document (0 at each document's first
               token; a row that starts inside a document counts from the row's start). RoPE and learned
               position embeddings read it.
  loss_mask    a token store written with ``--sft``: 1 where the token is a target (completion or assistant
               tokens and the EOS after them), 0 elsewhere.

Every field spans the whole ``seq_len + 1`` window, so one ``jax.tree.map`` reshapes, shards or slices them
all: the model reads ``[..., :-1]`` (inputs), the loss ``[..., 1:]`` (targets). Input ``i`` is trained on
when target ``i + 1`` is in the same segment as ``i`` (not the first token of the next document) and,
with a loss mask, is marked 1 (framework/train/objective.py). Without packing and a mask every target counts,
and the batch is ``{"tokens": ...}`` alone.
"""
from __future__ import annotations

import numpy as np

from framework.config import ConfigError, DataConfig

TOKENS, SEGMENT_IDS, POSITIONS, LOSS_MASK = "tokens", "segment_ids", "positions", "loss_mask"


def packing_of(data: DataConfig) -> str:
    """``data.packing`` resolved: ``eos`` or ``none`` (``auto``: eos for a token store, none for other sources)."""
    if data.packing == "auto":
        return "eos" if data.source == "tokens" else "none"
    return data.packing


def batch_fields(data: DataConfig) -> tuple[str, ...]:
    """The fields of the batches of ``data``: a token store's loss mask is read from its metadata.json."""
    fields = [TOKENS]
    if packing_of(data) == "eos":
        fields += [SEGMENT_IDS, POSITIONS]
    if data.source == "tokens" and data.path:
        from framework.data.store import read_metadata

        try:
            if read_metadata(data.path).get(LOSS_MASK):
                fields.append(LOSS_MASK)
        except ConfigError:  # a missing or damaged store: the token source says so when it opens it
            pass
    return tuple(fields)


def eos_segments(tokens: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids and in-document positions of (rows, length) token windows whose documents each end with ``eos_id``."""
    starts = np.zeros(tokens.shape, bool)
    starts[:, 0] = True
    starts[:, 1:] = tokens[:, :-1] == eos_id
    segment_ids = np.cumsum(starts, axis=1, dtype=np.int32)
    index = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return segment_ids, positions.astype(np.int32)
