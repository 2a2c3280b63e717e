"""Features written apart, checked together: an MoE model of layer groups decoded layer by layer, its routing loss
under target-weighted micro-batches, and the try-run's candidates for packed data or an explicit broadcast mode."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from framework import generate, pipeline
from framework.config import ConfigError
from framework.tryrun.layouts import Gates
from framework.train import Trainer
from tests.helpers import tiny_config

MOE_GROUPS = ("model.style=llama", "model.scan_layers=true", "model.n_layers=4", "model.d_model=32", "model.n_heads=2",
              "model.moe.n_experts=4", "model.moe.top_k=2", "model.moe.d_expert_mlp=16", "model.moe.every=2",
              "model.moe.aux_loss_weight=0.5", "mesh.fsdp=2", "train.global_batch=4", "train.seq_len=16")


def test_moe_layer_groups_unstack_layer_by_layer_and_their_routing_loss_is_not_weighed_by_targets():
    tr = Trainer(tiny_config(*MOE_GROUPS), devices=jax.devices()[:2])
    params = jax.device_get(tr.init_state().params)
    _, layers, _ = generate.unstacked(tr.cfg, params, tr.mesh)  # failed: the group stack was cut into n_layers pieces
    layers = jax.device_get(layers)
    for g in range(2):
        for j in range(2):
            want = jax.tree.map(lambda x, g=g: x[g], params["blocks"]["layers"][j])
            got = layers["blocks"][2 * g + j]
            for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
                np.testing.assert_array_equal(a, b)
    tokens = np.random.default_rng(0).integers(0, 256, (4, 17), dtype=np.int32)
    rng = jax.random.key_data(jax.random.key(0))
    loss, aux = jax.jit(lambda p, b: tr._shared_loss(p, b, rng, 0.0))(params, {"tokens": tokens})
    # a micro-batch holding no targets adds its routing loss, not 0 (the share weighs the cross-entropy alone)
    assert float(aux["moe/routing_loss"]) > 0 and float(loss) == pytest.approx(float(aux["moe/routing_loss"]), rel=1e-6)


def _gates(*overrides, packing="none"):
    cfg = tiny_config("model.scan_layers=true", "model.n_layers=2", *overrides)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, packing=packing))  # as a token store's run has it
    return Gates(cfg, {"data": 1, "fsdp": 2, "tensor": 1}, [])


def test_packed_documents_get_no_pipeline_candidates_nor_a_stage_count():
    gates = _gates(packing="eos")
    assert gates.pipeline_candidates(8, 2) == []
    assert [d["kind"] for d in gates.dropped] == ["pipeline"] and "segment ids" in gates.dropped[0]["reason"]
    assert any(c.mesh.get("stage", 1) > 1 for c in _gates().over(8, 2))  # without packing there are stage layouts
    with pytest.raises(ConfigError, match="data.packing=eos"):
        pipeline.check_stages(gates.cfg, 2)


@pytest.mark.parametrize("mode", ["kernel", "map"])
def test_an_explicit_broadcast_mode_gets_no_context_or_pipeline_candidates(mode):
    gates = _gates(f"broadcast.mode={mode}", "train.global_batch=2")
    kinds = {c.kind for c in gates.over(8, 2)}
    assert not kinds & {"context", "pipeline"}
    assert {d["kind"] for d in gates.dropped if "broadcast.mode" in d["reason"]} == {"context", "pipeline"}
    assert {"context", "pipeline"} <= {c.kind for c in _gates("train.global_batch=2").over(8, 2)}
