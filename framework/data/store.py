"""The token store on disk: its format, the writer (prepare.py feeds it) and the reader.

A store is a directory: ``metadata.json``, the ``tokenizer.json`` that made the tokens, and
per split (train, eval) flat shards of uint16 (vocab <= 65536) or uint32 token ids
(``train-00000.bin`` ...) that together are one stream with an EOS id after every document. A store
written for supervised fine-tuning (``metadata.json`` ``"loss_mask": true``) has beside each shard its loss
mask, one uint8 per token (``train-00000.mask.bin``: 1 where the token is a target).
Reads are positional (``os.preadv`` into the caller's array, framework/fileio.py): opening costs a few
stat calls whatever the size, and no page of a shard becomes this process's memory (as a memory map's
touched pages would), so resident memory stays flat however much of the store training reads.
"""
from __future__ import annotations

import hashlib
import json
import os
from bisect import bisect_right
from pathlib import Path

import numpy as np

from framework.config import TOKEN_METADATA, ConfigError
from framework.fileio import atomic_write, read_into

TOKENIZER_FILE = "tokenizer.json"
DTYPES = ("uint16", "uint32")
SHARD_TOKENS = 1 << 28  # tokens per shard file (512 MiB of uint16)
FORMAT = "meshpilot token store"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def mask_name(shard_file: str) -> str:
    """The loss mask file beside a token shard."""
    return shard_file.removesuffix(".bin") + ".mask.bin"


def check_out(out: str | Path) -> None:
    p = Path(out)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not an empty directory")


class StoreWriter:
    """Writes a token store: shards as tokens arrive, ``tokenizer.json`` first and ``metadata.json``
    last, so a directory with metadata.json holds a complete store."""

    def __init__(self, out: str | Path, tokenizer_json: str, vocab_size: int, eos_id: int,
                 shard_tokens: int = SHARD_TOKENS, loss_mask: bool = False):
        self.out = Path(out)
        check_out(out)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
        self.vocab_size, self.eos_id, self.shard_tokens = vocab_size, eos_id, shard_tokens
        self.dtype = np.dtype(DTYPES[0] if vocab_size <= 1 << 16 else DTYPES[1])
        self.shards: dict[str, list[dict]] = {"train": [], "eval": []}
        self.documents = {"train": 0, "eval": 0}
        self.loss_mask = loss_mask
        self._open: dict = {}  # split -> the open files of its last shard (tokens, and the mask)

    def write(self, split: str, tokens: np.ndarray, documents: int = 0, mask: np.ndarray | None = None) -> None:
        """Append ``tokens`` (and, in a loss-mask store, their ``mask``: 1 for targets) to ``split``."""
        tokens = np.asarray(tokens).astype(self.dtype, copy=False)
        if (mask is None) == self.loss_mask or (mask is not None and len(mask) != len(tokens)):
            raise ValueError("StoreWriter.write: a loss-mask store takes one mask value per token, any other none")
        mask = None if mask is None else np.asarray(mask).astype(np.uint8, copy=False)
        self.documents[split] += documents
        while len(tokens):
            shards = self.shards[split]
            if not shards or shards[-1]["tokens"] == self.shard_tokens:
                for f in self._open.pop(split, ()):
                    f.close()
                shards.append({"file": shard_name(split, len(shards)), "tokens": 0})
                files = [shards[-1]["file"]] + ([mask_name(shards[-1]["file"])] if self.loss_mask else [])
                self._open[split] = [open(self.out / f, "wb") for f in files]
            n = min(len(tokens), self.shard_tokens - shards[-1]["tokens"])
            for f, part in zip(self._open[split], (tokens, mask)):
                f.write(part[:n].tobytes())
            shards[-1]["tokens"] += n
            tokens, mask = tokens[n:], None if mask is None else mask[n:]

    def finish(self, **extra) -> dict:
        for files in self._open.values():
            for f in files:
                f.close()
        self._open.clear()
        if self.loss_mask:
            extra["loss_mask"] = True
        meta = {
            "format": FORMAT,
            "tokenizer_sha256": sha256_file(self.out / TOKENIZER_FILE),
            "vocab_size": self.vocab_size, "eos_id": self.eos_id, "dtype": self.dtype.name,
            "tokens": {split: sum(s["tokens"] for s in shards) for split, shards in self.shards.items()},
            "documents": self.documents, "shards": self.shards, **extra,
        }
        atomic_write(self.out / TOKEN_METADATA, json.dumps(meta, indent=1))
        return meta


class TokenStore:
    """One split of a token store, its shards read as one stream by position, never loaded whole."""

    def __init__(self, path: str | Path, split: str):
        self.path, self.split, self.fds = Path(path), split, []
        self.meta = read_metadata(self.path)
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size, self.eos_id = self.meta["vocab_size"], self.meta["eos_id"]
        shards = self.meta["shards"].get(split, [])
        self.has_mask = bool(self.meta.get("loss_mask"))
        self.mask_fds: list[int] = []
        sizes = []
        for shard in shards:
            self.fds.append(self._open(shard["file"], shard["tokens"] * self.dtype.itemsize))
            if self.has_mask:
                self.mask_fds.append(self._open(mask_name(shard["file"]), shard["tokens"]))
            sizes.append(shard["tokens"])
        self.sizes = sizes
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()  # shard k holds [offsets[k], offsets[k+1])
        self.tokens = self.offsets[-1]

    def _open(self, name: str, want: int) -> int:
        f = self.path / name
        have = f.stat().st_size if f.is_file() else None
        if have != want:
            self.close()
            state = "is missing" if have is None else f"has {have} bytes"
            raise ConfigError(f"data.path={self.path}: shard {name} {state}, metadata.json says {want} "
                              f"(an unfinished or damaged token store; prepare it again)")
        return os.open(f, os.O_RDONLY)

    def read(self, start: int, length: int, out: np.ndarray | None = None, mask: bool = False) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the stream (across shard ends), read straight into
        ``out`` (contiguous, the store's dtype) if given; ``mask``: their loss mask (uint8) instead."""
        if start < 0 or start + length > self.tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside the {self.split} split's {self.tokens}")
        fds, dtype = (self.mask_fds, np.dtype(np.uint8)) if mask else (self.fds, self.dtype)
        out = np.empty(length, dtype) if out is None else out
        done = 0
        while done < length:
            k = bisect_right(self.offsets, start + done) - 1
            local = start + done - self.offsets[k]
            n = min(length - done, self.sizes[k] - local)
            name = self.meta["shards"][self.split][k]["file"]
            read_into(fds[k], out[done:done + n], local * dtype.itemsize, self.path / (mask_name(name) if mask else name))
            done += n
        return out

    def close(self) -> None:
        for fd in self.fds + getattr(self, "mask_fds", []):
            os.close(fd)
        self.fds, self.mask_fds = [], []

    def __del__(self):
        self.close()


def read_metadata(path: str | Path) -> dict:
    """The store's metadata.json, checked for the keys readers rely on, and its tokenizer's hash."""
    path = Path(path)
    meta_file = path / TOKEN_METADATA
    if not meta_file.is_file():
        raise ConfigError(f"data.path={path}: no {TOKEN_METADATA} (write a token store with scripts/prepare_data.py)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"data.path={path}: {TOKEN_METADATA} is not valid JSON") from None
    missing = [k for k in ("vocab_size", "eos_id", "dtype", "tokenizer_sha256", "tokens", "shards") if k not in meta]
    if missing:
        raise ConfigError(f"data.path={path}: {TOKEN_METADATA} lacks {', '.join(missing)}")
    if meta["dtype"] not in DTYPES:
        raise ConfigError(f"data.path={path}: {TOKEN_METADATA} dtype={meta['dtype']!r}: expected one of {', '.join(DTYPES)}")
    tokenizer = path / TOKENIZER_FILE
    if not tokenizer.is_file() or sha256_file(tokenizer) != meta["tokenizer_sha256"]:
        raise ConfigError(f"data.path={path}: {TOKENIZER_FILE} is missing or is not the tokenizer that made these "
                          f"tokens (sha256 differs from {TOKEN_METADATA})")
    return meta
