"""Broadcast-mode layers equal the single-device layer; compression and the planner move real bytes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from framework import broadcast
from framework.collectives import count_compiled
from framework.config import BroadcastConfig
from models import ops

AXES = ("data", "fsdp")
# on a GPU machine the layers run where the collectives are real; every test but the one-device variant needs a
# 2 x 4 mesh (on one GPU that variant runs them on the device's memory kinds)
pytestmark = [pytest.mark.gpu]
needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")


def mesh_2x4():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), AXES, axis_types=(AxisType.Auto,) * 2)


def init(shapes, seed=0):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return {k: 0.3 * jax.random.normal(key, s, jnp.float32) for key, (k, s) in zip(keys, shapes.items())}


def cnn_forward(p, x):
    """conv -> relu -> conv -> relu -> pool -> dense(flatten) -> relu -> dense: every layer kind and hand-off."""
    h = jax.nn.relu(ops.conv(x, p["c1"], p["c1b"], name="c1", input_grad=False, chained=True))
    h = jax.nn.relu(ops.conv(h, p["c2"], p["c2b"], name="c2", chained=True))
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    h = jax.nn.relu(ops.dense(h, p["d1"], p["d1b"], name="d1", n_in=3, chained=True))
    return ops.dense(h, p["d2"], p["d2b"], name="d2")


PARAMS = {"c1": (3, 3, 2, 8), "c1b": (8,), "c2": (3, 3, 8, 16), "c2b": (16,), "d1": (4, 4, 16, 32), "d1b": (32,),
          "d2": (32, 16), "d2b": (16,)}


def loss(p, x):
    return jnp.mean(jnp.sin(cnn_forward(p, x)) ** 2)


def run(plan, mesh, p, x):
    def step(p, x):
        with broadcast.use_plan(plan, mesh):
            return jax.value_and_grad(loss)(p, x)
    if plan is None:
        return jax.jit(step)(p, x)
    shard = lambda spec: NamedSharding(mesh, spec)
    kspecs = broadcast.kernel_specs(plan)
    p_sh = {k: shard(kspecs[k.rstrip("b")][k.endswith("b")]) for k in p}
    return jax.jit(step, in_shardings=(p_sh, shard(PartitionSpec(AXES)))).lower(p, x).compile()(p, x)


def make(cfg, mesh, p, x):
    layers = broadcast.trace_layers(cnn_forward, p, x)
    return broadcast.make_plan(layers, mesh.size, AXES, cfg)


@pytest.mark.parametrize("cfg", [
    BroadcastConfig(mode="kernel"),
    BroadcastConfig(mode="map"),
    BroadcastConfig(mode="kernel", overrides={"c2": "map", "d1": "map"}),  # map->map hand-off in channel layout
    BroadcastConfig(mode="map", overrides={"re:d.*": "kernel"}),
], ids=["all-kernel", "all-map", "mixed-chain", "conv-map-dense-kernel"])
@pytest.mark.slow
@needs_8
def test_modes_equal_single_device(cfg):
    mesh = mesh_2x4()
    p, x = init(PARAMS), jax.random.normal(jax.random.key(1), (16, 8, 8, 2))
    plan = make(cfg, mesh, p, x)
    ref_loss, ref_grads = run(None, None, p, x)
    got_loss, got_grads = run(plan, mesh, p, x)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=0, atol=1e-5)
    for k in p:
        np.testing.assert_allclose(got_grads[k], ref_grads[k], rtol=0, atol=1e-5, err_msg=k)
    if cfg.overrides.get("c2") == "map":
        assert plan.get("c2").out_layout == "channel" and plan.get("d1").in_layout == "channel"
    assert plan.get("d2").mode == "kernel" or plan.get("d2").split_kernel  # 16 channels split over 8


def compiled_bytes(plan, mesh, p, x, fn=loss, wrt=(0,)):
    def step(p, x):
        with broadcast.use_plan(plan, mesh):
            return jax.value_and_grad(fn, argnums=wrt)(p, x)
    shard = lambda spec: NamedSharding(mesh, spec)
    kspecs = broadcast.kernel_specs(plan)
    p_sh = {k: shard(kspecs[k.rstrip("b")][k.endswith("b")]) for k in p}
    compiled = jax.jit(step, in_shardings=(p_sh, shard(PartitionSpec(AXES)))).lower(p, x).compile()
    return count_compiled(compiled, mesh.size)


@needs_8
def test_predicted_bytes_equal_measured_per_layer():
    mesh = mesh_2x4()
    p, x = init(PARAMS), jnp.zeros((16, 8, 8, 2))
    for cfg in (BroadcastConfig(mode="kernel"), BroadcastConfig(mode="map"), BroadcastConfig(mode="auto"),
                BroadcastConfig(mode="kernel", compress="bf16")):
        plan = make(cfg, mesh, p, x)
        report = compiled_bytes(plan, mesh, p, x)
        measured = report.by_layer()
        for layer in plan.layers:
            assert measured[layer.name] == layer.predicted_bytes, (cfg, layer.name)
        assert report.total - plan.total_bytes == report.by_layer()[None] <= 8  # only the loss's scalar all-reduce


@needs_8
def test_int8_cuts_kernel_gather_bytes():
    mesh = mesh_2x4()
    p, x = init(PARAMS), jnp.zeros((16, 8, 8, 2))
    gathered, types = {}, {}
    for compress in ("none", "int8"):
        plan = make(BroadcastConfig(mode="kernel", compress=compress), mesh, p, x)
        report = compiled_bytes(plan, mesh, p, x)
        gathered[compress] = report.select(kinds=["all-gather"])
        types[compress] = {}  # element type of the compiled all-gathers -> their bytes
        for op in report.ops:
            if op.kind == "all-gather":
                types[compress][op.dtype] = types[compress].get(op.dtype, 0) + op.bytes
        assert report.select(kinds=["reduce-scatter"]) == 35252  # gradients still travel in float32
    assert gathered["none"] == 35252 and types["none"] == {"f32": 35252}
    assert gathered["none"] / gathered["int8"] >= 3.5, gathered
    # the kernels really travel as s8 in the compiled program; float32 only for their per-channel scales
    assert set(types["int8"]) == {"s8", "f32"} and types["int8"]["s8"] >= 3 * types["int8"]["f32"], types


@needs_8
def test_int8_forward_close_to_float():
    mesh = mesh_2x4()
    p, x = init(PARAMS), jax.random.normal(jax.random.key(1), (16, 8, 8, 2))
    ref_loss, ref_grads = run(None, None, p, x)
    plan = make(BroadcastConfig(mode="kernel", compress="int8"), mesh, p, x)
    got_loss, got_grads = run(plan, mesh, p, x)
    assert abs(float(got_loss) - float(ref_loss)) < 1e-2 * float(ref_loss)
    assert float(jnp.abs(got_loss - ref_loss)) > 0  # the kernels really were quantised


def single_dense(p, x):
    return jnp.mean(ops.dense(x, p["w"], p["wb"], name="w") ** 2)


@pytest.mark.parametrize("batch,expected", [(48, "map"), (64, "kernel")])
@needs_8
def test_mode_flips_at_predicted_batch(batch, expected):
    """64x64 dense on P=8: kernel mode moves 2*(7/8)*16,640 B; map mode 2*(7/8)*288*B B: they cross at B=57.8."""
    mesh = mesh_2x4()
    p, x = init({"w": (64, 64), "wb": (64,)}), jnp.zeros((batch, 64))
    layers = broadcast.trace_layers(single_dense, p, x)
    auto = broadcast.make_plan(layers, 8, AXES, BroadcastConfig(mode="auto"))
    assert auto.get("w").mode == expected
    measured = {}
    for mode in ("kernel", "map"):
        plan = broadcast.make_plan(layers, 8, AXES, BroadcastConfig(mode=mode))
        measured[mode] = compiled_bytes(plan, mesh, p, x, fn=single_dense, wrt=(0, 1)).by_layer()["w"]
        assert measured[mode] == plan.total_bytes
    assert min(measured, key=measured.get) == expected, measured


@pytest.mark.parametrize("mode", ["kernel", "map"])
def test_one_device_runs_the_planned_layers_from_each_memory_kind(mode):
    """One device (a single GPU): the plan broadcasts nothing (every layer kernel, no collective in the program) and
    the step, its parameters held in each of the device's memory kinds and brought to device memory inside the
    step, gives the single-device reference's loss and gradients."""
    device = jax.devices()[0]
    mesh = Mesh(np.array([device]).reshape(1, 1), AXES, axis_types=(AxisType.Auto,) * 2)
    p, x = init(PARAMS), jax.random.normal(jax.random.key(1), (4, 8, 8, 2))
    reference = jax.jit(jax.value_and_grad(loss))(p, x)
    plan = make(BroadcastConfig(mode=mode), mesh, p, x)
    assert set(plan.modes().values()) == {"kernel"}
    on_device = NamedSharding(mesh, PartitionSpec(), memory_kind="device")

    def step(p, x):
        p = jax.device_put(p, {k: on_device for k in p})
        with broadcast.use_plan(plan, mesh):
            return jax.value_and_grad(loss)(p, x)

    kinds = [m.kind for m in device.addressable_memories()]
    assert {"device", "pinned_host"} <= set(kinds)
    for kind in kinds:
        held = {k: NamedSharding(mesh, PartitionSpec(), memory_kind=kind) for k in p}
        p_held = jax.device_put(p, held)
        compiled = jax.jit(step, in_shardings=(held, NamedSharding(mesh, PartitionSpec(AXES)))).lower(p_held, x).compile()
        assert count_compiled(compiled, 1).total == 0, kind
        out = compiled(p_held, x)
        for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(reference)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6, err_msg=kind)
