"""Logical rules -> shardings, checked leaf by leaf on real sharded arrays."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from framework import sharding
from framework.train import Trainer
from tests.helpers import tiny_config


def test_logical_to_spec_rules():
    rules = sharding.rules_table([["embed", "fsdp"], ["mlp", "tensor"], ["batch", ["data", "fsdp"]], ["vocab", "tensor"]])
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    assert sharding.logical_to_spec(("embed", "mlp"), rules, sizes) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("batch", "length", "embed"), rules, sizes) == P(("data", "fsdp"))  # fsdp used once
    assert sharding.logical_to_spec(("vocab", "embed"), rules, sizes, shape=(50257, 768)) == P(None, "fsdp")  # uneven: whole
    assert sharding.logical_to_spec((None, "mlp"), rules, sizes) == P(None, "tensor")


def _device_bytes(tree) -> dict:
    per_device: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return per_device


def test_every_leaf_has_rule_sharding():
    cfg = tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    tr = Trainer(cfg)
    state = tr.init_state()
    specs = tr.abstract.specs
    rules = sharding.rules_table(cfg.sharding.param_rules)
    flat_axes = dict(jax.tree_util.tree_leaves_with_path(tr.abstract.logical_axes, is_leaf=lambda x: isinstance(x, tuple)))
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
        expected = sharding.logical_to_spec(flat_axes[path], rules, tr.axis_sizes, leaf.shape)
        assert leaf.sharding.spec == expected, jax.tree_util.keystr(path)
        assert leaf.sharding.mesh.shape == tr.mesh.shape
    # optimizer moments (adamw mu, nu) carry their parameter's spec; the step counter is replicated
    param_specs = dict(jax.tree_util.tree_leaves_with_path(specs.params, is_leaf=lambda x: isinstance(x, P)))
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state):
        tail = tuple(k for k in path if isinstance(k, jax.tree_util.DictKey))
        if tail in param_specs:
            assert leaf.sharding.spec == param_specs[tail], jax.tree_util.keystr(path)
        else:
            assert leaf.ndim == 0 and leaf.sharding.spec == P()
    assert any(leaf.sharding.spec == P("fsdp", "tensor") for leaf in jax.tree.leaves(state.opt_state))


def test_fully_sharded_holds_one_nth():
    # Llama style has no biases: every parameter has an 'embed' dimension, so fsdp=8 shards all of it.
    tr = Trainer(tiny_config("model.style=llama", "mesh.fsdp=8"))
    state = tr.init_state()
    total = sum(x.nbytes for x in jax.tree.leaves(state.params))
    per_device = _device_bytes(state.params)
    assert len(per_device) == 8 and set(per_device.values()) == {total // 8}
    assert sharding.bytes_per_device(tr.abstract.shapes.params, tr.abstract.specs.params, tr.axis_sizes) == total // 8
    # optimizer state: both Adam moments sharded the same way, plus replicated scalar counts
    opt = _device_bytes(state.opt_state)
    assert set(opt.values()) == {2 * total // 8 + sum(x.nbytes for x in jax.tree.leaves(state.opt_state) if x.ndim == 0)}


@pytest.mark.slow
def test_init_is_deterministic_across_meshes():
    a = Trainer(tiny_config("mesh.fsdp=8")).init_state()
    b = Trainer(tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")).init_state()
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
