"""The out-of-memory retry on a real allocation failure: XLA:CPU under an address-space limit returns
RESOURCE_EXHAUSTED (at device_get: the step runs asynchronously), the run restarts at half the micro-batch and
trains the losses of a run started there; processes agree on the smallest micro-batch any of them asks for; the
broadcast plan follows the new micro-batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from framework.collectives import count_compiled
from framework.train import Trainer
from tests.helpers import ROOT, tiny_config

WORKER = str(ROOT / "tests" / "oom_worker.py")


def worker(*args: str, launch: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # one malloc arena per thread would reserve 64 MiB of address space each: the limit is about the step
    env.update(PYTHONPATH=str(ROOT), MALLOC_ARENA_MAX="2")
    cmd = [sys.executable, WORKER, *args]
    if launch:
        cmd = [sys.executable, str(ROOT / "scripts" / "launch_local.py"), "--processes", "2",
               "--devices-per-process", "1", "--", *cmd[1:]]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r


@pytest.mark.slow
def test_first_micro_batch_fails_to_allocate_and_the_run_trains_as_if_started_smaller():
    """Two real processes (gloo), each under its own limit: both steps fail at device_get, both processes adopt 8
    (agreed through the key-value store), and both train the losses of one process started at 8."""
    limited = worker("--micro", "16", "--limit", launch=True)
    runs = [json.loads(line.split("] ", 1)[1]) for line in limited.stdout.splitlines() if line.startswith("[p") and "{" in line]
    assert len(runs) == 2 and runs[0] == runs[1], limited.stdout[-3000:]
    run = runs[0]
    assert run["temp_bytes"]["16"] > 1.8 * run["temp_bytes"]["8"]  # the limit sits between the two
    lines = [line for line in (limited.stdout + limited.stderr).splitlines() if "memory:" in line]
    assert len(lines) == 1 and lines[0].startswith("[p0] memory: step 1: micro-batch 16 -> 8 "), lines
    assert "RESOURCE_EXHAUSTED at device_get" in lines[0]
    reference = json.loads(worker("--micro", "8").stdout.splitlines()[-1])
    assert run["micro_batch"] == 8 and len(run["losses"]) == 3
    np.testing.assert_allclose(run["losses"], reference["losses"], rtol=0, atol=1e-5)


def test_two_processes_adopt_the_smallest_proposed_micro_batch():
    r = worker("--propose", "4,2", launch=True)
    assert "[p0] agreed 2 then 4\n" in r.stdout and "[p1] agreed 2 then 4\n" in r.stdout, r.stdout + r.stderr


def test_the_broadcast_plan_is_remade_for_the_smaller_micro_batch():
    """Micro-batch 16 plans most layers in kernel mode, 8 in map mode (the feature maps halve): after the shrink
    the step compiled for 8 moves what a run started at 8 moves, and the state's layout is unchanged."""
    model = ("model.n_layers=2", "model.d_model=192", "model.d_mlp=768", "train.seq_len=16", "model.max_seq_len=16",
             "data.source=synthetic", "broadcast.mode=auto", "train.global_batch=16")
    shrunk = Trainer(tiny_config(*model, "train.micro_batch=16", steps=2))
    specs = shrunk.abstract.specs
    assert shrunk._shrink_after_oom(0, "a test") and shrunk.micro_batch == 8
    started = Trainer(tiny_config(*model, "train.micro_batch=8", steps=2))
    assert shrunk.broadcast_plan.modes() == started.abstract.broadcast_plan.modes() != \
        shrunk.abstract.broadcast_plan.modes()  # (the plan made at the start, for 16)
    assert set(started.abstract.broadcast_plan.modes().values()) == {"map"}
    assert shrunk.abstract.specs == specs
    by_layer = {name: count_compiled(t.compiled_step, jax.device_count()).by_layer() for name, t in
                (("shrunk", shrunk), ("started", started))}
    assert by_layer["shrunk"] == by_layer["started"], by_layer
