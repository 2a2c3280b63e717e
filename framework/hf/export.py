"""Export: full host params -> Hugging Face tensors, written as ``save_pretrained`` writes them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from framework.config import ModelConfig
from framework.fileio import atomic_path, atomic_write
from framework.hf.placement import flatten, plan

DEFAULT_MAX_SHARD_BYTES = 5 << 30  # transformers' save_pretrained default max_shard_size ("5GB")


def hf_tensors(params: dict, m: ModelConfig, logical_axes: dict) -> dict[str, np.ndarray]:
    """Full host params (numpy) -> Hugging Face tensors, in table order (reshape, transpose, fuse)."""
    flat = flatten(params)
    pieces: dict[str, dict[int, np.ndarray]] = {}
    placements = plan(m, flat, flatten(logical_axes))
    for path, p in placements.items():
        param = np.asarray(flat[path])
        for at in np.ndindex(p.names.shape):  # one Hugging Face tensor per layer / expert of a stacked param
            name, merged = p.names[at], param[at].reshape(p.merged_shape)
            pieces.setdefault(name, {})[p.rule.part] = merged.T if p.rule.transpose else merged
    out = {}
    for name, parts in pieces.items():
        x = np.concatenate([parts[k] for k in sorted(parts)], axis=-1) if len(parts) > 1 else parts[0]
        if x.dtype.name not in ("float32", "float16", "float64"):
            x = x.astype(np.float32)  # bfloat16: safetensors' numpy writer has no BF16; float32 holds it exactly
        out[name] = np.ascontiguousarray(x)
    return out


def save(tensors: dict[str, np.ndarray], config: dict, out_dir: str | Path,
         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer: str | Path | None = None) -> list[Path]:
    """Write config.json and safetensors as ``save_pretrained`` does: one model.safetensors, or
    model-0000k-of-0000n.safetensors plus model.safetensors.index.json above ``max_shard_bytes``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in tensors.items():
        if shards[-1] and size + x.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    # Crash-safe order: an earlier save's index goes first and the new one comes last, each file renamed into
    # place complete (fileio), so a killed save leaves no index naming shards that are missing or half new.
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    if len(shards) == 1:
        files = [out / "model.safetensors"]
    else:
        files = [out / f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for f, shard in zip(files, shards):
        with atomic_path(f) as tmp:
            save_file(shard, str(tmp), metadata=meta)
    atomic_write(out / "config.json", json.dumps(config, indent=2))
    if tokenizer is not None:
        with atomic_path(out / "tokenizer.json") as tmp:
            shutil.copyfile(tokenizer, tmp)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())},
                 "weight_map": {name: f.name for f, shard in zip(files, shards) for name in shard}}
        atomic_write(out / "model.safetensors.index.json", json.dumps(index, indent=2))
    return files
