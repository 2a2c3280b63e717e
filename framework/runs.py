"""A run directory read back for use after training: its config, a step's params on a mesh, its tokenizer.

Used by scripts/hf.py export and scripts/generate.py. Tokenizer of a run, first found wins:
``RUN/tokenizer.json`` (copied there by ``scripts/hf.py import``), ``<data.path>/tokenizer.json`` for
``data.source: tokens`` (its ``metadata.json`` gives ``eos_id``), bytes for ``data.source: text``.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax

from framework import sharding
from framework.checkpoint import Checkpointer, abstract_target
from framework.config import Config, ConfigError, load_config
from framework.data.store import TOKENIZER_FILE, read_metadata
from framework.state import AbstractState, abstract_state

HF_CONFIG = "hf_config.json"  # the config.json a run was imported from (scripts/hf.py import)


def load_run_config(run_dir: str | Path, overrides=()) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--run-dir {run_dir}: no config.yaml (not a meshpilot run dir)")
    return load_config(path, overrides)


def restore_params(cfg: Config, run_dir: str | Path, step: int | None, mesh) -> tuple[dict, AbstractState, int]:
    """The params of ``step`` (None: the newest good one), restored straight into the mesh's shardings."""
    ck = Checkpointer.for_run(cfg.checkpoint, run_dir)
    try:
        good = ck.latest_good_step()
        if good is None:
            raise ConfigError(f"--run-dir {run_dir}: no checkpoint in {ck.directory}")
        step = good if step is None else step
        if not (ck.directory / str(step)).is_dir():
            raise ConfigError(f"--step {step}: no such checkpoint in {ck.directory}")
        abstract = abstract_state(cfg, dict(zip(mesh.axis_names, mesh.axis_sizes)))
        state = ck.restore(step, abstract_target(abstract.shapes, sharding.named(mesh, abstract.specs)))
    finally:
        ck.close()
    return state.params, abstract, step


def tokenizer_file(run_dir: str | Path, cfg: Config) -> Path | None:
    own = Path(run_dir) / TOKENIZER_FILE
    if own.is_file():
        return own
    if cfg.data.source == "tokens":  # data.path: the tokenized data set (scripts/prepare_data.py)
        read_metadata(cfg.data.path)  # the tokenizer is there and is the one that made the tokens
        return Path(cfg.data.path) / TOKENIZER_FILE
    return None


def token_ids(run_dir: str | Path, cfg: Config) -> dict:
    """Special token ids as config.json names them (``eos_token_id``...): the imported model's, or the data's EOS."""
    imported = Path(run_dir) / HF_CONFIG
    if imported.is_file():
        hf = json.loads(imported.read_text())
        return {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
    if cfg.data.source == "tokens":
        return {"eos_token_id": read_metadata(cfg.data.path)["eos_id"]}
    return {}


def gather(params) -> dict:
    """Full host copies of (possibly multi-process) sharded params, on every process."""
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True) if not x.is_fully_addressable
                        else jax.device_get(x), params)
