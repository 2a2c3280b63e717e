"""Pipeline stages (mesh.stage): the same losses and gradients as the unpipelined model, each stage's devices
holding only their layers (as the planner says), checkpoints across stage counts, config errors."""
import dataclasses
import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from framework import memory, sharding
from framework.checkpoint import Checkpointer, abstract_target
from framework.config import ConfigError, load_config
from framework.mesh import MeshManager
from framework.pipeline import bubble_fraction
from framework.state import abstract_state, check_run
from framework.train import Trainer
from tests.helpers import loss_and_grads, ROOT, TINY, tiny_config

SMALL = ["model.n_layers=4", "model.d_model=32", "model.n_heads=4", "model.d_mlp=64", "model.max_seq_len=16",
         "train.seq_len=16", "train.global_batch=8", "model.scan_layers=true", "data.source=synthetic"]
CASES = {  # name: (overrides, devices)
    "stage=2": (["mesh.stage=2", "mesh.fsdp=1", "train.pipeline_microbatches=4"], 2),
    "stage=4": (["mesh.stage=4", "mesh.fsdp=1", "train.pipeline_microbatches=2"], 4),
    "stage=2,data=2,fsdp=2": (["mesh.stage=2", "mesh.data=2", "mesh.fsdp=2", "train.pipeline_microbatches=2"], 8),
    "stage=4,fsdp=2,remat": (["mesh.stage=4", "mesh.fsdp=2", "model.remat=true", "train.pipeline_microbatches=2"], 8),
    "stage=2,params in pinned_host": (["mesh.stage=2", "mesh.fsdp=1", "train.pipeline_microbatches=4",
                                       "memory.params=pinned_host"], 2),
}
_trainers = {}


def trainer(name):
    if name not in _trainers:
        overrides, n = CASES[name] if name in CASES else (["mesh.fsdp=1"], 1)
        _trainers[name] = Trainer(tiny_config(*SMALL, *overrides, steps=2), devices=jax.devices()[:n])
    return _trainers[name]


@pytest.fixture(scope="module")
def reference():
    tr = trainer("unpipelined")
    params = jax.device_get(tr.init_state().params)
    batch = np.random.default_rng(0).integers(0, 256, (8, 17), dtype=np.int32)
    return params, batch, loss_and_grads(tr, params, batch)


@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_gradients_equal_unpipelined(reference, name):
    params, batch, (ref_loss, ref_grads) = reference
    loss, grads = loss_and_grads(trainer(name), params, batch)
    assert abs(loss - ref_loss) < 1e-5
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
    assert len(flat_ref) == len(jax.tree.leaves(grads)) > 10
    for (path, want), got in zip(flat_ref, jax.tree.leaves(grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_each_stage_holds_only_its_layers_as_planned():
    tr = trainer("stage=4,fsdp=2,remat")
    state = tr.init_state()
    plan = memory.pipeline_plan(tr.cfg, tr.abstract, tr.axis_sizes, tr.batch_axes, tr.cfg.train.grad_accum,
                                tr.placement.params)
    assert [s.layers for s in plan.per_stage] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert plan.bubble_fraction == bubble_fraction(4, 2) == 3 / 5
    # the devices of stage s hold layer s of every stacked weight, and nothing of the other layers
    for s, stage_devices in enumerate(tr.mesh.devices):
        for leaf in jax.tree.leaves(state.params["blocks"]):
            for shard in leaf.addressable_shards:
                if shard.device in stage_devices.flat:
                    assert shard.index[0] == slice(s, s + 1)
    blocks_total = sum(x.nbytes for x in jax.tree.leaves(state.params["blocks"]))
    held = memory.shard_bytes(state.params["blocks"])["device"]
    assert held == sharding.bytes_per_device(tr.abstract.shapes.params["blocks"], tr.abstract.specs.params["blocks"],
                                             tr.axis_sizes) <= blocks_total // 4  # a quarter, less what fsdp splits too
    assert memory.shard_bytes(state.params)["device"] == plan.per_stage[0].param_bytes
    # the compiled step's inputs per device: this stage's params and optimizer state and its batch shard, no more
    compiled = tr.compiled_step
    batch_bytes = 8 * 17 * 4 // 2  # (grad_accum 1, 8 rows over fsdp 2, 17 tokens) int32
    assert compiled.memory_analysis().argument_size_in_bytes == memory.shard_bytes(state)["device"] + batch_bytes
    assert "collective-permute" in compiled.as_text()  # activations move stage to stage


def test_streamed_params_are_fetched_per_layer_inside_each_stage():
    """memory.params=pinned_host in a pipeline: each stage's layer loop brings its layer's weights to the device
    (and sends their gradients back) inside the loop body, in the program lowered for cuda (CPU drops the transfers)."""
    tr = trainer("stage=2,params in pinned_host")
    assert {s.memory_kind for s in jax.tree.leaves(tr.state_shardings.params)} == {"pinned_host"}
    per_layer = len(jax.tree.leaves(tr.abstract.shapes.params["blocks"]))
    loops = memory.loop_body_transfers(tr.lower(1, platform="cuda").as_text(), "cuda")
    ticks = 4 + 2 - 1  # M + S - 1: each tick runs both stages' layer loops (vmapped), forward then backward
    assert loops == ([memory.OffloadCheck("cuda", 0, per_layer)] * ticks  # forward: one layer's weights per iteration
                     + [memory.OffloadCheck("cuda", per_layer, 0)] * ticks), loops  # backward: its gradients to host


@pytest.mark.slow  # 20-30 s: the stage=2 step compiled twice (params on device, then streamed)
def test_params_auto_in_a_pipeline_measures_the_streamed_pipelined_step():
    """memory.params=auto with mesh.stage > 1: when the device step does not fit, the step with params streamed
    inside each stage's layer loop is compiled and measured (params 0 device bytes); here it does not fit either."""
    overrides, n = CASES["stage=2"]
    with pytest.raises(ConfigError, match=r"^memory: nothing fits the device budget of 1,000 B .* with params offloaded "
                                          r"the step needs [\d,]+ B per device \(params 0, grads [\d,]+, opt_state [1-9]"):
        Trainer(tiny_config(*SMALL, *overrides, "memory.params=auto", "memory.device_budget_bytes=1000", steps=2),
                devices=jax.devices()[:n]).compile()  # auto placement is decided on the compiled step, at first use


def test_checkpoint_restores_across_stage_counts(tmp_path):
    saver, targets = trainer("stage=2,data=2,fsdp=2"), [trainer("stage=4,fsdp=2,remat"), trainer("unpipelined")]
    rng = np.random.default_rng(1)
    values = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype) if x.dtype == np.float32
                          else np.full(x.shape, 3, x.dtype), saver.abstract.shapes)
    state = jax.device_put(values, saver.state_shardings)
    ck = Checkpointer(tmp_path / "ck")
    ck.save(3, state)
    ck.wait()
    for tr in targets:
        restored = ck.restore(3, abstract_target(tr.abstract.shapes, tr.state_shardings))
        leaves = zip(jax.tree_util.tree_leaves_with_path(values), jax.tree.leaves(restored), jax.tree.leaves(tr.state_shardings))
        for (path, want), got, placed in leaves:
            assert got.sharding.is_equivalent_to(placed, got.ndim)  # onto the other stage count's layout
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_fit_with_grad_accum_equals_unpipelined():
    """Through the framework's compiled step: pipelining inside each of 2 accumulated micro-batches, with
    tensor parallelism in each stage and the optimizer state in pinned_host (memory tiers)."""
    ref = Trainer(tiny_config(*SMALL, "mesh.fsdp=1", steps=2), devices=jax.devices()[:1]).fit()
    got = Trainer(tiny_config(*SMALL, "mesh.stage=2", "mesh.fsdp=2", "mesh.tensor=2", "train.pipeline_microbatches=2",
                              "train.grad_accum=2", "memory.opt_state=pinned_host", steps=2)).fit()
    assert got[0]["mesh"] == {"stage": 2, "data": 1, "fsdp": 2, "tensor": 2}
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in ref], atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["mesh.stage=3"], "model.n_layers=4 is not divisible by mesh.stage=3"),
    (["mesh.stage=2", "train.pipeline_microbatches=3"],
     "train.pipeline_microbatches=3 does not divide the micro-batch 16 (train.global_batch=16 / train.grad_accum=1)"),
    (["mesh.stage=2", "model.scan_layers=false"], "mesh.stage=2 needs model.name=transformer with model.scan_layers=true "
     "(the stages cut the stacked layers), got model.name=transformer model.scan_layers=False"),
    (["mesh.stage=0"], "mesh.stage=0: expected a positive number of pipeline stages or -1"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        check_run(load_config(TINY, ["model.scan_layers=true", *overrides]))
    assert str(e.value) == message


def test_pipeline_pieces_must_split_over_data_parallel_devices():
    with pytest.raises(ConfigError, match=r"^train.pipeline_microbatches=8 cuts the micro-batch 8 into pieces of 1 rows, "
                                          r"not divisible by the data-parallel size 2 \(mesh.data\*mesh.fsdp\)$"):
        Trainer(tiny_config(*SMALL, "mesh.stage=4", "mesh.fsdp=2", "train.pipeline_microbatches=8"))


def test_stage_fill_checks_layers():
    cfg = load_config(TINY, ["model.scan_layers=true", "mesh.stage=-1", "mesh.fsdp=1"])
    sizes = MeshManager(cfg.mesh).axis_sizes(8)
    assert sizes == {"stage": 8, "data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(ConfigError, match=r"^model.n_layers=4 is not divisible by mesh.stage=8$"):
        abstract_state(cfg, sizes)
    assert MeshManager(load_config(TINY, ["mesh.stage=1"]).mesh).axis_sizes(8) == {"data": 1, "fsdp": 8, "tensor": 1}


def test_tryrun_vertical_candidates_cut_more_stages(tmp_path):
    from framework.tryrun import TryRunController, format_decision

    cfg = tiny_config(*SMALL, "elastic.enabled=true", "train.pipeline_microbatches=2", steps=2)
    ctl = TryRunController(Trainer(cfg, run_dir=tmp_path, devices=jax.devices()[:2]))
    pipelined = [(c.mesh, c.grad_accum) for c in ctl.candidates(8, 1) if c.kind == "pipeline"]
    assert pipelined == [({"stage": 2, "data": 4, "fsdp": 1, "tensor": 1}, 1),
                         ({"stage": 2, "data": 2, "fsdp": 2, "tensor": 1}, 1),
                         ({"stage": 2, "data": 1, "fsdp": 4, "tensor": 1}, 1)]
    ctl.trainer = Trainer(dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, stage=2, fsdp=1)), run_dir=tmp_path,
                          devices=jax.devices()[:2])  # already 2 stages: the next count that divides 4 layers is 4
    ctl.dropped = []
    assert [c.mesh for c in ctl.candidates(8, 1) if c.kind == "pipeline"] == [
        {"stage": 4, "data": 2, "fsdp": 1, "tensor": 1}, {"stage": 4, "data": 1, "fsdp": 2, "tensor": 1}]
    assert ctl.dropped == [{"kind": "pipeline", "n_devices": 8, "split": 2,
                            "reason": "no stage count above 2 divides the split 2 and model.n_layers=4"}]
    row = {"kind": "pipeline", "mesh": {"stage": 4, "data": 1, "fsdp": 2, "tensor": 1}, "n_devices": 8, "grad_accum": 1,
           "samples_per_s": 10.0, "improvement": 0.1, "compile_s": 1.0, "source": "tryrun"}
    text = format_decision({"step": 4, "trigger": "startup", "available_devices": 8, "min_devices": 1,
                            "integer_multiple": True, "baseline": {**row, "kind": "baseline"}, "candidates": [row],
                            "chosen": row, "adopted": True, "threshold": 0.05, "max_useful_devices": 8,
                            "seconds": dict.fromkeys(["checkpoint", "tryrun_compile", "tryrun_restore",
                                                      "tryrun_measured", "restore", "total"], 0.0)})
    assert "  pipeline   s4:1x2x1          8" in text and "adopted pipeline s4:1x2x1 on 8 devices" in text


def test_plan_script_shows_each_stage(capsys, monkeypatch):
    """scripts/plan.py on devices we do not have (in-process: its planning is what is tested, not the interpreter)."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("plan_script", ROOT / "scripts" / "plan.py")
    plan_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan_script)
    args = ["--config", TINY, "--devices", "16", *SMALL, "mesh.stage=4", "mesh.data=2", "train.pipeline_microbatches=4"]
    plan_script.main([*args, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["mesh"] == {"stage": 4, "data": 2, "fsdp": 2, "tensor": 1}
    stages = report["pipeline"]["per_stage"]
    assert [s["layers"] for s in stages] == [[0, 0], [1, 1], [2, 2], [3, 3]]
    assert report["pipeline"]["bubble_fraction"] == 3 / 7 and report["pipeline"]["rows_per_microbatch"] == 2
    blocks = [p for p in report["params"] if p["name"].startswith("blocks/")]
    assert all(p["spec"][0] == "stage" for p in blocks)
    assert stages[0]["param_bytes"] == report["memory"]["bytes_per_device"]["params"]["device"]
    assert all(s["activation_bytes"] > 0 for s in stages)
    plan_script.main(args)
    text = capsys.readouterr().out
    assert "pipeline: 4 stages x 4 micro-batches of 2 rows (GPipe), bubble (S-1)/(M+S-1) = 42.9%" in text
    assert "(per device; params in device;" in text
    plan_script.main([*args, "memory.params=pinned_host", "--json"])  # streamed: the stage's param bytes are host bytes
    streamed = json.loads(capsys.readouterr().out)
    assert streamed["pipeline"]["param_memory"] == "pinned_host"
    assert streamed["pipeline"]["per_stage"][0]["param_bytes"] == streamed["memory"]["bytes_per_device"]["params"]["pinned_host"]


def test_generation_unstacks_a_pipelined_runs_params():
    """Decoding is not pipelined: a stage=2 run's params unstack onto its mesh, the stage axis replicating them."""
    from framework.generate import unstacked

    tr = trainer("stage=2,data=2,fsdp=2")
    values = jax.tree.map(lambda x: np.ones(x.shape, x.dtype), tr.abstract.shapes.params)
    dcfg, params, _ = unstacked(tr.cfg, jax.device_put(values, tr.state_shardings.params), tr.mesh)
    assert not dcfg.model.scan_layers and sorted(params["blocks"]) == [0, 1, 2, 3]
    assert params["blocks"][3]["mlp"]["fc_in"]["kernel"].sharding.spec == P("fsdp", "tensor")  # no stage: replicated over it


@pytest.mark.slow  # about 36 s of CPU (80 s wall on the loaded 2-core machine): 4 compiled steps
def test_tryrun_adopts_a_pipeline_candidate_and_training_continues(tmp_path):
    """The controller adopts a pipeline layout mid-run (scores fixed by a subclass, the framework's extension point):
    every step runs once, on the adopted mesh after the decision, with the losses of a fixed-mesh run."""
    from framework.tryrun import TryRunController
    from tests.test_tryrun import SMALL as TRYRUN_SMALL, read_log

    class PipelineWins(TryRunController):
        def score(self, trial):
            return 300.0 if trial.layout.kind == "pipeline" else 100.0

    steps = 4
    model = [*TRYRUN_SMALL, "model.scan_layers=true", "train.pipeline_microbatches=2"]
    fixed = Trainer(tiny_config(*model, steps=steps), devices=jax.devices()[:2]).fit()
    cfg = tiny_config(*model, "elastic.enabled=true", "elastic.device_schedule=[[0,2]]", "elastic.trigger=every_n_steps",
                      "elastic.every_n_steps=2", steps=steps)
    trainer = Trainer(cfg, run_dir=tmp_path, devices=jax.devices()[:2])
    records = PipelineWins(trainer).fit(steps)

    (decision,) = read_log(tmp_path)
    assert decision["step"] == 2 and decision["adopted"] is True
    assert decision["baseline"]["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
    assert decision["chosen"]["kind"] == "pipeline" and decision["chosen"]["mesh"] == {"stage": 2, "data": 1, "fsdp": 1,
                                                                                        "tensor": 1}
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [r["step"] for r in records] == list(range(1, steps + 1))
    assert [r["mesh"] for r in records] == [fixed[0]["mesh"]] * 2 + [decision["chosen"]["mesh"]] * 2
    np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in fixed], rtol=0, atol=1e-5)
    assert int(trainer.state.step) == steps and trainer.axis_sizes == decision["chosen"]["mesh"]
