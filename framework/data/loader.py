"""From a source's rows to global batches: each process builds the rows its devices hold.

A batch is a dict of fields (framework/data/batch.py: tokens, and segment ids, positions, a loss mask
where the source has them), each (grad_accum, micro_batch, seq_len + 1): micro-batches are the leading
axis so each one is spread over all data-parallel devices. Row r of micro-batch a is
global row a*M + r of the batch's position, whatever the mesh or the number of processes,
so a global batch stays a pure function of (seed, position).
"""
from __future__ import annotations

import sys

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding


class BatchLoader:
    """Builds this process's rows of batch ``position`` and assembles the global jax.Array.

    ``sharding`` is the NamedSharding of each (accum, micro, seq+1) field; the rows a process
    builds are those its addressable devices hold, so the same code runs on one host or many.
    ``fields``: the batch's keys (the source's ``batch_fields``).
    """

    def __init__(self, source, global_batch: int, grad_accum: int, sharding: NamedSharding):
        self.source, self.sharding = source, sharding
        self.global_shape = (grad_accum, global_batch // grad_accum, source.seq_len + 1)
        index_map = sharding.addressable_devices_indices_map(self.global_shape)
        lo = min(idx[1].start or 0 for idx in index_map.values())
        hi = max(idx[1].stop or self.global_shape[1] for idx in index_map.values())
        self.micro_rows = slice(lo, hi)
        self.fields = tuple(source.batch_fields)

    def host_batch(self, position: int) -> dict[str, np.ndarray]:
        """This process's part: (accum, local micro rows, seq+1) per field; row r of micro-batch a is global row a*M + r."""
        accum, micro, _ = self.global_shape
        local = np.arange(self.micro_rows.start, self.micro_rows.stop)
        row_ids = (np.arange(accum)[:, None] * micro + local[None, :]).reshape(-1)
        rows = self.source.field_rows(position, row_ids, accum * micro)
        return {k: rows[k].reshape(accum, len(local), -1) for k in self.fields}

    def to_global(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.sharding, x, self.global_shape), host)

    def batch(self, position: int) -> dict[str, jax.Array]:
        return self.to_global(self.host_batch(position))


class Prefetcher:
    """This process's batches for positions ``start, start+1, ...``, built ahead by grain's prefetch.

    The positions are a grain ``MapDataset`` mapped through ``loader.host_batch``; grain's read
    threads build up to ``depth`` of them ahead, in order, while the step runs (0: each batch is
    built when asked). An error building a batch surfaces at ``next()``.
    """

    def __init__(self, loader: BatchLoader, start: int, depth: int = 2):
        self.loader, self.next_pos = loader, start
        positions = grain.MapDataset.range(start, sys.maxsize).map(loader.host_batch)
        options = grain.ReadOptions(num_threads=depth, prefetch_buffer_size=depth)
        self._batches = iter(positions.to_iter_dataset(options))

    def next(self) -> tuple[int, dict[str, jax.Array]]:
        host = next(self._batches)
        pos, self.next_pos = self.next_pos, self.next_pos + 1
        return pos, self.loader.to_global(host)

    def close(self) -> None:
        self._batches.close()
