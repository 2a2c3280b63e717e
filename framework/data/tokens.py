"""The grain pipeline of a token store's training windows (``data.source: tokens``).

Training windows are ``seq_len + 1`` tokens starting at multiples of ``seq_len`` in the split's
stream (consecutive windows share one token; a window may span documents, separated by EOS).
Which window is element ``k`` of the training stream is grain's seeded sampler:
``MapDataset.range(windows).shuffle(seed).repeat()``, a pure function of (seed, k) in which
epoch ``e = k // windows`` visits every window once, in an order seeded by ``seed + e``. Row
``r`` of the global batch at ``position`` is element ``position * global_rows + r``, so any
process builds any row, and resume, remeshing or another process count reads the same rows.
``TokenWindows`` is a grain random-access source (``grain.MapDataset.source(windows)`` works);
the loader reads it directly, one batched call per batch, because grain's per-read metrics in
``SourceMapDataset`` cost more than the read itself (about 1.5x the loader's CPU time, measured).

``field_rows`` adds the fields of framework/data/batch.py: segment ids and positions from the EOS tokens
(``data.packing: eos``, the default for a store), and a fine-tuning store's loss mask, read beside the tokens.
"""
from __future__ import annotations

import grain
import numpy as np

from framework.config import ConfigError, DataConfig
from framework.data.batch import (
    LOSS_MASK,
    POSITIONS,
    SEGMENT_IDS,
    TOKENS,
    eos_segments,
    packing_of,
)
from framework.data.store import TokenStore


class TokenWindows:
    """Window ``i``: tokens ``[i*seq_len, i*seq_len + seq_len + 1)`` of a split, int32; a grain random-access source."""

    def __init__(self, store: TokenStore, seq_len: int):
        self.store, self.seq_len = store, seq_len
        self.length = max((store.tokens - 1) // seq_len, 0)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> np.ndarray:
        return self.read([index])[0]

    def read(self, indices, mask: bool = False) -> np.ndarray:
        """Windows ``indices`` as one (len(indices), seq_len + 1) int32 array; each row read straight from its shard
        (``mask``: the windows of the store's loss mask)."""
        out = np.empty((len(indices), self.seq_len + 1), np.uint8 if mask else self.store.dtype)
        for row, i in zip(out, indices):
            self.store.read(int(i) * self.seq_len, self.seq_len + 1, out=row, mask=mask)
        return out.astype(np.int32)

    def __repr__(self) -> str:
        return f"TokenWindows({self.store.path}, {self.store.split}, seq_len={self.seq_len})"


class TokenSource:
    """``data.source: tokens``: shuffled training windows of the store at ``data.path`` (see the module doc)."""

    def __init__(self, cfg: DataConfig, seq_len: int, vocab_size: int, split: str = "train"):
        if not cfg.path:
            raise ConfigError("data.path is empty: data.source=tokens needs a token store (scripts/prepare_data.py --out DIR)")
        if not 0 <= cfg.seed < 2**32:  # grain's shuffle seed
            raise ConfigError(f"data.seed={cfg.seed}: data.source=tokens needs 0 <= data.seed < 2**32")
        self.store = TokenStore(cfg.path, split)
        if not isinstance(vocab_size, int) or vocab_size < self.store.vocab_size:
            raise ConfigError(f"model.vocab_size={vocab_size}: the token store at data.path={cfg.path} has vocab "
                              f"{self.store.vocab_size}; use at least that, or auto")
        self.seq_len, self.split = seq_len, split
        self.windows = TokenWindows(self.store, seq_len)
        if len(self.windows) == 0:
            raise ConfigError(f"data.path={cfg.path}: the {split} split has {self.store.tokens} tokens, need at least "
                              f"train.seq_len+1={seq_len + 1}" + (" (prepare it with a larger --eval-fraction, or set "
                                                                  "train.eval_every=0)" if split == "eval" else ""))
        self.order = grain.MapDataset.range(len(self.windows)).shuffle(seed=cfg.seed).repeat()  # element -> window
        self.packed = packing_of(cfg) == "eos"
        self.batch_fields = ((TOKENS,) + ((SEGMENT_IDS, POSITIONS) if self.packed else ())
                             + ((LOSS_MASK,) if self.store.has_mask else ()))

    def _windows(self, position: int, row_ids: np.ndarray, global_rows: int) -> list[int]:
        elements = position * global_rows + np.asarray(row_ids, dtype=np.int64)
        # grain's batched access (_getitems, what its own batching calls): one call for this process's rows
        return self.order._getitems(elements.tolist())

    def rows(self, position: int, row_ids: np.ndarray, global_rows: int) -> np.ndarray:
        return self.windows.read(self._windows(position, row_ids, global_rows))

    def field_rows(self, position: int, row_ids: np.ndarray, global_rows: int) -> dict[str, np.ndarray]:
        """The rows as the batch's fields (framework/data/batch.py)."""
        windows = self._windows(position, row_ids, global_rows)
        out = {TOKENS: self.windows.read(windows)}
        if self.packed:
            out[SEGMENT_IDS], out[POSITIONS] = eos_segments(out[TOKENS], self.store.eos_id)
        if self.store.has_mask:
            out[LOSS_MASK] = self.windows.read(windows, mask=True)
        return out
