"""The optimizer update on the host where pinned_host optimizer state lives (ZeRO-Offload), and gradients in host memory.

On CPU, host and device are one memory, so the placement is checked in the program lowered for
``cuda`` (as tests/test_memory.py checks offloads) and the numbers by training on CPU.
"""
import jax
import numpy as np
import optax
import pytest

from framework import memory
from framework.config import ConfigError
from framework.train import Trainer
from tests.helpers import TINY, run_script, tiny_config

pytestmark = pytest.mark.gpu

SMALL = ["data.source=synthetic", "model.n_layers=1", "model.d_model=32", "model.d_mlp=64", "model.n_heads=4",
         "train.seq_len=16", "model.max_seq_len=16", "train.grad_accum=2"]
HOST = ["memory.opt_state=pinned_host", "memory.grads=pinned_host"]
DEVICES = 2  # enough to shard the state (fsdp=2); fewer emulated devices compile and run faster


def trainer(*overrides, cls=Trainer) -> Trainer:
    return cls(tiny_config(*SMALL, *overrides, steps=3), devices=jax.devices()[:DEVICES])


class DeviceUpdate(Trainer):
    """The failure the checks guard against: optimizer state kept in pinned_host between steps, but
    brought to the device for the update and sent back after (what the step did before the host update)."""

    def optimizer_update(self, params, grads, opt_state):
        opt_state = jax.device_put(opt_state, self.device_state_shardings.opt_state)
        updates, opt_state = self.tx.update(jax.device_put(grads, self.device_state_shardings.params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state


def cuda_check(trainer: Trainer) -> memory.HostUpdateCheck:
    return memory.check_host_update(trainer.lower(trainer.cfg.train.grad_accum, platform="cuda").as_text())


@pytest.fixture(scope="module")
def host_trainer():
    return trainer(*HOST)


def test_host_update_keeps_optimizer_state_off_the_device(host_trainer):
    tr = host_trainer
    opt_leaves = len(jax.tree.leaves(tr.abstract.shapes.opt_state))
    check = cuda_check(tr)
    # every pinned_host argument of the step is optimizer state, and only host computations read it
    assert check.host_args == opt_leaves and check.read_on_device == 0, check
    # the update (adamw with clipping) runs on the host: its hundreds of ops sit in host-placed calls; the
    # ones without their own annotation are the step count's conversions to float (the learning-rate schedule)
    assert check.host_calls >= 4 and check.host_ops > 300 and set(check.unannotated) <= {"stablehlo.convert"}, check
    # the device-update variant of the same step: each optimizer-state argument is read on the device
    moved = cuda_check(trainer(*HOST, cls=DeviceUpdate))
    assert moved.host_args == opt_leaves and moved.read_on_device == opt_leaves, moved


def test_gradients_go_to_host_memory_in_the_accumulation_loop(host_trainer):
    leaves = len(jax.tree.leaves(host_trainer.abstract.shapes.params))
    on_host = memory.loop_body_transfers(host_trainer.lower(2, platform="cuda").as_text(), "cuda")
    # each micro-batch's gradients leave for host memory inside the micro-batch loop (one transfer per leaf)
    assert [c.to_host for c in on_host] == [leaves], on_host
    on_device = memory.loop_body_transfers(trainer().lower(2, platform="cuda").as_text(), "cuda")
    assert [c.to_host for c in on_device] == [0], on_device


@pytest.mark.slow
def test_host_update_trains_like_all_device(host_trainer):
    host = host_trainer.fit()
    reference = trainer().fit()
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in host], [r[key] for r in reference], atol=1e-5, rtol=0)
    assert host[-1]["loss"] < host[0]["loss"]
    kinds = {c: {x.sharding.memory_kind for x in jax.tree.leaves(getattr(host_trainer.state, c))} for c in ("params", "opt_state")}
    assert kinds == {"params": {"device"}, "opt_state": {"pinned_host"}}
    plan = host_trainer.memory_plan()  # the planner puts the gradients (and accumulator) in host memory too
    assert plan.bytes["grads"]["device"] == plan.bytes["opt_state"]["device"] == 0 < plan.bytes["grads"]["pinned_host"]


def test_an_optimizer_that_cannot_update_on_the_host_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        tiny_config("memory.opt_state=pinned_host", "optimizer.name=adafactor")
    assert str(e.value) == ("memory.opt_state=pinned_host: optimizer.name=adafactor cannot update on the host (its update "
                            "makes arrays in device memory); use adamw, adam, sgd, lion or memory.opt_state=device")
    with pytest.raises(ConfigError, match=r"^memory.grads='nvme': expected 'device' or 'pinned_host'$"):
        tiny_config("memory.grads=nvme")


def test_auto_offload_of_a_state_that_cannot_update_on_the_host_is_one_line():
    """adafactor's update cannot run on the host: ``auto`` placement that needs its optimizer state offloaded stops
    with one line, on the compiled step (it was a traceback from the failed compile) and on the planner's estimate
    (exit 2 from plan.py; it proposed a placement training could not run). The first candidate, state on the device,
    compiles on the sharded mesh: adafactor's factored statistics are replicated, no longer given the params' specs."""
    with pytest.raises(ConfigError, match=r"^memory.opt_state=auto: the step does not fit the device budget of 1,000 B "
                                          r"with the optimizer state on the device, and optimizer.name=adafactor cannot") as e:
        trainer("optimizer.name=adafactor", "memory.opt_state=auto", "memory.device_budget_bytes=1000").compile()
    assert "\n" not in str(e.value)
    r = run_script("plan.py", "--estimate", "--config", TINY, *SMALL, "optimizer.name=adafactor", "memory.opt_state=auto",
                   "memory.device_budget_bytes=120000",  # 123,313 B with the state on the device, 113,929 B without
                   "broadcast.mode=none")  # figures of XLA's layouts, as for the trainer above (tiny_config pins none)
    assert r.returncode == 2 and r.stderr.startswith("error: memory.opt_state=auto: the step does not fit the device "
                                                     "budget of 120,000 B") and r.stderr.count("\n") == 1, r.stderr
