"""Checkpoints across process counts, and a killed multi-process run resumed from its checkpoint."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from framework.checkpoint import MANIFEST
from framework.train import Trainer
from tests.helpers import ROOT, TINY, tiny_config
from tests.test_distributed import run

LAUNCH = [sys.executable, str(ROOT / "scripts" / "launch_local.py")]
CKPT_WORKER = str(ROOT / "tests" / "ckpt_worker.py")
MESH_FSDP = ("mesh.fsdp=8",)
MESH_3D = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")


def ckpt_worker(processes: int, mode: str, ckpt_dir, dump, mesh):
    r = run([*LAUNCH, "--processes", str(processes), "--devices-per-process", str(8 // processes), "--",
             CKPT_WORKER, mode, "--ckpt-dir", str(ckpt_dir), "--dump", str(dump), *mesh], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"[p0] {mode} ok: step 4 data_pos 4" in r.stdout


def assert_same_state(a_path, b_path):
    a, b = np.load(a_path), np.load(b_path)
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 100  # every param and optimizer leaf
    different = [k for k in a.files if not np.array_equal(a[k], b[k])]
    assert not different, different[:5]


@pytest.mark.slow
@pytest.mark.parametrize("writers, readers", [(2, 1), (1, 2)], ids=["2-procs-to-1", "1-proc-to-2"])
def test_checkpoint_restores_with_another_process_count_bit_for_bit(tmp_path, writers, readers):
    # Also onto another mesh: the writers use fsdp=8, the readers data=2 x fsdp=2 x tensor=2 (or the reverse).
    write_mesh, read_mesh = (MESH_FSDP, MESH_3D) if writers == 2 else (MESH_3D, MESH_FSDP)
    ckpt_worker(writers, "save", tmp_path / "ckpt", tmp_path / "saved.npz", write_mesh)
    ckpt_worker(readers, "restore", tmp_path / "ckpt", tmp_path / "restored.npz", read_mesh)
    assert_same_state(tmp_path / "saved.npz", tmp_path / "restored.npz")


@pytest.mark.slow
def test_processes_agree_on_pruning_and_setting_aside_when_one_arrives_late(tmp_path):
    # keep=2: every save from step 3 on deletes a step; the second process reaches each pruning, and
    # the resume past a damaged newest step, a second after the first has already changed the directory.
    r = run([*LAUNCH, "--processes", "2", "--devices-per-process", "4", "--",
             CKPT_WORKER, "rotate", "--ckpt-dir", str(tmp_path / "ckpt"), "--steps", "4"], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[p0] rotate ok: resumed from step 3" in r.stdout and "[p1] rotate ok: resumed from step 3" in r.stdout
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["3", "4.damaged"]


# broadcast.mode=none on both sides (the reference is built by tiny_config, which pins none): 2 processes
# and 1 agree to 1e-5 on XLA's program; with the auto plan they can differ by ~1e-5 relative
TRAIN_SMALL = ["model.n_layers=2", "data.source=synthetic", "mesh.fsdp=8", "checkpoint.every_steps=5",
               "logging.progress=false", "logging.tensorboard=false", "broadcast.mode=none"]
KILL_STEPS = 30


def sealed_steps(ckpt_dir) -> list[int]:
    return sorted(int(p.parent.name) for p in ckpt_dir.glob(f"*/{MANIFEST}") if p.parent.name.isdigit())


@pytest.mark.slow
def test_killed_process_stops_the_run_and_a_restart_resumes_from_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [*LAUNCH, "--processes", "2", "--devices-per-process", "4", "--", str(ROOT / "scripts" / "train.py"),
           "--config", TINY, "--run-dir", str(run_dir), f"train.steps={KILL_STEPS}", *TRAIN_SMALL]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 400
        while not [s for s in sealed_steps(run_dir / "checkpoints") if s >= 10]:
            assert proc.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline, "no checkpoint at step 10 in time"
            time.sleep(0.2)
        victim = int(re.search(r"p1 pid (\d+)", "".join(lines)).group(1))
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.terminate()  # the launcher stops its processes on SIGTERM
            proc.wait(timeout=30)
    reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode == 128 + signal.SIGKILL, out[-3000:]
    assert f"error: process p1 (pid {victim}) was killed by signal SIGKILL" in out
    killed_at = max(json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    assert killed_at < KILL_STEPS  # the run really stopped mid-way
    last_sealed = max(sealed_steps(run_dir / "checkpoints"))

    r = run(cmd, timeout=600)  # the same command again
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"[p0] checkpoint: resumed from step {last_sealed} " in r.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == list(range(1, KILL_STEPS + 1))

    # The interrupted-and-resumed run has the losses of an uninterrupted one (1 process x 8 devices).
    reference = Trainer(tiny_config(*TRAIN_SMALL, steps=KILL_STEPS), run_dir=tmp_path / "reference").fit()
    np.testing.assert_allclose([rec["loss"] for rec in records], [rec["loss"] for rec in reference], rtol=0, atol=1e-5)
