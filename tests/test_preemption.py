"""Preemption: SIGTERM/SIGINT stop at a step boundary with a checkpoint; the restarted run loses no step.

Real signals (os.kill), real orbax on disk, real processes for the script and the multi-process case.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import pytest

from framework.checkpoint import MANIFEST
from framework.preemption import Preempted
from framework.train import Trainer
from tests.helpers import ROOT, TINY, tiny_config
from tests.test_resume import compile_once  # noqa: F401  (module fixture: one compile per config)

# broadcast.mode=none: subprocess runs of tiny_lm (auto) are compared with in-process references from
# tiny_config (none) to 1e-5; pin both to XLA's program
SMALL = ("model.n_layers=2", "data.source=synthetic", "broadcast.mode=none")


def logged_steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def logged_losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class SignalAt(Trainer):
    """Sends ``sig`` to its own process when step ``at`` has finished (as a scheduler would, mid-run)."""

    at, sig = 0, signal.SIGTERM

    def on_step_end(self, step, record):
        if step == self.at:
            os.kill(os.getpid(), self.sig)


@pytest.mark.slow
def test_signal_stops_at_a_step_boundary_with_a_checkpoint_and_resume_loses_nothing(tmp_path):
    steps, at = 8, 3
    cfg = tiny_config(*SMALL, steps=steps)
    straight = [r["loss"] for r in Trainer(cfg).fit()]
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

    run = tmp_path / "run"
    trainer = type("T", (SignalAt,), {"at": at, "sig": signal.SIGTERM})(cfg, run_dir=run)
    with pytest.raises(Preempted) as info:
        trainer.fit()
    e = info.value
    # metrics of step `at` arrive while the next step runs: that one finishes, no later one starts
    assert e.step == at + 1 and e.signum == signal.SIGTERM and e.exit_code == 0
    assert str(e) == f"preempted at step {at + 1}: checkpoint saved in {run / 'checkpoints'}"
    assert (run / "checkpoints" / str(at + 1) / MANIFEST).is_file()  # written and sealed before fit returns
    assert logged_steps(run) == list(range(1, at + 2))  # every finished step's metrics are written
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before

    resumed = Trainer(cfg, run_dir=run).fit()
    assert [r["step"] for r in resumed] == list(range(at + 2, steps + 1))  # starts right after the saved step
    assert logged_steps(run) == list(range(1, steps + 1))
    assert logged_losses(run) == straight  # equal at every step


def train_cmd(run_dir, steps, *extra):
    return [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", TINY, "--run-dir", str(run_dir),
            f"train.steps={steps}", "logging.progress=false", "logging.tensorboard=false", *SMALL, *extra]


def signal_after(cmd, run_dir, lines, sig, env, pid_of=None):
    """Start ``cmd``; once metrics.jsonl has ``lines`` lines, send ``sig`` (to ``pid_of(stderr so far)`` or the
    process itself); return the completed process."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= lines):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training never reached the signal point"
            time.sleep(0.01)
        os.kill(proc.pid if pid_of is None else pid_of(), sig)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def script_env(cache):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


@pytest.mark.slow
def test_train_script_exits_0_on_sigterm_and_130_on_sigint_and_resumes_every_step(tmp_path, compile_once):
    steps, run = 40, tmp_path / "run"
    env = script_env(compile_once)
    for lines, sig, code in ((3, signal.SIGTERM, 0), (12, signal.SIGINT, 130)):
        r = signal_after(train_cmd(run, steps), run, lines, sig, env)
        assert r.returncode == code, r.stderr[-3000:]
        assert "Traceback" not in r.stderr
        stopped = logged_steps(run)[-1]
        assert stopped < steps, "the run ended before the signal"
        assert r.stderr.rstrip().splitlines()[-1] == f"preempted at step {stopped}: checkpoint saved in {run / 'checkpoints'}"
        assert (run / "checkpoints" / str(stopped) / MANIFEST).is_file()
    r = subprocess.run(train_cmd(run, steps), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"checkpoint: resumed from step {stopped} in" in r.stderr  # 0 steps lost
    assert logged_steps(run) == list(range(1, steps + 1))
    reference = [rec["loss"] for rec in Trainer(tiny_config(*SMALL, steps=steps)).fit()]
    assert logged_losses(run) == reference


@pytest.mark.slow
def test_two_processes_signalled_in_one_save_at_the_same_step(tmp_path):
    """SIGTERM to process 1 only: JAX's preemption sync point stops both at one step, both save it, exit 0."""
    steps, run = 30, tmp_path / "run"
    launch = [sys.executable, str(ROOT / "scripts" / "launch_local.py"), "--processes", "2", "--devices-per-process", "2",
              "--", *train_cmd(run, steps)[1:]]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    stderr = tmp_path / "launcher.err"

    def p1_pid():
        return int(re.search(r"p1 pid (\d+)", stderr.read_text()).group(1))

    with open(stderr, "w") as err_file:
        proc = subprocess.Popen(launch, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err_file, text=True)
        metrics = run / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        os.kill(p1_pid(), signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:] + stderr.read_text()
    stopped = logged_steps(run)[-1]
    assert stopped < steps
    assert f"[p0] preempted at step {stopped}: checkpoint saved in {run / 'checkpoints'}" in out
    assert "Traceback" not in out
    assert (run / "checkpoints" / str(stopped) / MANIFEST).is_file()  # both processes wrote their shards of one step

    r = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert logged_steps(run) == list(range(1, steps + 1))
    reference = Trainer(tiny_config(*SMALL, steps=steps), devices=jax.devices()[:4]).fit()
    assert logged_losses(run) == pytest.approx([rec["loss"] for rec in reference], abs=1e-5)
