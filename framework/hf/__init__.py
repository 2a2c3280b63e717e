"""Hugging Face checkpoints <-> meshpilot params: safetensors in and out, no torch.

tables.py     one name table per architecture (Hugging Face tensor -> meshpilot param, transpose, split)
configs.py    config.json <-> ``model.*``: what a config implies, unknown fields named, what export writes
placement.py  tables -> one Placement per param; a device's slice read straight from safetensors
load.py       import: every param created directly in its sharding on the mesh
export.py     host params -> Hugging Face tensors, save_pretrained's file layout (sharded index above 5 GB)
"""
from framework.hf.configs import (TOKEN_IDS, architecture, check_model, hf_config, mismatches, model_fields,
                                  read_hf_config, run_config)
from framework.hf.export import DEFAULT_MAX_SHARD_BYTES, hf_tensors, save
from framework.hf.load import load_params, weight_files
from framework.hf.tables import ARCHITECTURES, arch_of

__all__ = ["ARCHITECTURES", "DEFAULT_MAX_SHARD_BYTES", "TOKEN_IDS", "arch_of", "architecture", "check_model",
           "hf_config", "hf_tensors", "load_params", "mismatches", "model_fields", "read_hf_config", "run_config",
           "save", "weight_files"]
