"""Small shared builders for tests (configs, subprocess runs of the scripts)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_lm.yaml")
# tiny_lm cut to the size a test of behaviour needs (about 8x less compute); heads and MLP still divide by 8
SMALLER = ["model.n_layers=2", "model.d_model=64", "model.d_mlp=256", "train.seq_len=32", "model.max_seq_len=32"]


def tiny_config(*overrides: str, steps: int = 5):
    from framework.config import load_config

    # broadcast.mode=none: the tests built on this check parameter layouts, memory figures and programs of
    # XLA's own propagation; tiny_lm ships auto, which the broadcast tests and test_mesh_equivalence ask for
    return load_config(TINY, [f"train.steps={steps}", "logging.progress=false", "logging.tensorboard=false",
                              "broadcast.mode=none", *overrides])


def run_script(script: str, *args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run scripts/<script> in a fresh interpreter; returns the completed process (text output)."""
    full_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=full_env,
    )
