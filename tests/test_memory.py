"""Memory tiers: planner bytes, placement policy, remat/offload policies, placements in training, micro-batch sizing."""
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import checkpoint_name

from framework import memory
from framework.config import ConfigError, MemoryConfig
from framework.mesh import MeshManager, describe
from framework.state import abstract_state
from framework.train import Trainer
from framework.train.objective import loss_for_config
from tests.helpers import SMALLER, ROOT, TINY, run_script, tiny_config

BATCH_AXES = ("data", "fsdp")
pytestmark = pytest.mark.gpu  # real pinned_host memory and transfers on a GPU (scripts/gpu_check.py)


# ------------------------------------------------------------------ policies and the HLO verifier


def _two_tags(w, x):
    h = checkpoint_name(jnp.sin(x @ w), "h")
    return checkpoint_name(jnp.cos(h @ w), "g")


def _loss_with(policy, scanned=False):
    layer = jax.checkpoint(_two_tags, policy=policy)
    if not scanned:
        return lambda w, x: layer(w, x).sum()

    def loss(ws, x):
        return jax.lax.scan(lambda c, w: (layer(w, c), None), x, ws)[0].sum()

    return loss


W = jax.ShapeDtypeStruct((16, 16), jnp.float32)
WS = jax.ShapeDtypeStruct((3, 16, 16), jnp.float32)
X = jax.ShapeDtypeStruct((4, 16), jnp.float32)


def test_policy_modes_and_per_name_map():
    tags = ["h", "g"]
    assert memory.activation_policy("save", {}, tags) is None
    assert memory.activation_policy("remat", {}, tags) is jax.checkpoint_policies.nothing_saveable
    assert memory.activation_choices("offload", {"g": "save"}, tags) == {"h": "offload", "g": "save"}
    with pytest.raises(ConfigError, match="memory.activation_names: nope not tagged by the model; tags: h, g"):
        memory.activation_choices("save", {"nope": "save"}, tags)


def test_verifier_finds_offload_in_cuda_hlo_and_none_without_it():
    offload = memory.activation_policy("offload", {}, ["h", "g"])
    check = memory.verify_offload(jax.grad(_loss_with(offload)), W, X)
    assert check.platform == "cuda" and check.to_host >= 1
    assert memory.verify_offload(jax.grad(_loss_with(jax.checkpoint_policies.nothing_saveable)), W, X).to_host == 0
    # lowered for the CPU the transfers are dropped: the reason the verifier lowers for cuda
    assert memory.verify_offload(jax.grad(_loss_with(offload)), W, X, platform="cpu").to_host == 0


def test_offload_inside_scanned_layers_is_in_the_program():
    offload = memory.activation_policy("offload", {"g": "remat"}, ["h", "g"])
    assert memory.verify_offload(jax.grad(_loss_with(offload, scanned=True)), WS, X).to_host >= 1


def test_a_name_is_never_both_saved_and_offloaded():
    # jax rejects the pitfall outright in this version; the builder gives each tag one choice
    with pytest.raises(ValueError, match="should not intersect"):
        jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=["h"], names_which_can_be_offloaded=["h"], offload_src="device", offload_dst="pinned_host")
    policy = memory.activation_policy("offload", {"g": "save"}, ["h", "g"])
    assert memory.verify_offload(jax.grad(_loss_with(policy)), W, X).to_host >= 1


@pytest.mark.parametrize("scan", [False, True])
def test_model_offload_policy_reaches_the_hlo(scan):
    cfg = tiny_config(f"model.scan_layers={str(scan).lower()}", "memory.activations=offload")
    axis_sizes = MeshManager(cfg.mesh).axis_sizes(8)
    base = abstract_state(cfg, axis_sizes)
    loss_for = loss_for_config(cfg, axis_sizes)
    tags = memory.model_tags(cfg, loss_for(None), base.shapes.params)
    assert tags == ["decoder_layer_input", "query_proj", "key_proj", "value_proj", "context", "out_proj", "mlp_hidden", "mlp_out"]
    tokens = {"tokens": jax.ShapeDtypeStruct((16, cfg.train.seq_len + 1), jnp.int32)}  # a batch: its fields
    grad = jax.grad(loss_for(memory.layer_policy(cfg, "offload", loss_for(None), base.shapes.params)))
    check = memory.verify_offload(grad, base.shapes.params, tokens)
    # 7 of the 8 tags per layer are residuals (one is only added to the residual stream, which backward never needs):
    # offloaded in each of the 4 unrolled layers, or once in the scan body
    assert check.to_host == (7 if scan else 4 * 7), check


# ------------------------------------------------------------------ planner numbers


def _needs(*overrides, n=64, accum=1):
    cfg = tiny_config(*overrides)
    axis_sizes = MeshManager(cfg.mesh).axis_sizes(n)
    abstract = abstract_state(cfg, axis_sizes)
    return memory.estimate_needs(cfg, abstract, axis_sizes, BATCH_AXES, accum, loss_for_config(cfg, axis_sizes)), \
        abstract, axis_sizes


@pytest.mark.slow
def test_mixed_precision_and_optimizer_change_the_numbers():
    over = ["train.global_batch=64"]
    f32, abstract, _ = _needs(*over)
    bf16_params, _, _ = _needs(*over, "train.param_dtype=bfloat16")
    assert bf16_params.params * 2 == f32.params and bf16_params.grads * 2 == f32.grads
    assert f32.opt_state == 2 * f32.params + 8  # adamw: two moments + int32 step counters (adam, schedule)
    assert bf16_params.opt_state == 2 * bf16_params.params + 8  # the moments follow the parameter dtype
    bf16_compute, _, _ = _needs(*over, "train.dtype=bfloat16")
    assert bf16_compute.params == f32.params
    assert bf16_compute.activations["save"][memory.DEVICE] < f32.activations["save"][memory.DEVICE]
    sgd, _, _ = _needs(*over, "optimizer.name=sgd", "optimizer.grad_clip=0")
    assert sgd.opt_state == f32.params + 4  # one momentum buffer + the schedule's counter
    accum, _, _ = _needs("train.global_batch=256", "train.grad_accum=4", accum=4)
    assert accum.grads == 2 * f32.grads and accum.batch == 4 * f32.batch == 4 * 129 * 4
    assert accum.activations == f32.activations  # one micro-batch of 64 at a time either way


def test_activation_modes_rank_as_expected():
    needs, _, _ = _needs("train.global_batch=64")
    save, remat, off = (needs.activations[m] for m in ("save", "remat", "offload"))
    assert remat[memory.DEVICE] < save[memory.DEVICE] and remat[memory.HOST] == 0
    assert off[memory.HOST] > 0 and off[memory.DEVICE] < save[memory.DEVICE]
    assert needs.activation_source.startswith("estimate:")


def _synthetic_needs():
    return memory.MemoryNeeds(
        params=100, grads=100, opt_state=200, batch=10,
        activations={"save": {"device": 300, "pinned_host": 0}, "remat": {"device": 50, "pinned_host": 0},
                     "offload": {"device": 60, "pinned_host": 240}},
        activation_source="test",
    )


AUTO = MemoryConfig(params="auto", opt_state="auto", activations="auto")


@pytest.mark.parametrize("budget, expected", [
    (710, ("device", "device", "save")),           # everything: 100+100+200+300+10
    (709, ("device", "pinned_host", "save")),      # opt_state first: 510
    (509, ("device", "pinned_host", "offload")),   # then activations: 270
    (269, ("pinned_host", "pinned_host", "offload")),  # then params: 170
])
def test_auto_offloads_in_order_and_stops_when_it_fits(budget, expected):
    plan = memory.plan_memory(AUTO, _synthetic_needs(), {"fsdp": 8}, budget)
    p = plan.placement
    assert (p.params, p.opt_state, p.activations) == expected
    assert plan.fits
    d = plan.to_dict()
    assert d["totals"]["device"] + d["totals"]["pinned_host"] >= 170
    assert set(d["bytes_per_device"]) == set(memory.CATEGORIES)
    assert d["figures"] == {"params": "exact", "grads": "estimated", "opt_state": "exact", "activations": "estimated",
                            "batch": "exact"}


def test_auto_when_nothing_fits_names_the_bytes_and_the_budget():
    with pytest.raises(ConfigError) as e:
        memory.plan_memory(AUTO, _synthetic_needs(), {"fsdp": 8}, 169)
    assert str(e.value) == (
        "memory: nothing fits the device budget of 169 B (memory.device_budget_bytes or the device's capacity): "
        "with opt_state, activations, params offloaded the step needs 170 B per device "
        "(params 0, grads 100, opt_state 0, activations 60, batch 10 B)")


def test_explicit_choices_are_kept_and_policy_is_subclassable():
    cfg = MemoryConfig(params="auto", opt_state="device", activations="auto")
    p = memory.plan_memory(cfg, _synthetic_needs(), {}, 509).placement
    assert (p.params, p.opt_state, p.activations) == ("device", "device", "offload")  # 710-240 = 470 fits
    assert p.reasons["opt_state"] == "set in config"

    class ParamsFirst(memory.PlacementPolicy):
        offload_order = ("params", "opt_state", "activations")

    p = memory.plan_memory(AUTO, _synthetic_needs(), {}, 650, ParamsFirst()).placement
    assert (p.params, p.opt_state, p.activations) == ("pinned_host", "device", "save")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="GPU/TPU report a capacity")
def test_auto_needs_a_budget_on_cpu():
    with pytest.raises(ConfigError) as e:
        memory.resolve_budget(MemoryConfig(opt_state="auto"), jax.devices())
    assert str(e.value) == ("memory.device_budget_bytes is required for auto placement/micro-batch on cpu "
                            "(jax reports no device memory capacity there)")
    assert memory.resolve_budget(MemoryConfig(), jax.devices()) is None
    assert memory.resolve_budget(MemoryConfig(opt_state="auto", device_budget_bytes=123), jax.devices()) == 123


# ------------------------------------------------------------------ training with placements


def _fit(*overrides, steps=5, check_kinds_at=2, n=8):
    tr = Trainer(tiny_config(*SMALLER, *overrides, steps=steps), devices=jax.devices()[:n])
    records = tr.fit(check_kinds_at)
    kinds = {c: {leaf.sharding.memory_kind for leaf in jax.tree.leaves(getattr(tr.state, c))} for c in ("params", "opt_state")}
    records += tr.fit()
    return tr, np.array([r["loss"] for r in records]), kinds


_REFERENCE: dict = {}


def all_device_losses(*model_overrides):
    """Losses of the all-device run of the same model (scanned layers initialise differently), cached."""
    if model_overrides not in _REFERENCE:
        _REFERENCE[model_overrides] = _fit(*model_overrides)[1]
    return _REFERENCE[model_overrides]


@pytest.fixture(scope="module")
def all_device():
    return all_device_losses()


PLACEMENTS = {
    "opt_state host": ["memory.opt_state=pinned_host"],
    "params host": ["memory.params=pinned_host"],
    "params+opt_state host, activations offload": ["memory.params=pinned_host", "memory.opt_state=pinned_host",
                                                   "memory.activations=offload"],
    "activations offload": ["memory.activations=offload"],
    "activations remat": ["memory.activations=remat"],
    "activations per name": ["memory.activations=remat", "memory.activation_names={mlp_hidden: offload, context: save}"],
    "scanned layers, offload": ["model.scan_layers=true", "memory.activations=offload", "memory.opt_state=pinned_host"],
    "scanned layers, params host, grad_accum 2": ["model.scan_layers=true", "memory.params=pinned_host", "train.grad_accum=2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_each_placement_trains_like_all_device(name):
    overrides = PLACEMENTS[name]
    reference = all_device_losses(*[o for o in overrides if o.startswith("model.")])
    tr, losses, kinds = _fit(*overrides)
    assert len(losses) == 5 and reference[-1] < reference[0]
    np.testing.assert_allclose(losses, reference, atol=1e-5, rtol=0)
    assert kinds == {"params": {tr.placement.params}, "opt_state": {tr.placement.opt_state}}
    wanted = {c: dict(o.split("=") for o in overrides).get(f"memory.{c}", "device") for c in ("params", "opt_state")}
    assert kinds == {c: {k} for c, k in wanted.items()}


class AllAtOnce(Trainer):
    """The failure the per-layer test guards against: parameters live in pinned_host but the whole
    tree is moved to the device at the start of the step (the model does not stream them)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.layout.stream_params = False  # the layout's placement, with the model that reads params where they are
        self.layout.abstract = abstract_state(self.cfg, self.axis_sizes)

    def train_step(self, state, batch):
        state = dataclasses.replace(state, params=jax.device_put(state.params, self.device_state_shardings.params))
        return super().train_step(state, batch)


def per_layer_fetches(trainer: Trainer) -> list[memory.OffloadCheck]:
    """Transfers inside the layer loops (forward, then backward) of the step lowered for cuda."""
    return memory.loop_body_transfers(trainer.lower(1, platform="cuda").as_text(), "cuda")


def test_streamed_params_are_fetched_per_layer():
    scanned = ["model.scan_layers=true", "memory.params=pinned_host"]
    tr = Trainer(tiny_config(*scanned))
    per_layer = len(jax.tree.leaves(tr.abstract.shapes.params["blocks"]))
    assert per_layer == 16
    # forward: each layer's 16 weights come to the device inside the loop body; backward: their gradients go back
    forward, backward = per_layer_fetches(tr)
    assert (forward.to_device, backward.to_host) == (per_layer, per_layer), (forward, backward)
    # with rematerialised layers the backward loop fetches the weights again, all but one bias (the
    # recomputation stops before the layer's last add, whose result backward never reads)
    forward, backward = per_layer_fetches(Trainer(tiny_config(*scanned, "memory.activations=remat")))
    assert (forward.to_device, backward.to_device) == (per_layer, per_layer - 1), (forward, backward)
    # the all-at-once variant moves the same bytes, but before the loops: none inside them (the old check,
    # transfers anywhere in the program, could not tell the two apart)
    all_at_once = AllAtOnce(tiny_config(*scanned))
    assert [c.to_device for c in per_layer_fetches(all_at_once)] == [0, 0]
    assert memory.count_transfers(all_at_once.lower(1, platform="cuda").as_text(), "cuda").to_device >= 68
    assert all(c == memory.OffloadCheck("cuda", 0, 0) for c in per_layer_fetches(Trainer(tiny_config("model.scan_layers=true"))))


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_planner_bytes_equal_real_shard_bytes():
    for overrides, n in ((["memory.opt_state=pinned_host"], 8),
                         (["memory.params=pinned_host", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                           "train.param_dtype=bfloat16"], 8),
                         (["optimizer.name=sgd", "mesh.fsdp=4"], 4)):
        tr = Trainer(tiny_config(*overrides), devices=jax.devices()[:n])
        state = tr.init_state()
        plan = tr.memory_plan(compiled_activations=False)
        for c in ("params", "opt_state"):
            assert memory.shard_bytes(getattr(state, c)) == plan.bytes[c], (overrides, c)
        # the same numbers without devices, from an abstract mesh of the same shape
        abstract = abstract_state(tr.cfg, describe(MeshManager(tr.cfg.mesh).abstract(n)))
        needs = memory.estimate_needs(tr.cfg, abstract, tr.axis_sizes, tr.batch_axes, 1, tr.loss_for)
        assert (needs.params, needs.opt_state) == (plan.bytes["params"][tr.placement.params],
                                                   plan.bytes["opt_state"][tr.placement.opt_state])


def _compiled_device_total(*overrides) -> int:
    return Trainer(tiny_config(*SMALLER, *overrides)).memory_plan().totals["device"]


AUTO_ALL = ["memory.params=auto", "memory.opt_state=auto", "memory.activations=auto"]


@pytest.mark.slow
def test_auto_with_tight_budget_offloads_in_order_on_the_compiled_step(all_device):
    everything = _compiled_device_total()
    opt_off = _compiled_device_total("memory.opt_state=pinned_host")
    acts_off = _compiled_device_total("memory.opt_state=pinned_host", "memory.activations=offload")
    assert everything > opt_off > acts_off
    tr, losses, kinds = _fit(*AUTO_ALL, f"memory.device_budget_bytes={opt_off}")  # fits once opt_state is offloaded
    p = tr.placement
    assert (p.opt_state, p.activations, p.params) == ("pinned_host", "save", "device")
    assert kinds == {"params": {"device"}, "opt_state": {"pinned_host"}}
    np.testing.assert_allclose(losses, all_device, atol=1e-5, rtol=0)

    tr = Trainer(tiny_config(*SMALLER, *AUTO_ALL, f"memory.device_budget_bytes={acts_off}"))
    p = tr.placement
    assert (p.opt_state, p.activations, p.params) == ("pinned_host", "offload", "device")
    plan = tr.memory_plan()
    assert plan.fits and plan.totals["device"] == acts_off
    assert plan.figures["activations"] == "compiled" and plan.activation_source.startswith("compiled")
    assert "exceeded the budget" in p.reasons["activations"] and "fit the budget" in p.reasons["params"]


@pytest.mark.slow
def test_auto_when_nothing_fits_exits_2_with_bytes_per_category(tmp_path):
    r = run_script("train.py", "--config", TINY, "--run-dir", str(tmp_path), *AUTO_ALL, "memory.device_budget_bytes=1000",
                   "train.steps=1", "train.seq_len=32", "train.global_batch=8")  # small: four placements are compiled
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in r.stderr
    assert re.fullmatch(r"error: memory: nothing fits the device budget of 1,000 B \(memory.device_budget_bytes or the "
                        r"device's capacity\): with opt_state, activations, params offloaded the step needs [\d,]+ B per "
                        r"device \(params 0, grads [\d,]+, opt_state 0, activations [\d,]+, batch 132 B\)", line), line


# ------------------------------------------------------------------ micro-batch and gradient accumulation


@pytest.mark.slow
def test_grad_accum_1x32_equals_4x8():
    one = _fit("train.global_batch=32", "train.micro_batch=32", check_kinds_at=1)[1]
    tr, four, _ = _fit("train.global_batch=32", "train.micro_batch=8", check_kinds_at=1)
    assert tr.cfg.train.grad_accum == 4 and tr.loader.global_shape == (4, 8, 33)
    np.testing.assert_allclose(four, one, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_micro_batch_auto_picks_largest_that_fits(capsys):
    sized = Trainer(tiny_config(*SMALLER, "train.global_batch=32", "train.micro_batch=16"))
    need16 = sized.memory_plan().totals["device"]
    tr = Trainer(tiny_config(*SMALLER, "train.global_batch=32", "train.micro_batch=auto", f"memory.device_budget_bytes={need16}"))
    tr.compile()  # the micro-batch is decided on the compiled step, at first use
    assert tr.cfg.train.grad_accum == 2 and tr.loader.global_shape == (2, 16, 33)
    assert f"train.micro_batch=auto: micro-batch 16 x grad_accum 2 (step needs {need16:,} B per device" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"^train.micro_batch=auto: no micro-batch fits memory.device_budget_bytes=1,000 "
                                          r"\(device bytes per micro-batch size: 32: [\d,]+ B; 16: [\d,]+ B; 8: [\d,]+ B\)$"):
        Trainer(tiny_config(*SMALLER, "train.global_batch=32", "train.micro_batch=auto", "memory.device_budget_bytes=1000")).compile()


# ------------------------------------------------------------------ scripts/plan.py


@pytest.mark.slow
def test_plan_memory_section_for_devices_we_do_not_have():
    # broadcast.mode=none: these figures are of XLA's own layouts (tiny_lm ships auto)
    r = run_script("plan.py", "--config", TINY, "--devices", "64", "--json", "train.global_batch=64",
                   "memory.opt_state=auto", "memory.activations=auto", "memory.device_budget_bytes=1000000",
                   "broadcast.mode=none")
    assert r.returncode == 0, r.stderr[-2000:]
    mem = json.loads(r.stdout)["memory"]
    assert mem["mesh"] == {"data": 1, "fsdp": 64, "tensor": 1}
    assert mem["activation_source"].startswith("estimate:")
    assert mem["placement"]["opt_state"] == "pinned_host" and mem["bytes_per_device"]["opt_state"]["device"] == 0
    assert mem["totals"]["device"] == sum(b["device"] for b in mem["bytes_per_device"].values())
    assert mem["fits"] == (mem["totals"]["device"] <= 1000000)

    r = run_script("plan.py", "--config", TINY, "--devices", "64", "memory.opt_state=auto", "broadcast.mode=none")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: memory.device_budget_bytes is required")


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_plan_memory_section_compiled_where_devices_exist():
    r = run_script("plan.py", "--config", TINY, "--devices", "8", "memory.opt_state=pinned_host", "broadcast.mode=none")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "memory per device" in r.stdout and "activations: compiled" in r.stdout
    assert "opt_state         0.00 MiB       0.83 MiB  exact     pinned_host (set in config)" in r.stdout
    assert re.search(r"activations +[\d.]+ MiB +0.00 MiB  compiled  save \(set in config\)\n", r.stdout), r.stdout


@pytest.mark.slow
def test_offloaded_state_checkpoints_and_resumes_in_its_memory_kind(tmp_path, all_device):
    host = ["memory.params=pinned_host", "memory.opt_state=pinned_host"]
    first = Trainer(tiny_config(*SMALLER, *host, steps=5), run_dir=tmp_path)
    head = [r["loss"] for r in first.fit(3)]  # stops (and checkpoints) at step 3 of the same 5-step schedule
    resumed = Trainer(tiny_config(*SMALLER, *host, steps=5), run_dir=tmp_path)
    resumed.state = resumed.restore_or_init()
    assert int(resumed.state.step) == 3
    for c in ("params", "opt_state"):
        assert {leaf.sharding.memory_kind for leaf in jax.tree.leaves(getattr(resumed.state, c))} == {"pinned_host"}
    tail = [r["loss"] for r in resumed.fit()]
    np.testing.assert_allclose(head + tail, all_device, atol=1e-5, rtol=0)
