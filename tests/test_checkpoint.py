"""framework.checkpoint on plain pytrees: reshard on restore, async saves, integrity, keep-K."""
import errno
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from framework.checkpoint import MANIFEST, CheckpointError, Checkpointer, abstract_target, naming
from framework.config import ConfigError


def mesh(shape, names, devices=None):
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices).reshape(shape), names, axis_types=(AxisType.Auto,) * len(shape))


def make_state(seed=0):
    """A train-state-like pytree: params, adam state, rng, scalars (values all distinct)."""
    k = jax.random.split(jax.random.key(seed), 3)
    params = {
        "embed": jax.random.normal(k[0], (64, 32)),
        "mlp": {"w_in": jax.random.normal(k[1], (32, 128)), "w_out": jax.random.normal(k[2], (128, 32))},
        "bias": jnp.arange(32, dtype=jnp.float32),
    }
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda x: x * 0.1, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-zero moments
    return {
        "step": jnp.asarray(7, jnp.int32),
        "params": params,
        "opt_state": opt_state,
        "rng": jax.random.key_data(jax.random.key(seed + 1)),
        "data_pos": jnp.asarray(7, jnp.int32),
    }


def shardings(state, m, param_spec, opt_memory_kind=None):
    def one(path, x):
        spec = param_spec if x.ndim == 2 else P()
        kind = opt_memory_kind if path[0].key == "opt_state" else None
        return NamedSharding(m, spec, memory_kind=kind)

    return jax.tree_util.tree_map_with_path(one, state)


def place(state, sh):
    return jax.tree.map(jax.device_put, state, sh)


def assert_equal_trees(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_reshard_onto_three_other_meshes(tmp_path):
    state = make_state()
    src = mesh((8,), ("fsdp",))
    saved = place(state, shardings(state, src, P("fsdp", None)))
    ck = Checkpointer(tmp_path / "ck")
    ck.save(7, saved)
    ck.close()

    targets = [
        ("data=4,tensor=2", mesh((4, 2), ("data", "tensor")), P(None, "tensor"), None),
        ("2x2x2, opt_state in pinned_host", mesh((2, 2, 2), ("data", "fsdp", "tensor")), P("fsdp", "tensor"), "pinned_host"),
        ("data=2,tensor=2 over 4 of 8 devices", mesh((2, 2), ("data", "tensor"), jax.devices()[:4]), P("tensor", "data"), None),
    ]
    reader = Checkpointer(tmp_path / "ck")
    assert reader.latest_good_step() == 7
    for name, m, spec, kind in targets:
        target_sh = shardings(state, m, spec, kind)
        restored = reader.restore("latest", abstract_target(state, target_sh))
        assert_equal_trees(restored, state)
        for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target_sh)):
            assert leaf.sharding == want, name
        if kind is not None:
            assert {x.sharding.memory_kind for x in jax.tree.leaves(restored["opt_state"])} == {kind}
            assert restored["params"]["embed"].sharding.memory_kind != kind
        leaves = jax.tree.leaves(restored)
        assert {d for leaf in leaves for d in leaf.devices()} == set(m.devices.flat), name
    # the 4-device target really holds quarter shards: embed (64, 32) as P("tensor", "data") on 2x2
    embed = restored["params"]["embed"]
    assert {s.data.shape for s in embed.addressable_shards} == {(32, 16)}
    reader.close()


def test_async_save_survives_donation_right_after(tmp_path):
    """save() returns before the write ends; donating the arrays then must not change what is written."""
    m = mesh((8,), ("fsdp",))
    state = make_state()
    expected = jax.tree.map(np.asarray, state)  # device_put may alias ``state``'s buffers, which donation deletes
    live = place(state, shardings(state, m, P("fsdp", None)))
    ck = Checkpointer(tmp_path / "ck", async_save=True)
    ck.save(1, live)
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    first = live
    for _ in range(3):
        live = bump(live)
    assert first["params"]["embed"].is_deleted()  # donation really happened
    ck.wait()
    assert ck.check(1) is None
    restored = ck.restore(1, abstract_target(expected, shardings(expected, m, P("fsdp", None))))
    assert_equal_trees(restored, expected)
    ck.close()


def save_steps(directory, steps, keep=5, async_save=False):
    ck = Checkpointer(directory, keep=keep, async_save=async_save, config={"train": {"steps": 30}})
    for s in steps:
        state = make_state(seed=s)
        state["step"] = jnp.asarray(s, jnp.int32)
        ck.save(s, state)
    ck.close()


def largest_file(step_dir):
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST]
    return max(files, key=lambda p: p.stat().st_size)


def restore_latest(directory):
    ck = Checkpointer(directory)
    restored = ck.restore("latest", make_state())
    return ck, restored


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_latest_falls_back_with_one_line(tmp_path, capsys, damage):
    d = tmp_path / "ck"
    save_steps(d, [10, 20, 30], async_save=True)
    victim = largest_file(d / "30")
    size = victim.stat().st_size
    if damage == "truncate":
        with open(victim, "r+b") as f:
            f.truncate(size // 2)
    else:
        victim.unlink()
    capsys.readouterr()

    ck, restored = restore_latest(d)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(err) == 1, err
    rel = str(victim.relative_to(d / "30"))
    detail = f"{rel} is {size // 2} bytes, expected {size}" if damage == "truncate" else f"{rel} missing"
    assert err[0] == f"warning: checkpoint dir {d}: step 30 is damaged ({detail}); using step 20"
    assert int(restored["step"]) == 20
    assert_equal_trees(restored["params"], make_state(seed=20)["params"])
    # the damaged step was moved aside, so training can save step 30 again
    assert (d / "30.damaged").is_dir() and not (d / "30").exists()
    state = make_state(seed=99)
    ck.save(30, state)
    ck.wait()
    assert ck.latest_good_step() == 30
    assert_equal_trees(ck.restore(30, make_state()), state)
    ck.close()


def test_bit_flip_is_caught_by_checksum(tmp_path, capsys):
    d = tmp_path / "ck"
    save_steps(d, [1, 2])
    victim = largest_file(d / "2")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    ck = Checkpointer(d)
    assert ck.latest_good_step() == 1
    assert f"step 2 is damaged ({victim.relative_to(d / '2')} checksum mismatch); using step 1" in capsys.readouterr().err
    ck.close()


def test_incomplete_saves_are_skipped(tmp_path, capsys):
    """Killed after orbax's rename but before the seal (no manifest), and killed mid-write (tmp dir)."""
    d = tmp_path / "ck"
    save_steps(d, [1, 2, 3])
    (d / "3" / MANIFEST).unlink()
    (d / "2").rename(d / "4.orbax-checkpoint-tmp")
    ck = Checkpointer(d)
    assert ck.latest_good_step() == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert lines == [
        f"warning: checkpoint dir {d}: step 4 is incomplete (the save never finished); "
        "step 3 is incomplete (no manifest: the save never finished); using step 1"
    ]
    ck.close()


def test_no_good_checkpoint_is_an_error(tmp_path):
    d = tmp_path / "ck"
    save_steps(d, [5, 6])
    for s in (5, 6):
        largest_file(d / str(s)).unlink()
    ck = Checkpointer(d)
    with pytest.raises(CheckpointError) as e:
        ck.latest_good_step()
    msg = str(e.value)
    assert isinstance(e.value, ConfigError) and "\n" not in msg
    assert msg.startswith(f"checkpoint dir {d}: no intact checkpoint (step 6 is damaged (")
    assert "; step 5 is damaged (" in msg
    assert msg.endswith("set checkpoint.resume=false to start over")
    with pytest.raises(CheckpointError):
        ck.restore("latest", make_state())
    ck.close()


def test_empty_dir_has_no_latest(tmp_path):
    ck = Checkpointer(tmp_path / "ck")
    assert ck.latest_good_step() is None and not ck.has_checkpoints()
    with pytest.raises(CheckpointError, match="no checkpoint to restore"):
        ck.restore("latest", make_state())
    ck.close()


def test_keep_k_and_config_item(tmp_path):
    d = tmp_path / "ck"
    save_steps(d, [1, 2, 3, 4, 5], keep=2, async_save=True)
    assert sorted(p.name for p in d.iterdir()) == ["4", "5"]
    ck = Checkpointer(d)
    assert ck.check(4) is None and ck.check(5) is None
    assert ck.restore_config(5) == {"train": {"steps": 30}}
    ck.close()


def test_old_steps_go_only_after_a_newer_one_is_sealed(tmp_path, monkeypatch, capsys):
    """keep=1 and the seal of the new step fails (as if killed before sealing): the old step stays."""
    import framework.checkpoint as checkpoint

    d = tmp_path / "ck"
    ck = Checkpointer(d, keep=1, async_save=True)
    ck.save(1, make_state(seed=1))
    ck.wait()

    def disk_full(step_dir):
        raise OSError(f"no space left to seal {step_dir.name}")

    monkeypatch.setattr(checkpoint, "write_manifest", disk_full)
    ck.save(2, make_state(seed=2))
    with pytest.raises(OSError, match="no space left to seal 2"):
        ck.wait()  # the background error reaches the caller
    assert sorted(p.name for p in d.iterdir()) == ["1", "2"]
    assert ck.latest_good_step() == 1
    assert "step 2 is incomplete (no manifest: the save never finished); using step 1" in capsys.readouterr().err
    assert_equal_trees(ck.restore("latest", make_state())["params"], make_state(seed=1)["params"])
    monkeypatch.undo()
    ck.save(2, make_state(seed=2))  # the incomplete step 2 was moved aside by restore("latest")
    ck.save(3, make_state(seed=3))
    ck.close()
    assert sorted(p.name for p in d.iterdir() if p.name.isdigit()) == ["3"]


def test_time_based_saves_come_when_due_and_agree_at_few_steps(tmp_path, monkeypatch):
    """checkpoint.every_minutes: each save comes at the step that checking the time at every step picks, while
    the processes agree on the time (a broadcast that waits for the step in flight) only at check steps,
    about log2(n) + 2 per save of n steps. A new segment (another mesh, 4x slower, after a pause) measures its
    step rate anew: the rate of the segment before would put the next check (and the save) 8 steps late."""
    import math
    import time
    import types

    import framework.checkpoint as checkpoint

    clock = types.SimpleNamespace(now=0.0)  # a step takes what the test says, however loaded the machine is
    monkeypatch.setattr(checkpoint, "time", types.SimpleNamespace(monotonic=lambda: clock.now, time_ns=time.time_ns))
    agreed = []  # the broadcast every process joins (a no-op with one process): counted, values passed through
    monkeypatch.setattr(checkpoint, "from_primary", lambda values: agreed.append(values) or list(values))
    ck = Checkpointer(tmp_path / "ck", every_minutes=4 / 60, async_save=False)  # every 4 s
    interval, state = ck.every_minutes * 60, make_state()
    segments = [(0.125, 66, 0.0), (0.5, 30, 1.0)]  # (seconds per step, steps, pause before): 32 then 8 steps per interval
    saves, due, last, step, bound = [], [], 0.0, 0, 0.0
    for seconds, steps, pause in segments:
        clock.now += pause
        ck.new_segment()
        before = len(saves)
        for _ in range(steps):
            step += 1
            clock.now += seconds
            if clock.now - last >= interval:  # the oracle: checking every step
                due.append(step)
                last = clock.now
            if ck.should_save(step):
                saves.append(step)
                ck.save(step, state)
        bound += (len(saves) - before) * (math.log2(interval / seconds) + 3) + 2
    ck.close()
    assert saves == due == [32, 64, 72, 80, 88, 96], (saves, due)
    assert len(agreed) <= bound, (len(agreed), bound)


def test_wrong_target_is_one_line_error(tmp_path):
    d = tmp_path / "ck"
    save_steps(d, [1])
    ck = Checkpointer(d)
    wrong = make_state()
    wrong["params"]["embed"] = jnp.zeros((65, 32))
    with pytest.raises(CheckpointError, match=r"step 1 does not fit the target state") as e:
        ck.restore(1, wrong)
    assert "\n" not in str(e.value)
    ck.close()


def test_an_os_error_naming_no_file_names_the_step_being_saved(tmp_path):
    """A write or close that fails on a full disk names no file (seen in CI as a bare "error: No space left on
    device"); saving and sealing re-raise it naming the step directory. Named errors and others pass unchanged."""
    step_dir = tmp_path / "checkpoints" / "6"
    with pytest.raises(OSError) as e:
        with naming(step_dir):
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError as full:
                raise RuntimeError("orbax wraps it") from full
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(step_dir))
    named = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/elsewhere/file")
    with pytest.raises(OSError) as e:
        with naming(step_dir):
            raise named
    assert e.value is named
    with pytest.raises(ValueError, match="^not an OS error$"):
        with naming(step_dir):
            raise ValueError("not an OS error")
