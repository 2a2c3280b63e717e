"""Restart-based elasticity with real processes: kill -9 one of 3, go on with 2 from the last checkpoint,
grow back to 3 when the capacity file says so; every step once, losses as a fixed-mesh run resumed there."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import pytest

from framework.checkpoint import MANIFEST
from framework.train import Trainer
from tests.helpers import ROOT, TINY, tiny_config, kill_launched, wait_until

STEPS = 40
# data-parallel over whatever devices there are: 12 rows split over 6 (3 x 2) and over 4 (2 x 2)
# broadcast.mode=none in the run and in its in-process references alike (tiny_config pins it): under tiny_lm's auto
# the subprocess run once differed from a reference under none by 1.05e-5
EVERY = 2  # checkpoint.every_steps
RUN = ("model.n_layers=2", "data.source=synthetic", "train.global_batch=12", "mesh.data=-1", "mesh.fsdp=1",
       f"checkpoint.every_steps={EVERY}", "checkpoint.keep=100", "broadcast.mode=none")


def logged(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def resumed_fixed_mesh(run_dir, tmp_path, step, n_devices):
    """Losses of a plain (non-elastic) run on ``n_devices`` resumed from the elastic run's checkpoint ``step``."""
    ref = tmp_path / f"ref_{step}"
    shutil.copytree(run_dir / "checkpoints" / str(step), ref / "checkpoints" / str(step))
    records = Trainer(tiny_config(*RUN, steps=STEPS), run_dir=ref, devices=jax.devices()[:n_devices]).fit()
    return {r["step"]: r["loss"] for r in records}


@pytest.mark.slow
def test_kill_one_of_three_then_grow_back(tmp_path):
    run, capacity, err_path = tmp_path / "run", tmp_path / "capacity", tmp_path / "launcher.err"
    capacity.write_text("3\n")
    cmd = [sys.executable, str(ROOT / "scripts" / "launch_local.py"), "--processes", "3", "--devices-per-process", "2",
           "--elastic", "--min-processes", "2", "--capacity-file", str(capacity), "--",
           str(ROOT / "scripts" / "train.py"), "--config", TINY, "--run-dir", str(run), f"train.steps={STEPS}",
           "logging.progress=false", "logging.tensorboard=false", *RUN]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            wait_until(lambda: (run / "checkpoints" / "4" / MANIFEST).is_file(), proc, "a checkpoint")
            victim = kill_launched(err_path)
            wait_until(lambda: "restarting on 2 processes" in err_path.read_text(), proc, "the restart")
            # the 2-process job trains a few steps, then the third slot comes back
            wait_until(lambda: err_path.read_text().count("coordinator 127.0.0.1") == 2 and
                       (run / "metrics.jsonl").is_file() and logged(run)[-1]["mesh"]["data"] == 4 and
                       logged(run)[-1]["step"] >= 10, proc, "steps on 2 processes")
            capacity.write_text("3\n")
            out, _ = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=120)
    launcher = err_path.read_text()
    assert proc.returncode == 0, out[-4000:] + launcher[-2000:]
    assert re.search(rf"error: process p2 \(pid {victim}\) was killed by signal SIGKILL", launcher)
    assert "capacity now 3 processes" in launcher and launcher.count("coordinator 127.0.0.1") == 3
    assert "Traceback" not in out

    # where each restart resumed: the crash (last good checkpoint), then the graceful stop for growing
    shrink_at, grow_at = [int(s) for s in re.findall(r"^\[p0\] checkpoint: resumed from step (\d+)", out, re.M)]
    assert 4 <= shrink_at < grow_at < STEPS
    assert f"[p0] preempted at step {grow_at}: checkpoint saved in" in out  # all 2 processes saved that step
    records = logged(run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # each step once
    meshes = {r["step"]: r["mesh"]["data"] for r in records}
    assert {meshes[s] for s in range(shrink_at + 1, grow_at + 1)} == {4} and \
        {meshes[s] for s in range(grow_at + 1, STEPS + 1)} == {6}

    losses = {r["step"]: r["loss"] for r in records}
    on_two = resumed_fixed_mesh(run, tmp_path, shrink_at, 4)
    on_three = resumed_fixed_mesh(run, tmp_path, grow_at, 6)
    for s in range(shrink_at + 1, grow_at + 1):
        assert losses[s] == pytest.approx(on_two[s], abs=1e-5), s
    for s in range(grow_at + 1, STEPS + 1):
        assert losses[s] == pytest.approx(on_three[s], abs=1e-5), s
    # steps trained again: those the crashed run logged past its last good checkpoint, fewer than two intervals
    # (orbax waits for the previous save before the next, so the last good one is at most two intervals back);
    # none after the graceful stop, which saved the very step it stopped at
    again = [(int(a), int(b)) for a, b in re.findall(
        r"^\[p0\] checkpoint: steps (\d+)\.\.(\d+) were trained before the restart", out, re.M)]
    assert all(a == shrink_at + 1 for a, _ in again) and len(again) <= 1
    replayed = sum(b - a + 1 for a, b in again)
    assert replayed < 2 * EVERY
    goodput = json.loads((run / "goodput.json").read_text())
    assert goodput["total"]["replayed_steps"] == replayed  # (the crashed job's processes may not have written theirs)
    assert [r["replayed_steps"] for r in goodput["runs"]][-2:] == [replayed, 0]
    assert (goodput["total"]["replayed_steps_s"] > 0) == (replayed > 0)


@pytest.mark.slow
def test_too_few_devices_for_one_replica_waits_then_exits_2_naming_the_shortfall(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", TINY, "--run-dir", str(tmp_path),
                        "train.steps=2", "elastic.enabled=true", "elastic.min_devices=16", "elastic.wait_timeout_s=1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert r.returncode == 2, r.stderr[-3000:]
    assert "elastic: one model replica needs 16 devices, 8 available; waiting up to 1 s (elastic.wait_timeout_s)" in r.stdout
    assert r.stderr.strip().splitlines()[-1] == ("error: elastic: one model replica needs 16 devices (elastic.min_devices=16), "
                                                 "only 8 available: 8 short after waiting 1 s (elastic.wait_timeout_s)")
    assert "Traceback" not in r.stderr and not (tmp_path / "metrics.jsonl").exists()  # no step was trained


def test_launcher_waits_for_min_processes_then_exits_2(tmp_path):
    capacity = tmp_path / "capacity"
    capacity.write_text("1\n")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "launch_local.py"), "--processes", "3", "--elastic",
                        "--min-processes", "2", "--capacity-file", str(capacity), "--wait-timeout", "0.5", "--",
                        str(ROOT / "tests" / "dist_worker.py")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert f"launch_local: waiting up to 0.5 s for 2 process slots (1 available; {capacity})" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("error: launch_local: 2 processes needed (--min-processes), only 1 "
                                                 "available after waiting 0.5 s (--wait-timeout)")
