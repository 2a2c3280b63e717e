"""Broadcast plans with bfloat16 compute compile on XLA:CPU (they used to abort its compiler).

A shard_map left automatic on the mesh's size-1 axes put a ``copy`` at the root of each bf16
reduce-scatter's reducer, and XLA:CPU's AllReducePromotion aborted the whole process on it
("Invalid binary instruction opcode copy"): hence a subprocess, so a regression fails this test
instead of killing the session.
"""
import json

import numpy as np
import pytest

from tests.helpers import SMALLER, TINY, run_script


@pytest.mark.slow
def test_bf16_plans_compile_and_train_like_none():
    """A small GPT in bf16: kernel and map plans (gathers, reduce-scatters, all-to-alls) compile and match none."""
    r = run_script("bench/bench_broadcast.py", "--config", TINY, *SMALLER, "model.n_layers=1", "train.dtype=bfloat16",
                   "--steps", "2", "--modes", "none", "kernel", "map", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = {row["mode"]: row for row in map(json.loads, r.stdout.splitlines())}
    assert set(runs["kernel"]["modes"].values()) == {"kernel"} and set(runs["map"]["modes"].values()) == {"map"}
    for mode in ("kernel", "map"):
        assert runs[mode]["measured_bytes"] > 0
        np.testing.assert_allclose(runs[mode]["final_loss"], runs["none"]["final_loss"], rtol=2e-3)
