"""Import: a Hugging Face model dir's safetensors -> meshpilot params, each created in its sharding."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from safetensors import safe_open

from framework.config import ConfigError, ModelConfig
from framework.hf.configs import check_model, effective
from framework.hf.placement import flatten, place, plan, unflatten
from framework.hf.tables import IGNORED_SUFFIXES, arch_of


def weight_files(hf_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or a sharded index)."""
    d = Path(hf_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError):
            raise ConfigError(f"{index}: expected JSON with a 'weight_map'") from None
        return {name: d / file for name, file in weight_map.items()}
    single = d / "model.safetensors"
    if single.is_file():
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    raise ConfigError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json "
                      "(pytorch_model.bin is not read: save the model with safe_serialization)")


def load_params(hf_dir: str | Path, m: ModelConfig, shapes: dict, logical_axes: dict, shardings: dict) -> dict:
    """The model's params read from ``hf_dir``, each created directly in its sharding.

    ``shapes``/``logical_axes``/``shardings``: the abstract params' trees (framework.state). Each
    local device's callback reads only its own slice from disk; replicated slices are read once.
    """
    check_model(m, hf_dir)
    flat_shapes, flat_shardings = flatten(shapes), flatten(shardings)
    placements = plan(m, flat_shapes, flatten(logical_axes))
    files = weight_files(hf_dir)

    def resolve(name: str) -> str:  # the hub's GPT-2 files name tensors without "transformer."
        bare = name.removeprefix("transformer.")
        return name if name in files or bare not in files else bare

    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def tensor(name: str):
            path = files[resolve(name)]
            if path not in handles:
                if not path.is_file():
                    raise ConfigError(f"{path}: listed in model.safetensors.index.json but missing")
                handles[path] = stack.enter_context(safe_open(path, framework="numpy"))
            return handles[path].get_slice(resolve(name))

        _check_tensors(hf_dir, m, placements, files, resolve, tensor)
        out = {path: place(p, tensor, flat_shapes[path], flat_shardings[path]) for path, p in placements.items()}
    return unflatten(out)


def _check_tensors(hf_dir, m: ModelConfig, placements, files, resolve, tensor) -> None:
    used = set()
    for p in placements.values():
        for name in p.names.flat:
            if resolve(name) not in files:
                raise ConfigError(f"{hf_dir}: tensor {name} missing (needed for the {m.style} model's {p.rule.path})")
            shape = tuple(tensor(name).get_shape())
            if shape != p.hf_shape:
                raise ConfigError(f"{hf_dir}: tensor {name} has shape {list(shape)}, expected {list(p.hf_shape)}")
            used.add(resolve(name))
    tied_head = {"lm_head.weight"} if effective(m)["tie_embeddings"] else set()  # some tied checkpoints store it too
    extra = sorted(n for n in set(files) - used - tied_head if not n.endswith(IGNORED_SUFFIXES))
    if extra:
        raise ConfigError(f"{hf_dir}: {len(extra)} tensors the {arch_of(m)} layout does not have, e.g. {extra[:3]}")
