"""Training data: sources, the token store and its preparation, global batch assembly.

  sources.py    bytes of local text, synthetic sequences, synthetic images; ``make_source``
  store.py      the token store on disk: format, writer, reader (positional reads, never whole)
  tokens.py     the grain pipeline of a token store's training windows (``data.source: tokens``)
  tokenizer.py  Hugging Face ``tokenizers``: load a tokenizer.json, or train a byte-level BPE
  prepare.py    documents -> tokens -> shards + metadata.json (scripts/prepare_data.py)
  loader.py     BatchLoader (a process's rows -> global jax.Arrays) and Prefetcher (grain)
  batch.py      what a batch holds (tokens, segment_ids, positions, loss_mask), ``data.packing``, ``batch_fields``
  sft.py        prompt/completion and chat-message jsonl -> tokens and a loss mask (prepare_data.py --sft)

Names are imported on first use (PEP 562), so scripts/prepare_data.py loads neither jax nor grain.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "BatchLoader": "loader", "Prefetcher": "loader",
    "make_source": "sources", "SPLITS": "sources", "TextSource": "sources", "SyntheticSource": "sources",
    "ImageSource": "sources", "TokenSource": "tokens", "TokenStore": "store", "batch_fields": "batch",
    "packing_of": "batch",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
