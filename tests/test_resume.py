"""Checkpoints in training: resume equivalence, data position, SIGKILL crash and restart, resume policies."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from framework.checkpoint import MANIFEST, CheckpointError
from framework.train import Trainer
from tests.helpers import ROOT, TINY, run_script, tiny_config

# broadcast.mode=none: subprocess runs of tiny_lm (auto) are compared with in-process references from
# tiny_config (none) to 1e-5; pin both to XLA's program
SMALL = ("model.n_layers=2", "data.source=synthetic", "broadcast.mode=none")


@pytest.fixture(scope="module", autouse=True)
def compile_once(tmp_path_factory):
    """A persistent compilation cache for this module only: the several Trainers (and train.py
    processes) of one config compile the same step once, which saves minutes on 2 shared cores.
    A cached executable is the very program a recompile produces, so results do not change."""
    from jax.experimental.compilation_cache import compilation_cache

    cache = tmp_path_factory.mktemp("jax_cache")
    saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compilation_cache.reset_cache()
    yield cache
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
    compilation_cache.reset_cache()


class RecordingTrainer(Trainer):
    """Remembers a fingerprint of every batch it trains on (the research hook a user would write)."""

    def step(self, state, batch):
        self.batches = getattr(self, "batches", [])
        self.batches.append(hash(np.asarray(batch["tokens"]).tobytes()))
        return super().step(state, batch)


def final_params(trainer):
    return [np.asarray(x) for x in jax.tree.leaves(trainer.state.params)]


@pytest.mark.slow
def test_resume_equivalence_bitwise_and_data_position(tmp_path):
    """20 steps straight == 10 steps, a fresh Trainer resuming from the checkpoint, 10 more: bitwise on CPU."""
    cfg = tiny_config(*SMALL, "checkpoint.every_steps=5", steps=20)
    straight = RecordingTrainer(cfg, run_dir=tmp_path / "straight")
    losses_straight = [r["loss"] for r in straight.fit()]

    first = RecordingTrainer(cfg, run_dir=tmp_path / "split")
    losses_first = [r["loss"] for r in first.fit(steps=10)]
    assert first.checkpointer.latest_good_step() == 10
    second = RecordingTrainer(cfg, run_dir=tmp_path / "split")
    records_second = second.fit()
    assert [r["step"] for r in records_second] == list(range(11, 21))
    assert int(second.state.data_pos) == 20 and int(second.state.step) == 20

    assert len(losses_straight) == 20
    assert losses_first + [r["loss"] for r in records_second] == losses_straight  # exact float equality
    assert first.batches + second.batches == straight.batches  # no batch replayed, none skipped
    for a, b in zip(final_params(second), final_params(straight)):
        np.testing.assert_array_equal(a, b)
    logged = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 21))
    assert (tmp_path / "split" / "checkpoints" / "20" / MANIFEST).is_file()  # final save

    # the same run resumed onto data=2,tensor=2 over 4 of the 8 devices: same values, new shardings
    other = Trainer(tiny_config(*SMALL, "mesh.data=2", "mesh.tensor=2", steps=20), run_dir=tmp_path / "split",
                    devices=jax.devices()[:4])
    moved = other.restore_or_init()
    for got, want, sharding in zip(jax.tree.leaves(moved), jax.tree.leaves(second.state), jax.tree.leaves(other.state_shardings)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding == sharding and set(got.devices()) <= set(jax.devices()[:4])


def test_negative_every_steps_is_a_config_error(tmp_path):
    from framework.config import ConfigError

    with pytest.raises(ConfigError, match=r"^checkpoint.every_steps=-2: expected 0 \(only at the end\) or a positive integer$"):
        Trainer(tiny_config(*SMALL, "checkpoint.every_steps=-2"), run_dir=tmp_path)


def test_earlier_run_without_checkpoint_is_not_silently_restarted(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    cfg = tiny_config(*SMALL, steps=2)
    with pytest.raises(CheckpointError, match=r"holds an earlier run \(metrics.jsonl\) but no checkpoint"):
        Trainer(cfg, run_dir=tmp_path).fit()
    with pytest.raises(CheckpointError, match="checkpoint.resume=true but .* holds no checkpoint"):
        Trainer(tiny_config(*SMALL, "checkpoint.resume=true", steps=2), run_dir=tmp_path / "new").fit()


@pytest.mark.slow
def test_resume_false_starts_over_and_keeps_old_checkpoints_aside(tmp_path, capsys):
    cfg = tiny_config(*SMALL, steps=3)
    Trainer(cfg, run_dir=tmp_path).fit()
    assert (tmp_path / "checkpoints" / "3" / MANIFEST).is_file()
    records = Trainer(tiny_config(*SMALL, "checkpoint.resume=false", steps=3), run_dir=tmp_path).fit()
    assert [r["step"] for r in records] == [1, 2, 3]
    err = capsys.readouterr().err
    assert "warning: checkpoint.resume=false: starting over; earlier checkpoints moved to " in err
    old = [p for p in tmp_path.iterdir() if p.name.startswith("checkpoints.old-")]
    assert len(old) == 1 and (old[0] / "3" / MANIFEST).is_file()
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]


def sealed_steps(ckpt_dir):
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit() and (p / MANIFEST).is_file())


def in_flight(ckpt_dir):
    """Steps newer than the newest sealed one that are being written: orbax tmp dirs, or renamed
    but not yet sealed. (Older unsealed dirs are old steps being deleted.)"""
    newest = max(sealed_steps(ckpt_dir), default=-1)
    names = [p.name for p in ckpt_dir.iterdir()] if ckpt_dir.is_dir() else []
    return [n for n in names if n.split(".")[0].isdigit() and int(n.split(".")[0]) > newest and
            (n.endswith(".orbax-checkpoint-tmp") or (n.isdigit() and not (ckpt_dir / n / MANIFEST).exists()))]


@pytest.mark.slow
def test_sigkill_mid_save_then_restart_matches_uninterrupted(tmp_path, compile_once):
    steps = 24
    overrides = [f"train.steps={steps}", "logging.progress=false", "logging.tensorboard=false", *SMALL,
                 "checkpoint.every_steps=1", "checkpoint.keep=3"]
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", TINY, "--run-dir", str(run_dir), *overrides]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_COMPILATION_CACHE_DIR=str(compile_once), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        # kill once a checkpoint is complete and, saving every step, a later one is being written
        while not (max(sealed_steps(ckpt_dir), default=0) >= 6 and in_flight(ckpt_dir)):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(sealed_steps(ckpt_dir))
    assert killed_at < steps
    leftovers = in_flight(ckpt_dir)  # almost always the save that was cut off

    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    resumed = [line for line in r.stderr.splitlines() if line.startswith("checkpoint: resumed from step ")]
    assert len(resumed) == 1
    resumed_at = int(resumed[0].split()[4])
    assert resumed_at == killed_at
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: checkpoint dir")]
    assert len(warnings) == (1 if leftovers else 0), (leftovers, warnings)
    if leftovers:
        assert warnings[0].endswith(f"using step {killed_at}") and "incomplete" in warnings[0]

    reference = Trainer(tiny_config(*SMALL, "checkpoint.every_steps=1", steps=steps)).fit()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == list(range(1, steps + 1))
    assert [rec["loss"] for rec in records] == [rec["loss"] for rec in reference]

    # every checkpoint damaged -> the script refuses to start over: one line, exit 2
    for s in sealed_steps(ckpt_dir):
        (ckpt_dir / str(s) / MANIFEST).unlink()
    r = run_script("train.py", "--config", TINY, "--run-dir", str(run_dir), *overrides, env=env)
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith(f"error: checkpoint dir {ckpt_dir}: no intact checkpoint (step {steps} is incomplete")
    assert err[0].endswith("set checkpoint.resume=false to start over")
    assert "Traceback" not in r.stderr
