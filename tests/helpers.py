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


def loss_and_grads(tr, params, batch):
    """A trainer's loss and its gradient on ``batch`` (a dict of token fields, or a token array), computed in the
    trainer's shardings and activation rules, as host arrays."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from framework import sharding

    batch = batch if isinstance(batch, dict) else {"tokens": batch}
    rng = jax.random.key_data(jax.random.key(0))

    def f(p, b):
        with sharding.activation_sharding(tr.mesh, tr.activation_rules):
            return jax.value_and_grad(lambda q: tr.loss_fn(q, b, rng)[0])(p)

    batch_sharding = NamedSharding(tr.mesh, P(tr.batch_axes))
    fn = jax.jit(f, in_shardings=(tr.state_shardings.params, batch_sharding))
    return jax.device_get(fn(jax.device_put(params, tr.state_shardings.params), jax.device_put(batch, batch_sharding)))


def wait_until(condition, proc, what: str, timeout: float = 600, poll: float = 0.01) -> None:
    """Poll ``condition()`` while the launcher ``proc`` runs; fail naming ``what`` if it ends or time runs out."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"launcher ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def kill_launched(err_path, name: str = "p2") -> int:
    """SIGKILL the launched process ``name`` (its pid as scripts/launch_local.py logs it in ``err_path``); its pid."""
    import re
    import signal

    pid = int(re.search(rf"{name} pid (\d+)", Path(err_path).read_text()).group(1))
    os.kill(pid, signal.SIGKILL)
    return pid
