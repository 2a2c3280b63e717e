"""Data sources: the rows of batch ``position``, as a pure function of (seed, position).

Every source has ``seq_len`` and ``rows(position, row_ids, global_rows)``: the rows
``row_ids`` (of ``global_rows``) of that batch, int32 (rows, seq_len + 1); and ``field_rows``, the
same rows as the batch's fields (``batch_fields``: framework/data/batch.py), here tokens only. Resuming at
position ``p`` replays no batch and skips none, and every process builds its own rows
without talking to the others (framework/data/loader.py assembles them).
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

from framework.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from framework.data.batch import TOKENS
from framework.data.tokens import TokenSource

MAX_CORPUS_BYTES = 16 << 20


def _read_corpus(paths: list[str]) -> np.ndarray:
    """Bytes of the given files/directories (``.py``/``.txt``/``.md`` inside directories), in sorted order.

    Reading stops once MAX_CORPUS_BYTES (16 MiB) are in: the corpus is held in memory.
    """
    if not paths:
        paths = [sysconfig.get_paths()["stdlib"]]  # ships with every Python: no download
    files: list[Path] = []
    for i, p in enumerate(paths):
        path = Path(p)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(sorted(f for f in path.rglob("*") if f.suffix in (".py", ".txt", ".md") and f.is_file()))
        else:
            raise ConfigError(f"data.paths[{i}]={p!r}: no such file or directory")
    chunks, size = [], 0
    for f in files:
        b = f.read_bytes()
        if b"\0" in b[:8192]:  # git's test for binary content
            raise ConfigError(f"data.paths: {f} is not text (a NUL byte in its first 8 KiB); data.source=text trains on text files")
        chunks.append(b)
        size += len(b)
        if size >= MAX_CORPUS_BYTES:
            break
    corpus = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    return corpus


SPLITS = ("train", "eval")
EVAL_STREAM = 1  # seeds the eval split's rows of the synthetic and image sources


def _rng(seed: int, position: int, split: str) -> np.random.Generator:
    """The random stream of batch ``position``; eval rows come from a stream training never draws.

    The eval tag goes last: SeedSequence pads short entropy with zeros, so ``[seed, position]``
    equals ``[seed, position, 0]`` and only a nonzero last word keeps the streams apart.
    """
    return np.random.default_rng([seed, position] if split == "train" else [seed, position, EVAL_STREAM])


class TokensOnly:
    """A source whose batches hold tokens only: no documents, no loss mask."""

    batch_fields = (TOKENS,)

    def field_rows(self, position: int, row_ids: np.ndarray, global_rows: int) -> dict[str, np.ndarray]:
        return {TOKENS: self.rows(position, row_ids, global_rows)}


class TextSource(TokensOnly):
    """Byte-level tokens (vocab 256) from local text; windows drawn at seeded random offsets.

    The corpus is split once: train windows lie in its first ``1 - data.eval_fraction``,
    eval windows in the rest, so evaluation measures text training never saw.
    """

    def __init__(self, cfg: DataConfig, seq_len: int, vocab_size: int, split: str = "train"):
        if vocab_size < 256:
            raise ConfigError(f"model.vocab_size={vocab_size}: data.source=text needs at least 256 (bytes)")
        corpus = _read_corpus(cfg.paths)
        self.seed, self.seq_len, self.split = cfg.seed, seq_len, split
        if len(corpus) < seq_len + 2:
            raise ConfigError(f"data.paths: corpus has {len(corpus)} bytes, need more than train.seq_len={seq_len}")
        boundary = int(len(corpus) * (1 - cfg.eval_fraction))
        self.corpus = corpus[:boundary] if split == "train" else corpus[boundary:]
        if len(self.corpus) < seq_len + 2:
            raise ConfigError(f"data.eval_fraction={cfg.eval_fraction}: the {split} split of the {len(corpus)}-byte corpus "
                              f"has {len(self.corpus)} bytes, need more than train.seq_len+1={seq_len + 1}")

    def rows(self, position: int, row_ids: np.ndarray, global_rows: int) -> np.ndarray:
        rng = _rng(self.seed, position, self.split)
        starts = rng.integers(0, len(self.corpus) - self.seq_len - 1, size=global_rows)[row_ids]
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        return self.corpus[idx].astype(np.int32)


class SyntheticSource(TokensOnly):
    """Learnable synthetic tokens: arithmetic sequences with a random start and stride per row."""

    def __init__(self, cfg: DataConfig, seq_len: int, vocab_size: int, split: str = "train"):
        self.seed, self.seq_len, self.vocab, self.split = cfg.seed, seq_len, vocab_size, split

    def rows(self, position: int, row_ids: np.ndarray, global_rows: int) -> np.ndarray:
        rng = _rng(self.seed, position, self.split)
        start = rng.integers(0, self.vocab, size=global_rows)[row_ids]
        stride = rng.integers(1, 4, size=global_rows)[row_ids]
        t = np.arange(self.seq_len + 1)[None, :]
        return ((start[:, None] + stride[:, None] * t) % self.vocab).astype(np.int32)


class ImageSource(TokensOnly):
    """Synthetic 10-class images for the CNN: a fixed random blob pattern per class plus pixel noise.

    No image set ships with the installed packages (scikit-learn's digits would need a new
    dependency), so this one is synthetic but learnable. A row is ``size*size*channels``
    pixel values in 0..16 followed by the label; ``train.seq_len`` must equal the pixel count.
    """

    CLASSES = 10

    def __init__(self, cfg: DataConfig, seq_len: int, model, split: str = "train"):
        pixels = model.image_size ** 2 * model.image_channels
        if seq_len != pixels:
            raise ConfigError(f"train.seq_len={seq_len}: data.source=images needs the pixel count {pixels} "
                              f"(model.image_size**2 * model.image_channels)")
        if model.num_classes < self.CLASSES:
            raise ConfigError(f"model.num_classes={model.num_classes}: data.source=images has {self.CLASSES} classes")
        self.seed, self.seq_len, self.split = cfg.seed, seq_len, split
        self.templates = (np.random.default_rng([cfg.seed, 10_007]).random((self.CLASSES, pixels)) < 0.35) * 12.0

    def rows(self, position: int, row_ids: np.ndarray, global_rows: int) -> np.ndarray:
        rng = _rng(self.seed, position, self.split)
        labels = rng.integers(0, self.CLASSES, size=global_rows)
        noise = rng.normal(0.0, 3.0, size=(global_rows, self.seq_len))
        pixels = np.clip(np.round(self.templates[labels] + noise), 0, 16)
        return np.concatenate([pixels, labels[:, None]], axis=1)[row_ids].astype(np.int32)


SOURCES = {"text": TextSource, "synthetic": SyntheticSource, "tokens": TokenSource}


def make_source(data: DataConfig, train: TrainConfig, vocab_size: int, model: ModelConfig | None = None,
                split: str = "train"):
    """The source of ``split``: "train" or "eval" (held-out rows, disjoint from training's)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    if data.source == "images":  # image shape comes from the model section
        return ImageSource(data, train.seq_len, model or ModelConfig(), split)
    return SOURCES[data.source](data, train.seq_len, vocab_size, split)
