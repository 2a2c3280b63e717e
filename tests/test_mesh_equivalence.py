"""The same run on different meshes computes the same losses (float32, 1e-4 relative), with tiny_lm's broadcast plan."""
import jax
import numpy as np
import pytest

from framework.train import Trainer
from tests.helpers import tiny_config

MESHES = {
    "1 device": (["mesh.fsdp=1"], 1),
    "data=8": (["mesh.data=8", "mesh.fsdp=1"], 8),
    "fsdp=8": (["mesh.fsdp=8"], 8),
    "tensor=8": (["mesh.fsdp=1", "mesh.tensor=8"], 8),
    "data=2,fsdp=2,tensor=2": (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], 8),
}


def losses(overrides, n_devices, steps=5):
    # tiny_lm's default plan (kernel mode over data*fsdp; none where the batch axes hold one device)
    tr = Trainer(tiny_config("broadcast.mode=auto", *overrides, steps=steps), devices=jax.devices()[:n_devices])
    return np.array([r["loss"] for r in tr.fit()])


@pytest.fixture(scope="module")
def reference():
    return losses(*MESHES["1 device"])


@pytest.mark.parametrize("name", [  # the fast subset keeps the mesh with every axis split
    pytest.param(m, marks=[] if m == "data=2,fsdp=2,tensor=2" else [pytest.mark.slow]) for m in MESHES if m != "1 device"])
def test_losses_equal_across_meshes(reference, name):
    got = losses(*MESHES[name])
    assert len(got) == 5 and reference[-1] < reference[0]
    np.testing.assert_allclose(got, reference, rtol=1e-4)


@pytest.mark.slow
def test_llama_scan_remat_sharded_equals_single_device():
    llama = ["model.style=llama", "model.n_kv_heads=4", "model.scan_layers=true"]
    single = losses([*llama, "mesh.fsdp=1"], 1, steps=3)
    sharded = losses([*llama, "model.remat=true", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], 8, steps=3)
    np.testing.assert_allclose(sharded, single, rtol=1e-4)
