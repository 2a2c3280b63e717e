"""Features written apart, checked together: an MoE model of layer groups decoded layer by layer, its routing loss
under target-weighted micro-batches, and packed documents through pipeline stages, and the try-run's candidates for an explicit broadcast mode."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest


from framework import generate
from framework.data.batch import eos_segments
from framework.tryrun.layouts import Gates
from framework.train import Trainer
from tests.helpers import loss_and_grads, tiny_config

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


def test_packed_documents_run_through_pipeline_stages_as_without_them():
    """Segment ids and positions travel with each micro-batch from stage to stage (they were refused before)."""
    overrides = ("model.style=llama", "model.scan_layers=true", "model.n_layers=2", "train.global_batch=4",
                 "train.pipeline_microbatches=2", "train.seq_len=16")
    tokens = np.random.default_rng(0).integers(1, 256, (4, 17), dtype=np.int32)
    tokens[:, 5::6] = 0  # an EOS every 6 tokens: three documents a row
    segment_ids, positions = eos_segments(tokens, 0)
    batch = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
    ref = Trainer(tiny_config(*overrides, "mesh.fsdp=1"), devices=jax.devices()[:1])
    params = jax.device_get(ref.init_state().params)
    want = loss_and_grads(ref, params, batch)
    staged = Trainer(tiny_config(*overrides, "mesh.stage=2", "mesh.fsdp=2"), devices=jax.devices()[:4])
    got = loss_and_grads(staged, params, batch)
    assert abs(float(got[0]) - float(want[0])) < 1e-5
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert _gates(packing="eos").pipeline_candidates(8, 2)  # and the try-run may propose stages for packed data


@pytest.mark.parametrize("mode", ["kernel", "map"])
def test_an_explicit_broadcast_mode_gets_no_context_or_pipeline_candidates(mode):
    gates = _gates(f"broadcast.mode={mode}", "train.global_batch=2")
    kinds = {c.kind for c in gates.over(8, 2)}
    assert not kinds & {"context", "pipeline"}
    assert {d["kind"] for d in gates.dropped if "broadcast.mode" in d["reason"]} == {"context", "pipeline"}
    assert {"context", "pipeline"} <= {c.kind for c in _gates("train.global_batch=2").over(8, 2)}
