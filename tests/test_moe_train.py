"""configs/moe_tiny.yaml trains (loss falls, routing metrics logged), and the same MoE run computes the same losses
(float32, 1e-5) with its experts on one device group or split over the ``expert`` axis, alone or with fsdp and tensor."""
import json

import numpy as np
import pytest

from framework.config import ConfigError, load_config
from framework.pipeline import check_stages
from framework.train import Trainer
from tests.helpers import ROOT, run_script

MOE_TINY = str(ROOT / "configs" / "moe_tiny.yaml")
SMALL = ["model.d_model=32", "model.n_heads=4", "model.moe.d_expert_mlp=32", "train.seq_len=32", "model.max_seq_len=32",
         "logging.progress=false", "logging.tensorboard=false", "checkpoint.every_minutes=0", "train.log_every=1"]


def _fit(*overrides, steps=12):
    cfg = load_config(MOE_TINY, [*SMALL, f"train.steps={steps}", *overrides])
    return Trainer(cfg).fit()


@pytest.fixture(scope="module")
def reference():
    return _fit("mesh.expert=1", "mesh.fsdp=8")


@pytest.fixture(scope="module")
def moe_tiny():
    return _fit()  # its own mesh: expert=4, fsdp=2


@pytest.mark.slow
def test_moe_tiny_trains_and_logs_routing_metrics(moe_tiny):
    records = moe_tiny
    losses = [r["loss"] for r in records]
    assert losses[-1] < losses[0] - 0.5
    last = records[-1]
    assert last["moe/dropped_fraction"] == 0.0 and 0 <= last["moe/load_min"] <= 1 <= last["moe/load_max"]
    assert last["moe/aux_loss"] >= 1.0 - 1e-6 and last["moe/z_loss"] > 0  # Switch loss is 1 at a perfect balance


@pytest.mark.slow
def test_losses_equal_with_experts_split_over_the_expert_axis(reference, moe_tiny):
    want = [r["loss"] for r in reference]
    np.testing.assert_allclose([r["loss"] for r in moe_tiny], want, rtol=1e-5)  # expert=4


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [["mesh.expert=2", "mesh.fsdp=4"], ["mesh.expert=2", "mesh.fsdp=2", "mesh.tensor=2"]])
def test_losses_equal_on_other_expert_meshes(reference, mesh):
    got = [r["loss"] for r in _fit(*mesh)]
    want = [r["loss"] for r in reference]
    assert want[-1] < want[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.slow
def test_moe_layers_inside_pipeline_stages_give_the_same_losses():
    """stage=2 x expert=2 x fsdp=2, MoE in every other layer (two groups of two layers per stage), two pipeline
    micro-batches: the per-sequence routing sums travel with their micro-batch through the stages."""
    layers = ["model.n_layers=4", "model.moe.every=2"]
    piped = _fit(*layers, "mesh.expert=2", "mesh.fsdp=2", "mesh.stage=2", "train.pipeline_microbatches=2", steps=3)
    flat = _fit(*layers, "mesh.expert=1", "mesh.fsdp=8", steps=3)
    np.testing.assert_allclose([r["loss"] for r in piped], [r["loss"] for r in flat], rtol=1e-5)
    assert piped[-1]["moe/aux_loss"] == pytest.approx(flat[-1]["moe/aux_loss"], rel=1e-5)


def test_a_stage_count_splitting_the_moe_pattern_unevenly_is_one_line():
    cfg = load_config(MOE_TINY, [*SMALL, "model.n_layers=4", "model.moe.every=2", "mesh.stage=2", "mesh.expert=1"])
    check_stages(cfg, 2)  # two groups over two stages: fine
    with pytest.raises(ConfigError, match=r"^mesh.stage=4 splits the MoE pattern unevenly: model.n_layers=4 / "
                                          r"model.moe.every=2 = 2 layer groups, not divisible by 4 stages$"):
        check_stages(cfg, 4)


def test_tryrun_layouts_split_the_experts_where_their_count_divides():
    from framework.tryrun import plan_layout, with_layout

    cfg = load_config(MOE_TINY, SMALL)  # 8 experts
    found = plan_layout(cfg, "vertical", 8, 1, 8)
    assert found.mesh == {"data": 1, "fsdp": 1, "expert": 8, "tensor": 1}
    assert with_layout(cfg, found).mesh.expert == 8
    six = load_config(MOE_TINY, [*SMALL, "model.moe.n_experts=6", "mesh.expert=2"])
    assert plan_layout(six, "vertical", 8, 2, 4).mesh == {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}
    dense = load_config(MOE_TINY, [*SMALL, "model.moe.n_experts=0", "mesh.expert=1"])
    assert plan_layout(dense, "vertical", 8, 1, 8).mesh == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.slow
@pytest.mark.parametrize("capacity", [0.0, 1.25])
def test_expert_plan_all_to_all_bytes_match_the_compiled_step(capacity):
    """The broadcast plan's MoE entry predicts the all-to-all bytes XLA compiled (collectives.count_compiled)."""
    from framework.broadcast.experts import plan_experts
    from framework.collectives import count_compiled

    cfg = load_config(MOE_TINY, [*SMALL, f"model.moe.capacity_factor={capacity}", "model.n_layers=3"])
    tr = Trainer(cfg)
    tr.compile()
    measured = count_compiled(tr.compiled_step, 8).by_kind()["all-to-all"]
    predicted = plan_experts(cfg, tr.axis_sizes, cfg.train.global_batch).all_to_all_bytes
    assert measured > 0 and predicted == measured


def test_plan_mixtral_on_256_devices_fits_80gb_with_total_and_active_params():
    r = run_script("plan.py", "--config", str(ROOT / "configs/mixtral_8x7b.yaml"), "--devices", "256", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["param_count"] == 46_702_792_704 and report["active_param_count"] == 12_879_925_248
    assert report["mesh"] == {"data": 1, "fsdp": 32, "expert": 8, "tensor": 1}
    assert report["memory"]["fits"] and report["memory"]["totals"]["device"] < 80e9 == report["memory"]["budget_bytes"]
    assert report["experts"]["mode"] == "expert-parallel" and report["experts"]["all_to_all_bytes"] > 0


def test_plan_expert_axis_not_dividing_the_experts_exits_2():
    r = run_script("plan.py", "--config", str(ROOT / "configs/mixtral_8x7b.yaml"), "--devices", "256", "mesh.expert=3")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: mesh.expert=3 does not divide model.moe.n_experts=8"


@pytest.mark.slow
def test_auto_placement_offloads_the_expert_optimizer_state_first():
    """memory.opt_state=auto with a budget the all-device step (2.77 MB per device) misses: the optimizer state,
    experts' moments included, goes to pinned_host, and the run trains."""
    cfg = load_config(MOE_TINY, [*SMALL, "train.steps=2", "memory.opt_state=auto", "memory.device_budget_bytes=2700000"])
    tr = Trainer(cfg)
    assert tr.memory_plan().to_dict()["placement"]["opt_state"] == "pinned_host"
    losses = [r["loss"] for r in tr.fit()]
    assert losses[1] < losses[0]
