"""MeshManager: -1 fill, device subsets, abstract meshes, factorizations, multi-slice grouping."""
import jax
import pytest

from framework.config import ConfigError, MeshConfig
from framework.mesh import MeshManager, describe, factorizations


def test_fill_and_build():
    mm = MeshManager(MeshConfig(data=2, fsdp=-1, tensor=2))
    assert mm.axis_sizes(8) == {"data": 2, "fsdp": 2, "tensor": 2}
    mesh = mm.build()
    assert describe(mesh) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_subset_of_devices():
    devices = jax.devices()[:4]
    mesh = MeshManager(MeshConfig(data=2, fsdp=-1, tensor=1)).build(devices)
    assert describe(mesh) == {"data": 2, "fsdp": 2, "tensor": 1}
    assert set(mesh.devices.flat) == set(devices)


def test_abstract_mesh_any_size():
    am = MeshManager(MeshConfig(data=4, fsdp=-1, tensor=8)).abstract(1024)
    assert describe(am) == {"data": 4, "fsdp": 32, "tensor": 8}


def test_factorizations():
    f = factorizations(8)
    assert len(f) == 10 and {"data": 2, "fsdp": 2, "tensor": 2} in f and {"data": 1, "fsdp": 1, "tensor": 8} in f
    assert all(d["data"] * d["fsdp"] * d["tensor"] == 8 for d in f)
    assert len(factorizations(12)) == 18 and len(factorizations(1)) == 1


def test_multi_slice_groups_devices():
    # CPU devices have no slice_index: two contiguous groups of 4 stand in for two slices.
    mesh = MeshManager(MeshConfig(data=1, fsdp=-1, tensor=2, dcn_data=2)).build()
    assert describe(mesh) == {"data": 2, "fsdp": 2, "tensor": 2}
    ids = [[d.id for d in row.flat] for row in mesh.devices]
    assert sorted(ids[0]) == [0, 1, 2, 3] and sorted(ids[1]) == [4, 5, 6, 7]


def test_errors():
    with pytest.raises(ConfigError, match="multiplies to 6, expected the device count 8"):
        MeshManager(MeshConfig(data=3, fsdp=2, tensor=1)).axis_sizes(8)
    with pytest.raises(ConfigError, match="mesh.dcn_data=3 does not divide the 8"):
        MeshManager(MeshConfig(dcn_data=3)).axis_sizes(8)


def test_expert_and_context_axes_sit_between_fsdp_and_tensor_and_vanish_at_size_1():
    from framework.config import MeshConfig

    sizes = MeshManager(MeshConfig(data=1, fsdp=-1, expert=2, context=2, tensor=1)).axis_sizes(8)
    assert list(sizes.items()) == [("data", 1), ("fsdp", 2), ("expert", 2), ("context", 2), ("tensor", 1)]
    assert MeshManager(MeshConfig(fsdp=2, expert=-1, tensor=2)).axis_sizes(8) == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
    assert MeshManager(MeshConfig(fsdp=8, expert=-1)).axis_sizes(8) == {"data": 1, "fsdp": 8, "tensor": 1}  # filled to 1
    mesh = MeshManager(MeshConfig(fsdp=2, expert=2, context=2)).build()
    assert mesh.axis_names == ("data", "fsdp", "expert", "context", "tensor") and mesh.devices.shape == (1, 2, 2, 2, 1)
