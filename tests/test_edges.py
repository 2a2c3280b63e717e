"""Reliability at the edges (issue 14): one test per way a user can get it wrong, each asserting the
exit code, a single error line naming the key, path or holder, and that nothing in the run dir was
lost or duplicated. The train.py runs share a compilation cache, so each compiles nothing twice."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from framework import rundir
from framework.checkpoint import MANIFEST, Checkpointer
from framework.config import ConfigError, load_config, warnings
from tests.helpers import ROOT, TINY

SMALL = ["model.n_layers=1", "model.d_model=64", "model.n_heads=4", "model.d_mlp=128", "train.seq_len=32",
         "model.max_seq_len=32", "data.source=synthetic", "logging.progress=false", "logging.tensorboard=false",
         "optimizer.warmup_steps=2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """train.py's environment: 8 CPU devices and one compilation cache for the whole module."""
    out = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return out


def train_cmd(run_dir, *overrides, steps=4):
    return [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", TINY, "--run-dir", str(run_dir),
            f"train.steps={steps}", *SMALL, *overrides]


def train(env, run_dir, *overrides, steps=4, timeout=600):
    return subprocess.run(train_cmd(run_dir, *overrides, steps=steps), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def one_error(r) -> str:
    """The run failed with exit 2 and said why in exactly one line (no traceback, no orbax noise)."""
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    return lines[0]


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(env, tmp_path_factory):
    """A run trained to step 4, saved at steps 2 and 4; tests copy it before touching it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    r = train(env, run_dir, "checkpoint.every_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


def copy_of(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


# --- one run per run dir ------------------------------------------------------------------------

def test_lock_names_its_holder_and_is_released(tmp_path):
    run_dir = tmp_path / "new"
    lock = rundir.RunDirLock(run_dir)
    holder = json.loads((run_dir / rundir.LOCK).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] and holder["started"]
    with pytest.raises(rundir.RunDirBusy, match=rf"run dir {run_dir} is in use by pid {os.getpid()} on host "):
        rundir.RunDirLock(run_dir)
    lock.release()
    assert not run_dir.exists()  # created by the lock, left empty: a refused run leaves nothing behind
    (tmp_path / "kept").mkdir()
    rundir.RunDirLock(tmp_path / "kept").release()
    assert (tmp_path / "kept").is_dir() and not list((tmp_path / "kept").iterdir())


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its pid is free
    (tmp_path / rundir.LOCK).write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "started": "then"}))
    lock = rundir.RunDirLock(tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"notice: run dir {tmp_path}: taking over the lock of pid {dead.pid} (started then), "
                   "which is no longer running"]
    assert json.loads((tmp_path / rundir.LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    # a lock from another host cannot be checked: it is respected
    (tmp_path / rundir.LOCK).write_text(json.dumps({"host": "elsewhere", "pid": dead.pid, "started": "then"}))
    with pytest.raises(rundir.RunDirBusy, match=f"in use by pid {dead.pid} on host elsewhere since then"):
        rundir.RunDirLock(tmp_path)


@pytest.mark.slow
def test_second_run_on_a_held_run_dir_exits_at_once(env, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(train_cmd(run_dir, steps=30), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / rundir.LOCK).is_file():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.05)
        second = train(env, run_dir, steps=30)
        line = one_error(second)
        assert f"run dir {run_dir} is in use by pid {first.pid} on host " in line
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    assert steps_logged(run_dir) == list(range(1, 31))  # once each: the second run wrote nothing
    assert not (run_dir / rundir.LOCK).exists()


@pytest.mark.slow
def test_killed_run_resumes_from_a_checkpoint_saved_by_time(env, tmp_path):
    """checkpoint.every_steps=0 (the default): a run killed mid-way still has a recent checkpoint,
    saved by checkpoint.every_minutes; the restart takes over the dead run's lock."""
    assert load_config(TINY).checkpoint.every_minutes == 10 and load_config(TINY).checkpoint.every_steps == 0
    run_dir, steps = tmp_path / "run", 400
    cmd = train_cmd(run_dir, "checkpoint.every_minutes=0.002", steps=steps)  # 0.12 s
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt_dir = run_dir / "checkpoints"
    try:
        deadline = time.monotonic() + 300
        while not (ckpt_dir.is_dir() and any((p / MANIFEST).is_file() for p in ckpt_dir.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads((run_dir / rundir.LOCK).read_text())["pid"] == proc.pid  # left behind by kill -9
    saved = Checkpointer(ckpt_dir).latest_good_step()
    assert 0 < saved < steps

    r = train(env, run_dir, "checkpoint.every_minutes=0", steps=saved + 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"notice: run dir {run_dir}: taking over the lock of pid {proc.pid}" in r.stderr
    assert f"checkpoint: resumed from step {saved} " in r.stderr
    assert steps_logged(run_dir) == list(range(1, saved + 3))


# --- filesystem faults ----------------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2.5 MB tmpfs (root only); None where the platform refuses to mount one."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2500k", "tmpfs", str(mount)], capture_output=True)
    if r.returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_disk_full_is_one_line_and_keeps_earlier_checkpoints(env, small_tmpfs):
    """A real full disk: a 2.5 MB tmpfs holds two checkpoints of this model (0.8-0.9 MB each), not twelve."""
    if small_tmpfs is None:
        pytest.skip("mounting a tmpfs was refused (not root); test_metrics_on_a_full_device covers ENOSPC without root")
    run_dir = small_tmpfs / "run"
    line = one_error(train(env, run_dir, "checkpoint.every_steps=2", steps=24))
    assert line.startswith(f"error: No space left on device: {run_dir}/checkpoints/")
    good = Checkpointer(run_dir / "checkpoints").latest_good_step()
    assert good is not None and good >= 2  # the checkpoints saved before the disk filled are intact
    logged = steps_logged(run_dir)
    assert logged == list(range(1, len(logged) + 1)) and len(logged) >= good


def test_metrics_on_a_full_device(env, tmp_path):
    """ENOSPC without root: metrics.jsonl points at /dev/full, whose every write fails that way
    (a real device, no hook in the framework)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to("/dev/full")
    line = one_error(train(env, run_dir))
    assert line == f"error: No space left on device: {run_dir / 'metrics.jsonl'}"


def test_read_only_run_dir_is_one_line(env, tmp_path, small_tmpfs):
    """Root ignores permission bits, so as root the run dir is a read-only mount (EROFS); otherwise a
    directory without write permission (EACCES)."""
    if small_tmpfs is not None:
        subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
        run_dir, expected = small_tmpfs, "Read-only file system"
    else:
        run_dir, expected = tmp_path / "ro", "Permission denied"
        run_dir.mkdir(mode=0o555)
    line = one_error(train(env, run_dir))
    assert line == f"error: {expected}: {run_dir / rundir.LOCK}"


# --- validation before anything is written -------------------------------------------------------

@pytest.mark.parametrize("n", ["0", "-1"])
def test_cpu_devices_at_least_one(tmp_path, n):
    r = subprocess.run([*train_cmd(tmp_path / "run")[:2], "--config", TINY, "--run-dir", str(tmp_path / "run"),
                        "--cpu-devices", n], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert one_error(r) == f"error: --cpu-devices={n}: expected at least 1"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=-1", "optimizer.lr=-1.0: expected a learning rate > 0"),
    ("optimizer.lr=0", "optimizer.lr=0.0: expected a learning rate > 0"),
    ("optimizer.b1=1", "optimizer.b1=1.0: expected a value in [0, 1)"),
    ("optimizer.b2=-0.1", "optimizer.b2=-0.1: expected a value in [0, 1)"),
    ("optimizer.eps=0", "optimizer.eps=0.0: expected a value > 0"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay=-0.1: expected a value >= 0 (0: off)"),
    ("optimizer.grad_clip=-1", "optimizer.grad_clip=-1.0: expected a value >= 0 (0: off)"),
    ("optimizer.min_lr_ratio=2", "optimizer.min_lr_ratio=2.0: expected a fraction in [0, 1]"),
    ("optimizer.warmup_steps=-1", "optimizer.warmup_steps=-1: expected an integer >= 0"),
    ("checkpoint.every_minutes=-1", "checkpoint.every_minutes=-1.0: expected a number >= 0 (0: off)"),
    ("checkpoint.every_steps=-1", "checkpoint.every_steps=-1: expected 0 (only at the end) or a positive integer"),
])
def test_optimizer_and_checkpoint_values_validated(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert str(e.value) == message


def test_warmup_longer_than_the_run_is_a_warning():
    assert warnings(load_config(TINY, ["train.steps=5"])) == [
        "optimizer.warmup_steps=20 >= train.steps=5: warm-up cut to 4 steps, the learning rate reaches optimizer.lr "
        "only at the last step"]
    assert warnings(load_config(TINY, ["train.steps=50"])) == []


def test_bad_lr_writes_nothing(env, tmp_path):
    """optimizer.lr=-1 once trained (and diverged) with exit 0."""
    line = one_error(train(env, tmp_path / "run", "optimizer.lr=-1"))
    assert line == "error: optimizer.lr=-1.0: expected a learning rate > 0"
    assert not (tmp_path / "run").exists()


def test_device_schedule_beyond_the_devices_is_refused_before_compiling(env, tmp_path):
    t0 = time.monotonic()
    r = train(env, tmp_path / "run", "elastic.enabled=true", "elastic.min_devices=2",
              "elastic.device_schedule=[[0,8],[2,100]]")
    line = one_error(r)
    assert line == "error: elastic.device_schedule asks for 100 devices at step 2, only 8 exist"
    assert not (tmp_path / "run").exists()  # no metrics, no checkpoints: the corrected command starts clean
    assert time.monotonic() - t0 < 60


def test_binary_data_file_is_refused_by_name(env, tmp_path):
    blob = tmp_path / "weights.bin"
    blob.write_bytes(bytes(range(256)) * 64)
    (tmp_path / "notes.txt").write_text("plain text " * 100)
    line = one_error(train(env, tmp_path / "run", "data.source=text", f"data.paths=[{tmp_path / 'notes.txt'},{blob}]"))
    assert line == (f"error: data.paths: {blob} is not text (a NUL byte in its first 8 KiB); "
                    "data.source=text trains on text files")
    assert not (tmp_path / "run").exists()


# --- resume with another config --------------------------------------------------------------------

@pytest.mark.parametrize("changes, named", [
    (["model.d_model=128"], "model.d_model: 64 -> 128"),
    pytest.param(["model.n_layers=6"], "model.n_layers: 1 -> 6", marks=pytest.mark.slow),
    pytest.param(["optimizer.name=sgd"], "optimizer.name: 'adamw' -> 'sgd'", marks=pytest.mark.slow),
    pytest.param(["optimizer.grad_clip=0", "optimizer.lr=0.01"], "optimizer.grad_clip: 1.0 -> 0.0", marks=pytest.mark.slow),
])
def test_resume_with_a_state_breaking_change_names_each_key(env, finished, tmp_path, changes, named):
    run_dir = copy_of(finished, tmp_path)
    before = snapshot(run_dir)
    line = one_error(train(env, run_dir, *changes))
    assert line.startswith(f"error: cannot resume step 4 in {run_dir / 'checkpoints'} with this config: {named} ")
    assert "optimizer.lr" not in line  # a trajectory change is not what stops the resume
    assert snapshot(run_dir) == before  # nothing lost, nothing added (the lock is gone again)


@pytest.mark.slow
def test_resume_with_trajectory_changes_warns_and_keeps_the_old_config(env, finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    old_config = (run_dir / "config.yaml").read_text()
    r = train(env, run_dir, "train.global_batch=32", steps=6)
    assert r.returncode == 0, r.stderr[-3000:]
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning: resuming step 4 with a changed ")]
    assert [w.split("changed ")[1].split(":")[0] for w in warned] == ["train.global_batch", "train.steps"]
    assert "train.global_batch: 16 -> 32" in warned[0] and "train.steps: 4 -> 6" in warned[1]
    assert (run_dir / "config.yaml.1").read_text() == old_config
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["global_batch"] == 32
    assert steps_logged(run_dir) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_nothing_left_to_train_says_so(env, finished, tmp_path):
    """The README's memory-tiers example after the quick start used to resume at the end, train 0 steps,
    say nothing and rewrite config.yaml."""
    run_dir = copy_of(finished, tmp_path)
    before = snapshot(run_dir)
    r = train(env, run_dir, "memory.opt_state=pinned_host")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == ("nothing to train: the run is at step 4 of 4 (raise train.steps "
                                                 "to train on, or choose another --run-dir for a new run)")
    assert snapshot(run_dir) == before


def test_compare_sorts_changes_by_kind():
    old = {"model": {"d_model": 64, "attention": "xla"}, "optimizer": {"lr": 1e-3, "name": "sgd", "momentum": 0.9},
           "mesh": {"fsdp": 8}, "train": {"steps": 4}}
    new = {"model": {"d_model": 64, "attention": "cudnn"}, "optimizer": {"lr": 2e-3, "name": "sgd", "momentum": 0.0},
           "mesh": {"fsdp": 4}, "train": {"steps": 8, "added_later": 1}, "data": {"prefetch": 4}}
    old["data"] = {"prefetch": 2}
    breaking, trajectory = rundir.compare(old, new)
    assert breaking == ["optimizer.momentum: 0.9 -> 0.0"]  # sgd without momentum has no trace state
    assert trajectory == ["optimizer.lr: 0.001 -> 0.002", "train.steps: 4 -> 8"]  # mesh, attention: free


def test_keep_previous_numbers_earlier_runs_versions(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("a")  # an earlier run's
    assert rundir.keep_previous(path, "b") == tmp_path / "config.yaml.1"
    path.write_text("b")
    assert rundir.keep_previous(path, "c") is None  # written by this process: replaced
    rundir._written_here.clear()  # as in a new process
    assert rundir.keep_previous(path, "b") is None  # unchanged: nothing to keep
    rundir._written_here.clear()
    path.write_text("c")
    assert rundir.keep_previous(path, "d") == tmp_path / "config.yaml.2"
    assert (tmp_path / "config.yaml.1").read_text() == "a" and (tmp_path / "config.yaml.2").read_text() == "c"
