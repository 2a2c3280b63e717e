"""Every file a later run reads survives a SIGKILL at the worst moment of its write (tests/killed.py kills the
process as it is about to change the file), and the next run starts without help and loses no logged step."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from framework import hf, rundir
from framework.checkpoint import MANIFEST
from framework.config import ConfigError
from tests.helpers import ROOT, SMALLER, TINY


def killed_run(target: str, script: str, *args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(MESHPILOT_KILL_AT=target, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "tests" / "killed.py"), script, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def train(run_dir, *overrides: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    args = ["--config", TINY, "--run-dir", str(run_dir), "--cpu-devices", "1", "logging.progress=false",
            "logging.tensorboard=false", "data.source=synthetic", "broadcast.mode=none", *SMALLER,
            "checkpoint.every_steps=2", "checkpoint.async=false", "train.log_every=1", *overrides]
    if kill_at is not None:
        r = killed_run(kill_at, str(ROOT / "scripts" / "train.py"), *args)
        assert r.returncode == -9 and "killed.py: SIGKILL" in r.stderr, r.stderr[-2000:]
        return r
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def logged_steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_kills_while_writing_metrics_config_and_lock_leave_a_run_that_resumes_whole(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, "train.steps=4")
    assert logged_steps(run_dir) == [1, 2, 3, 4]
    first_config = (run_dir / "config.yaml").read_text()

    # killed as the lock is created
    train(run_dir, "train.steps=6", kill_at="run.lock")
    assert not (run_dir / rundir.LOCK).exists()  # created empty and filled after: a lock no later run takes

    # as if the first run had been killed saving step 4: its steps 3 and 4 are logged, its checkpoint is step 2
    (run_dir / "checkpoints" / "4" / MANIFEST).unlink()

    # resuming rewrites metrics.jsonl (the steps after the checkpoint are dropped): killed there
    train(run_dir, "train.steps=6", kill_at="metrics.jsonl")
    assert logged_steps(run_dir) == [1, 2, 3, 4]  # rewritten in place: the file was empty

    # a changed config: the earlier config.yaml is kept and the new one written: killed there
    train(run_dir, "train.steps=6", "optimizer.lr=0.002", kill_at="config.yaml")
    assert (run_dir / "config.yaml").read_text() == first_config  # renamed aside first: there was no config.yaml
    assert logged_steps(run_dir) == [1, 2]  # (this run's rewrite went through)

    r = train(run_dir, "train.steps=6", "optimizer.lr=0.002")
    assert "checkpoint: resumed from step 2" in r.stderr
    # the killed runs' locks (pid gone) are taken over as before
    assert [line for line in r.stderr.splitlines() if line.startswith("notice:")] != []
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optimizer"]["lr"] == 0.002
    assert (run_dir / "config.yaml.1").read_text() == first_config and not (run_dir / "config.yaml.2").exists()
    assert not list(run_dir.glob("*.tmp"))


def test_unreadable_lock_of_a_dead_writer_is_taken_over_with_a_notice(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / rundir.LOCK
    lock.write_text("")  # as an earlier meshpilot left it, killed between creating and filling it
    with pytest.raises(rundir.RunDirBusy, match="unknown run"):  # fresh: its writer may still be filling it
        rundir.RunDirLock(run_dir)
    old = time.time() - 2 * rundir.UNREADABLE_LOCK_S
    os.utime(lock, (old, old))
    held = rundir.RunDirLock(run_dir)
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1 and "unreadable lock file" in notices[0], notices
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    held.release()
    assert not lock.exists()


SAVE = """
import sys
import numpy as np
from framework import hf
tensors = {f"w{i}": np.full((64, 64), i, np.float32) for i in range(4)}
hf.save(tensors, {"model_type": "llama", "step": int(sys.argv[2])}, sys.argv[1], max_shard_bytes=2 * 64 * 64 * 4)
"""


def test_killed_hf_save_leaves_no_index_naming_missing_shards(tmp_path):
    script, out = tmp_path / "save.py", tmp_path / "hf"
    script.write_text(SAVE)
    r = killed_run("model.safetensors.index.json", str(script), str(out), "1")
    assert r.returncode == -9, r.stderr[-2000:]
    # written first, the index named two shards not yet written
    assert not (out / "model.safetensors.index.json").exists()
    with pytest.raises(ConfigError, match="no model.safetensors"):
        hf.weight_files(out)
    subprocess.run([sys.executable, str(script), str(out), "2"], cwd=ROOT, check=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    files = hf.weight_files(out)
    assert sorted(files) == ["w0", "w1", "w2", "w3"] and len(set(files.values())) == 2
    assert json.loads((out / "config.json").read_text())["step"] == 2
    assert not list(out.glob("*.tmp"))
    from safetensors.numpy import load_file

    assert np.all(load_file(files["w3"])["w3"] == 3)
