"""The NVMe tier (framework/memory/nvme.py): optimizer state in files, streamed through a host update.

Same losses as the all-device run, optax's numbers per optimizer, disk bytes as planned, a
bounded resident set during the update (a real process), checkpoints in the all-device layout
that restore onto another mesh, and a crash mid-update (SIGKILL) that no checkpoint mixes.
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from framework import fileio, memory, sharding
from framework.checkpoint import Checkpointer, abstract_target
from framework.config import ConfigError
from framework.optimizer import build_optimizer
from framework.state import TrainState, check_run
from framework.train import Trainer
from tests.helpers import ROOT, TINY, run_script, tiny_config

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_mlp=64", "train.seq_len=16",
         "train.global_batch=8", "optimizer.warmup_steps=3", "data.source=synthetic", "checkpoint.async=false"]
STEPS = 10


def nvme(tmp_path, name="nvme", chunk=1024):
    return ["memory.opt_state=nvme", f"memory.nvme_dir={tmp_path / name}", f"memory.nvme_chunk_bytes={chunk}"]


def state_arrays(tree) -> list[np.ndarray]:
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.fixture(scope="module")
def device_run(tmp_path_factory):
    """The all-device run: losses and its checkpoints (every 5 steps), the reference for every test here."""
    run_dir = tmp_path_factory.mktemp("device_run")
    trainer = Trainer(tiny_config(*SMALL, "checkpoint.every_steps=5", steps=STEPS), run_dir=run_dir)
    losses = [r["loss"] for r in trainer.fit()]
    return trainer, np.array(losses), run_dir / "checkpoints"


def restored(directory, step, trainer):
    """Checkpoint ``step`` read into the all-device layout of ``trainer``'s mesh."""
    ck = Checkpointer(directory)
    try:
        return ck.restore(step, abstract_target(trainer.abstract.shapes, trainer.state_shardings))
    finally:
        ck.close()


def test_nvme_config_errors_are_one_line(tmp_path):
    cases = {
        (): "memory.opt_state=nvme needs memory.nvme_dir",
        (f"memory.nvme_dir={tmp_path}", "optimizer.name=adafactor"): "optimizer.name='adafactor' is not one",
        (f"memory.nvme_dir={tmp_path}", "train.param_dtype=bfloat16"): "must be float32",
        (f"memory.nvme_dir={tmp_path}", "elastic.enabled=true"): "does not support elastic.enabled=true",
        (f"memory.nvme_dir={tmp_path}", "memory.nvme_chunk_bytes=2"): "memory.nvme_chunk_bytes=2: expected bytes >= 4",
        (f"memory.nvme_dir={tmp_path}", "memory.params=nvme", "memory.opt_state=device"):
            "memory.params=nvme .* needs memory.opt_state=nvme, not 'device'",
        (f"memory.nvme_dir={tmp_path}", "memory.params=nvme"):
            "train.dtype='float32' must be lower precision than train.param_dtype='float32'",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as e:
            check_run(tiny_config("memory.opt_state=nvme", *overrides))
        assert "\n" not in str(e.value)
    r = run_script("plan.py", "--config", TINY, "memory.params=nvme", "train.dtype=bfloat16")
    assert r.returncode == 2 and r.stderr == ("error: memory.params=nvme keeps the float32 master parameters beside the "
                                              "optimizer state: it needs memory.opt_state=nvme, not 'device'\n"), r.stderr


def test_positional_io_reads_exactly_and_names_a_short_file(tmp_path):
    """framework/fileio.py (the NVMe tier's and the token store's reads): a buffer written at an offset reads back
    whole from there; a read past the end of the file is an error naming the file, never a partly filled buffer."""
    path = tmp_path / "f.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        data = np.arange(1000, dtype=np.float32)
        fileio.write_all(fd, data[::2], 100)  # not contiguous: written as its contiguous copy
        out = np.empty(500, np.float32)
        fileio.read_into(fd, out, 100)
        np.testing.assert_array_equal(out, data[::2])
        with pytest.raises(fileio.ShortRead, match=f"^{path}: short read, the file ends at byte 2100 \\(4 bytes short\\)$"):
            fileio.read_into(fd, out, 104, name=path)
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", ["adamw", "adam", "lion", "sgd", "sgd_no_momentum"])
def test_streamed_update_is_optax_update(tmp_path, name):
    """Three updates of a sharded tree (split, replicated and uneven leaves, chunks crossing shards)
    give optax's parameters and state; decay masked as the framework's."""
    opt = ["optimizer.name=sgd", "optimizer.momentum=0"] if name == "sgd_no_momentum" else [f"optimizer.name={name}"]
    cfg = tiny_config(*opt, "optimizer.grad_clip=0", "optimizer.warmup_steps=1", "optimizer.weight_decay=0.1",
                      *nvme(tmp_path, chunk=60), steps=3)
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    shapes = {"kernel": (16, 24), "bias": (24,), "embed": (40, 8), "scale": (8,)}
    specs = {"kernel": P("fsdp"), "bias": P(), "embed": P("fsdp", None), "scale": P()}
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    keys = iter(jax.random.split(jax.random.key(0), 16))
    rand = lambda: {k: jax.device_put(jax.random.normal(next(keys), s), shardings[k]) for k, s in shapes.items()}  # noqa: E731
    params = rand()
    tx = build_optimizer(cfg.optimizer, cfg.train.steps)
    opt_state = tx.init(params)
    opt_specs = sharding.opt_state_specs(tx, jax.eval_shape(tx.init, params), specs, params)
    store = memory.NvmeOptimizer(cfg, mesh, jax.eval_shape(lambda: params), shardings,
                                 jax.eval_shape(tx.init, params), opt_specs)
    store.init()
    streamed = jax.tree.map(jnp.copy, params)
    for step in range(3):
        grads = rand()
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        streamed = store.update(streamed, jax.tree.map(jnp.copy, grads), step)
        for k in shapes:
            assert streamed[k].sharding == shardings[k]
            np.testing.assert_allclose(np.asarray(streamed[k]), np.asarray(params[k]), rtol=0, atol=2e-6, err_msg=k)
    for ours, theirs in zip(state_arrays(store.opt_state(3)), state_arrays(opt_state)):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-6)
    moments = {"adamw": 2, "adam": 2, "lion": 1, "sgd": 1, "sgd_no_momentum": 0}[name]
    assert store.disk_bytes == sum(os.path.getsize(f) for f in store.files.values()) == 4 * moments * (16 * 24 + 24 + 40 * 8 + 8)
    store.close()


class FailingWrite(memory.NvmeOptimizer):
    """An update that dies after writing its second chunk (an exception here; SIGKILL in nvme_worker.py)."""

    writes_left = None  # set: the update dies after this many more chunk writes

    def _write(self, item, bufs):
        super()._write(item, bufs)
        if self.writes_left is not None:
            self.writes_left -= 1
            if self.writes_left == 0:
                raise OSError("disk gone")


def test_master_copy_update_is_optax_update_and_an_interrupted_one_is_refused(tmp_path):
    """memory.params=nvme on a sharded tree: three streamed updates keep the float32 master copy equal to optax's
    parameters and give the device their bf16 rounding; an update that dies midway leaves files no checkpoint
    may read (the master copy is under the same marker as the moments)."""
    cfg = tiny_config("optimizer.grad_clip=0", "optimizer.warmup_steps=1", "optimizer.weight_decay=0.1", "train.dtype=bfloat16",
                      "memory.params=nvme", *nvme(tmp_path, chunk=60), steps=4)
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    specs = {"kernel": P("fsdp"), "bias": P(), "embed": P("fsdp", None)}
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    keys = iter(jax.random.split(jax.random.key(1), 16))
    rand = lambda: {k: jax.device_put(jax.random.normal(next(keys), s), shardings[k])  # noqa: E731
                    for k, s in {"kernel": (16, 24), "bias": (24,), "embed": (40, 8)}.items()}
    params = rand()
    tx = build_optimizer(cfg.optimizer, cfg.train.steps)
    opt_state = tx.init(params)
    shapes = jax.eval_shape(lambda: params)
    store = FailingWrite(cfg, mesh, shapes, shardings, jax.eval_shape(tx.init, params),
                         sharding.opt_state_specs(tx, jax.eval_shape(tx.init, params), specs, shapes))
    state = store.init(TrainState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params), None, None, None))
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16)}
    device = state.params
    for step in range(3):
        grads = rand()
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        device = store.update(device, jax.tree.map(jnp.copy, grads), step)
        saved = store.checkpoint_state(TrainState(jnp.asarray(step + 1), device, None, None, None))
        for k in specs:
            assert device[k].sharding == shardings[k] and device[k].dtype == jnp.bfloat16
            np.testing.assert_allclose(np.asarray(saved.params[k]), np.asarray(params[k]), rtol=0, atol=2e-6, err_msg=k)
            np.testing.assert_array_equal(np.asarray(device[k]), np.asarray(saved.params[k].astype(jnp.bfloat16)))
    for ours, theirs in zip(state_arrays(saved.opt_state), state_arrays(opt_state)):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-6)
    assert store.disk_bytes == sum(os.path.getsize(f) for f in store.files.values()) == 12 * (16 * 24 + 24 + 40 * 8)
    store.writes_left = 2
    with pytest.raises(OSError, match="disk gone"):
        store.update(device, rand(), 3)
    with pytest.raises(memory.NvmeStateError, match="holds an interrupted update"):
        store.checkpoint_state(TrainState(jnp.asarray(3), device, None, None, None))
    store.close()


@pytest.mark.slow
def test_nvme_run_equals_all_device_through_a_crash_and_another_mesh(tmp_path, device_run):
    """10 steps (warm-up, cosine schedule, clipping, decay mask) with the state on nvme and checkpoints every
    3 steps; SIGKILL in the middle of step 8's update. Step 6 is the newest checkpoint, the files say an
    update was interrupted (a save of them is refused); the run resumed on a (2, 4) mesh rewrites them from
    step 6 and finishes. Its 10 losses equal the all-device run's, its files hold 8 bytes per parameter
    (Adam) as planned, and its checkpoint holds the optimizer state as the all-device run's does."""
    reference, reference_losses, reference_ckpt = device_run
    run_dir = tmp_path / "run"
    overrides = [*SMALL, "checkpoint.every_steps=3", *nvme(tmp_path), f"train.steps={STEPS}",
                 "logging.progress=false", "logging.tensorboard=false"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "nvme_worker.py"), "crash", "--run-dir", str(run_dir),
                           "--crash-step", "7", *overrides], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == -9, proc.stderr[-2000:]
    marker = json.loads((tmp_path / "nvme" / "process_0" / memory.nvme.MARKER).read_text())
    assert marker["step"] == 7 and marker["complete"] is False
    ck = Checkpointer(run_dir / "checkpoints")
    assert ck.latest_good_step() == 6 and not (run_dir / "checkpoints" / "7").exists()
    ck.close()

    resumed = Trainer(tiny_config(*overrides, "mesh.data=2", "mesh.fsdp=4", steps=STEPS), run_dir=run_dir)
    with pytest.raises(memory.NvmeStateError, match="holds an interrupted update"):
        resumed.nvme.opt_state(7)
    resumed.fit()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # 1-6 from the crashed process, 7-10 resumed
    np.testing.assert_allclose([r["loss"] for r in records], reference_losses, rtol=0, atol=1e-5)
    assert resumed.state.opt_state is None  # nothing of the optimizer state in the state the step holds
    files = sum(os.path.getsize(f) for f in resumed.nvme.files.values())
    planned = memory.disk_bytes(resumed.cfg, resumed.abstract.shapes.params, resumed.device_state_shardings.params)
    assert files == planned == 8 * resumed.abstract.param_count
    plan = resumed.memory_plan().to_dict()["bytes_per_device"]["opt_state"]
    assert plan == {"device": 0, "pinned_host": 0, "nvme": memory.state_needs(
        resumed.cfg, resumed.base_abstract, resumed.axis_sizes, resumed.batch_axes, 1).opt_state}
    ours, theirs = (restored(d, STEPS, reference) for d in (run_dir / "checkpoints", reference_ckpt))
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(state_arrays(ours.opt_state), state_arrays(theirs.opt_state)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    resumed.nvme.close()


RSS_MODEL = ["model.d_model=512", "model.n_layers=4", "model.n_heads=8", "model.d_mlp=2048", "train.seq_len=16",
             "train.global_batch=8", "data.source=synthetic", "train.steps=3", "logging.progress=false",
             "logging.tensorboard=false"]


@pytest.mark.slow
def test_update_resident_memory_stays_far_under_the_state(tmp_path):
    """A 12.8M-parameter model (Adam state: 102 MB in files): the process's peak resident memory during
    an update rises by at most two of its largest parameter, sixteen chunks and 4 MiB, which is under a
    fifth of the state. Loading the state, or keeping old parameters alive, would break the bound."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    chunk = 256 << 10
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "nvme_worker.py"), "rss", *RSS_MODEL,
                           *nvme(tmp_path, chunk=chunk)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["finite"] and m["state_bytes"] > 100e6
    bound = 2 * m["largest_leaf_bytes"] + 16 * chunk + (4 << 20)
    assert bound < m["state_bytes"] / 5
    assert m["peak"] - m["rss_before"] < bound, m


# ------------------------------------------------------------------ memory.params=nvme: the float32 master copy on disk

BF16 = [*SMALL, "train.dtype=bfloat16"]


class ComputeDtypeReads(Trainer):
    """The all-device run (float32 parameters, bf16 compute) with the parameters read as the device holds them under
    memory.params=nvme: rounded to bf16. The model casts its kernels to bf16 either way; this also rounds the norm
    scales and biases it reads in float32 (the one place the two schemes differ: 1.5e-4 in these losses). The
    gradient is taken with respect to the float32 parameters, which the update changes, as the master copy."""

    def loss_fn(self, params, batch, rng):
        rounded = jax.tree.map(lambda p: p + jax.lax.stop_gradient(p.astype(jnp.bfloat16).astype(p.dtype) - p), params)
        return super().loss_fn(rounded, batch, rng)


@pytest.mark.slow
def test_master_params_on_nvme_equal_the_all_device_run_and_checkpoint_float32(tmp_path):
    """bf16 compute, params and opt_state on nvme, 10 steps: losses equal the all-device run's within 2e-5 (measured
    7e-6: the host update is optax's arithmetic in numpy, an ulp from XLA's fused multiply-adds, and an ulp in the
    master copy sometimes flips a weight's bf16 rounding; updating the bf16 parameters instead of the master copy gives
    1.5e-4). The device holds bf16 parameters (half the float32 bytes, as planned), the files 12 bytes per parameter
    (master + Adam), as planned. Its checkpoint restores into an all-device run on another mesh with every parameter
    equal to the master copy (not the rounded one); the all-device run's step-5 checkpoint restores into the files of
    an nvme run on another mesh exactly, and into one on the same mesh that continues with the same losses (on another
    mesh bf16 sums run in another order: 6e-5)."""
    ref_dir, run_dir, resume_dir = tmp_path / "ref", tmp_path / "run", tmp_path / "resumed"
    reference = ComputeDtypeReads(tiny_config(*BF16, "checkpoint.every_steps=5", steps=STEPS), run_dir=ref_dir)
    reference_losses = np.array([r["loss"] for r in reference.fit()])
    master = ["memory.params=nvme", *nvme(tmp_path)]
    trainer = Trainer(tiny_config(*BF16, *master, steps=STEPS), run_dir=run_dir)
    losses = np.array([r["loss"] for r in trainer.fit()])
    np.testing.assert_allclose(losses, reference_losses, rtol=0, atol=2e-5)

    plan = trainer.memory_plan().to_dict()
    params = trainer.state.params
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    f32_share = memory.state_needs(trainer.cfg, trainer.base_abstract, trainer.axis_sizes, trainer.batch_axes, 1).params
    assert plan["bytes_per_device"]["params"] == {"device": memory.shard_bytes(params)["device"], "pinned_host": 0,
                                                  "nvme": f32_share}
    assert 2 * memory.shard_bytes(params)["device"] == f32_share
    files = sum(os.path.getsize(f) for f in trainer.nvme.files.values())
    assert files == plan["disk_bytes_per_process"] == 12 * trainer.abstract.param_count

    other = Trainer(tiny_config(*BF16, "mesh.data=2", "mesh.fsdp=4", steps=STEPS))  # all-device, another mesh
    saved = restored(run_dir / "checkpoints", STEPS, other)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(saved.params))
    in_files = trainer.nvme.checkpoint_state(trainer.state)
    for ours, theirs in ((saved.params, in_files.params), (saved.opt_state, in_files.opt_state)):
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rounded = [np.asarray(x.astype(jnp.bfloat16)) for x in jax.tree.leaves(saved.params)]
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(rounded, jax.tree.leaves(params)))
    kernel = np.asarray(saved.params["blocks"][0]["mlp"]["fc_in"]["kernel"])
    assert (kernel != kernel.astype(jnp.bfloat16).astype(np.float32)).mean() > 0.9  # float32, not the bf16 values

    (resume_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref_dir / "checkpoints" / "5", resume_dir / "checkpoints" / "5")
    moved = Trainer(tiny_config(*BF16, *master[:1], *nvme(tmp_path, "nvme_moved"), "mesh.data=2", "mesh.fsdp=4",
                                steps=STEPS), run_dir=resume_dir)
    state = moved.restore_or_init()  # into the files of a (2, 4) mesh: exactly the all-device checkpoint
    expected, in_files = restored(ref_dir / "checkpoints", 5, other), moved.nvme.checkpoint_state(state)
    for ours, theirs in ((in_files.params, expected.params), (in_files.opt_state, expected.opt_state)):
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    resumed = Trainer(tiny_config(*BF16, *master, steps=STEPS), run_dir=resume_dir)  # the mesh of the reference: same losses
    np.testing.assert_allclose([r["loss"] for r in resumed.fit()], reference_losses[5:], rtol=0, atol=2e-5)
    for store in (trainer.nvme, moved.nvme, resumed.nvme):
        store.close()
