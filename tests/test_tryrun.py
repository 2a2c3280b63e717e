"""Try-run controller: candidates, adoption, and elastic runs that lose no step and repeat none."""
import dataclasses
import json
import math
import statistics
import sys
import time

import jax
import numpy as np
import pytest

from framework.checkpoint import Checkpointer
from framework.config import ConfigError
from framework.data import BatchLoader
from framework.train import Trainer
from framework.tryrun import Trial, TryRunController, devices_to_use, grad_accum_for, max_useful_devices, target_of
from tests.helpers import ROOT, TINY, run_script, tiny_config
from tests.test_distributed import run

# A small model so each try-run compiles in seconds on 2 shared cores.
SMALL = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.d_mlp=128", "train.seq_len=32",
         "model.max_seq_len=32", "data.source=synthetic", "elastic.tryrun_steps=2"]


def small(*overrides, steps=6):
    return tiny_config(*SMALL, *overrides, steps=steps)


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "tryrun.jsonl").read_text().splitlines()]


def n_devices(mesh: dict) -> int:
    return math.prod(mesh.values())


# ------------------------------------------------------------------ pure rules


def test_grad_accum_keeps_global_batch_and_divides_data_parallel():
    assert grad_accum_for(16, 8, 1) == 1
    assert grad_accum_for(16, 8, 4) == 2  # micro-batch 4 cannot split over 8: the nearest that can
    assert grad_accum_for(16, 4, 2) == 2  # the configured accumulation is kept when it works
    assert grad_accum_for(16, 6, 1) is None  # 16 samples never split evenly over 6
    assert grad_accum_for(24, 6, 1) == 1
    assert grad_accum_for(16, 32, 1) is None


def test_max_useful_devices_is_where_gains_stop_passing_threshold():
    assert max_useful_devices({2: 100.0, 4: 190.0, 8: 195.0}, 0.05) == 4
    assert max_useful_devices({2: 100.0, 4: 104.0, 8: 130.0}, 0.05) == 8
    assert max_useful_devices({}, 0.05) is None


def test_integer_multiple_rule_and_max_devices(tmp_path):
    cfg = small("train.global_batch=24", "elastic.enabled=true", "elastic.min_devices=2", "elastic.max_devices=4")
    ctl = TryRunController(Trainer(cfg, run_dir=tmp_path))

    both = ctl.candidates(6, 2)  # 6 is a multiple of 2: horizontal and vertical
    assert [(c.kind, c.mesh) for c in both] == [
        ("horizontal", {"data": 3, "fsdp": 2, "tensor": 1}),
        ("vertical", {"data": 2, "fsdp": 3, "tensor": 1}),
        ("vertical", {"data": 1, "fsdp": 6, "tensor": 1}),
    ]
    only_vertical = ctl.candidates(6, 4)  # 6 is not a multiple of 4: the model is split over all 6
    assert [(c.kind, c.mesh) for c in only_vertical] == [("vertical", {"data": 1, "fsdp": 6, "tensor": 1})]
    assert all(c.grad_accum == 1 and n_devices(c.mesh) == 6 for c in both + only_vertical)

    assert len(ctl.available_devices(0)) == 8 and len(ctl.usable_devices(0)) == 4  # elastic.max_devices=4
    assert all(c.n_devices <= 4 for c in ctl.candidates(len(ctl.usable_devices(0)), 2))


def test_candidates_adapt_accumulation_and_skip_what_the_batch_cannot_split(tmp_path):
    cfg = small("train.grad_accum=4", "mesh.tensor=2", "elastic.enabled=true", "elastic.min_devices=1")
    ctl = TryRunController(Trainer(cfg, run_dir=tmp_path))
    got = {(c.kind, tuple(c.mesh.values()), c.grad_accum) for c in ctl.candidates(8, 1)}
    # data=8 needs micro-batches of 8: accumulation drops from 4 to 2; the current tensor=2 is kept where it fits
    assert got == {("horizontal", (8, 1, 1), 2), ("vertical", (4, 1, 2), 4), ("vertical", (2, 2, 2), 4),
                   ("vertical", (1, 4, 2), 4)}
    # global batch 16 over 6: a batch split of 3 or 6 never divides 16, and a tensor size of 3 or 6 does not
    # divide the 4 heads, so no layout runs on 6 (nor on 5); each one left out is noted with why, and the
    # candidates are those over 4, the most devices a layout fits (2 left idle)
    fewer = ctl.candidates(6, 1)
    assert fewer and {c.n_devices for c in fewer} == {4}
    assert {d["split"] for d in ctl.dropped if d["n_devices"] == 6} == {1, 2, 3, 6}
    assert {d["n_devices"] for d in ctl.dropped} == {5, 6}


def test_every_dropped_candidate_is_noted_with_its_reason(tmp_path):
    ctl = TryRunController(Trainer(small("elastic.enabled=true"), run_dir=tmp_path))  # batch 16, 4 heads, d_mlp 128
    assert {c.n_devices for c in ctl.candidates(6, 1)} == {4}  # none over 6 (or 5): over 4, 2 idle
    reasons = {(d["kind"], d["split"]): d["reason"] for d in ctl.dropped if d["n_devices"] == 6}
    # the horizontal candidate (6 replicas) cannot split the batch: noted, not silently gone
    assert reasons[("horizontal", 1)] == "train.global_batch=16 does not split over data-parallel size 6 (tensor=1)"
    assert "tensor=3 does not divide model.n_heads=4, model.n_kv_heads=4, model.d_mlp=128" in reasons[("vertical", 3)]
    ctl.dropped = []
    ctl.candidates(6, 4)
    assert ctl.dropped[0] == {"kind": "horizontal", "n_devices": 6, "split": 4,
                              "reason": "6 devices are not a multiple of 4"}

    layout = ctl.current_layout(ctl.trainer)
    trial = Trial(layout, 80.0, "tryrun", compile_s=1.0, restore_s=0.5, measure_s=0.5, samples=48)
    assert ctl.score(trial) == 80.0  # elastic.objective=throughput
    assert trial.record()["samples_per_total_s"] == 24.0 and trial.record()["samples_per_s_per_device"] == 10.0
    ctl.elastic = dataclasses.replace(ctl.elastic, objective="efficiency")
    assert ctl.score(trial) == 80.0 / layout.n_devices


def test_devices_past_the_max_useful_count_stay_idle_once_measured():
    measured = {4: 100.0, 8: 102.0}
    assert devices_to_use(measured, 0.05, 8) == 4  # 8 was measured and adds under 5%: 4 are left idle
    assert devices_to_use(measured, 0.01, 8) == 8
    assert devices_to_use({4: 100.0}, 0.05, 8) == 8  # 8 never measured: try it


def test_triggers(tmp_path):
    cfg = small("elastic.enabled=true", "elastic.trigger=every_n_steps", "elastic.every_n_steps=5",
                "elastic.device_schedule=[[0,8],[7,4]]")
    ctl = TryRunController(Trainer(cfg, run_dir=tmp_path))
    assert [s for s in range(12) if ctl.triggered(s)] == [5, 7, 8, 9, 10, 11]  # every 5th, and from 7 on: 4 != 8 devices
    ctl._seen_available = 4  # as after the decision at step 7
    assert [s for s in range(7, 16) if ctl.triggered(s)] == [10, 15]
    assert [d.id for d in ctl.available_devices(7)] == [d.id for d in jax.devices()[:4]]


def test_min_devices_auto_from_the_device_budget(tmp_path):
    base = small("elastic.enabled=true")
    trainer = Trainer(base, run_dir=tmp_path)
    params = trainer.abstract.param_count * 4  # float32
    whole = 4 * params + 8  # params, grads, two AdamW moments, two int32 counts (AdamW, schedule): on one device
    for budget, expected in ((whole, 1), (whole - 1, 2)):
        cfg = small("elastic.enabled=true", f"memory.device_budget_bytes={budget}")
        assert TryRunController(Trainer(cfg, run_dir=tmp_path)).min_devices(8) == expected, budget
    never = small("elastic.enabled=true", "memory.device_budget_bytes=1")  # the unsplit counters alone exceed it
    with pytest.raises(ConfigError, match=r"^elastic: the model state does not fit memory.device_budget_bytes=1 on any "
                                          r"count up to 4096 devices$"):
        TryRunController(Trainer(never, run_dir=tmp_path)).min_devices(8)
    cfg = small("elastic.enabled=true", f"memory.device_budget_bytes={whole // 5}", "elastic.device_schedule=[[0,4]]",
                "elastic.wait_timeout_s=0.5")
    tight = Trainer(cfg, run_dir=tmp_path, devices=jax.devices()[:4])
    tight.state = tight.init_state()
    need = TryRunController(tight).min_devices(4)  # past the 4 there are: what to wait (or ask the launcher) for
    assert need >= 5 and need == TryRunController(tight).min_devices(8)
    # after a shrink: the state is saved, the controller waits for more devices, then names the shortfall
    with pytest.raises(ConfigError, match=rf"^elastic: one model replica needs {need} devices \(elastic.min_devices=auto: "
                                          rf"the fewest over which its state fits memory.device_budget_bytes\), only 4 "
                                          rf"available: {need - 4} short after waiting 0.5 s \(elastic.wait_timeout_s\)$"):
        TryRunController(tight).decide(tight, 0, "test")
    assert Checkpointer(tmp_path / "checkpoints").latest_good_step() == 0


def test_elastic_config_errors():
    with pytest.raises(ConfigError, match=r"elastic.device_schedule\[0\]"):
        small("elastic.device_schedule=[[0]]")
    with pytest.raises(ConfigError, match="elastic.min_devices=0"):
        small("elastic.min_devices=0")


# ------------------------------------------------------------------ adoption


class FixedScore(TryRunController):
    """Deterministic scores: the baseline 100 samples/s, every candidate 100 * (1 + gain)."""

    gain = 0.0

    def score(self, trial: Trial) -> float:
        return 100.0 if trial.layout.kind == "baseline" else 100.0 * (1 + self.gain)


@pytest.mark.slow
def test_adoption_threshold_with_deterministic_score(tmp_path):
    cfg = small("elastic.enabled=true", "elastic.min_devices=2", "elastic.threshold=0.05",
                "elastic.device_schedule=[[0,4]]")
    trainer = Trainer(cfg, run_dir=tmp_path, devices=jax.devices()[:4])
    trainer.state = trainer.init_state()
    ctl = FixedScore(trainer)

    ctl.gain = 0.04  # below the threshold: keep the baseline
    kept = ctl.decide(trainer, 0, "test")
    ctl.gain = 0.10  # above: adopt the (only) candidate
    adopted = ctl.decide(kept, 0, "test")

    first, second = read_log(tmp_path)
    assert first["adopted"] is False and kept is trainer and kept.axis_sizes == {"data": 1, "fsdp": 4, "tensor": 1}
    assert [c["kind"] for c in first["candidates"]] == ["horizontal"]
    assert first["candidates"][0]["improvement"] == pytest.approx(0.04)
    assert second["adopted"] is True and second["chosen"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert adopted.axis_sizes == {"data": 2, "fsdp": 2, "tensor": 1}
    assert second["candidates"][0]["compile_s"] < first["candidates"][0]["compile_s"]  # compiled step reused
    # the adopted trainer holds the checkpointed state, not a try-run's: the live state resharded in memory
    # (no orbax read), bit for bit the values saved
    assert int(adopted.state.step) == 0 and int(adopted.state.data_pos) == 0
    assert first["state_from"] == second["state_from"] == "live" and second["seconds"]["checkpoint_restore"] == 0
    saved = Checkpointer(tmp_path / "checkpoints").restore(0, target_of(adopted))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(adopted.state)))
    for key in ("trigger", "step", "available_devices", "min_devices", "integer_multiple", "baseline",
                "candidates", "chosen", "adopted", "checkpoint_step", "seconds", "max_useful_devices"):
        assert key in second
    assert second["min_devices"] == 2 and second["integer_multiple"] is True and second["available_devices"] == 4


@pytest.mark.slow  # ~20 s of CPU: compiling two layouts of the small model
def test_layouts_seen_before_run_no_warmup_step_live_or_tried(tmp_path):
    # A compiled step that has run in this process needs no warm-up step (the warm-up is for first-run effects):
    # a decision among layouts seen before runs tryrun_steps steps per candidate and compiles nothing, and live
    # segments on a mesh that has run follow the same rule, so both stay measured alike.
    cfg = small("elastic.enabled=true", "elastic.min_devices=2", "elastic.trigger=every_n_steps",
                "elastic.every_n_steps=3", "elastic.device_schedule=[[0,4]]", steps=9)
    trainer = Trainer(cfg, run_dir=tmp_path, devices=jax.devices()[:4])
    ctl = FixedScore(trainer)
    ctl.fit(9)  # every candidate scores as the baseline: the mesh is kept
    # the candidates share the run's checkpointer (one last-save time, one orbax manager on the directory)
    assert len(ctl._trainers) == 2 and all(t.checkpointer is ctl.checkpoints for t in ctl._trainers.values())

    first, second = read_log(tmp_path)
    batch, tried = cfg.train.global_batch, cfg.elastic.tryrun_steps
    (new,), (seen,) = first["candidates"], second["candidates"]
    assert new["mesh"] == seen["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    samples = lambda row: row["samples_per_total_s"] * (row["compile_s"] + row["restore_s"] + row["measure_s"])
    assert samples(new) == pytest.approx((1 + tried) * batch)  # compiled at this trigger: one warm-up step
    assert samples(seen) == pytest.approx(tried * batch)  # seen before: the measured steps and no other
    assert (new["warmup_steps"], new["measured_steps"]) == (1, tried)
    assert (seen["warmup_steps"], seen["measured_steps"]) == (0, tried)
    assert seen["compile_s"] < new["compile_s"] and second["seconds"]["tryrun_compile"] < new["compile_s"]
    # live: the first segment (steps 1-3) warms its fresh step up, the one after the kept decision (4-6) does not
    assert (first["baseline"]["source"], first["baseline"]["warmup_steps"], first["baseline"]["measured_steps"]) == \
        ("rolling", 1, 2)
    assert (second["baseline"]["warmup_steps"], second["baseline"]["measured_steps"]) == (1, 2 + 3)
    assert not first["adopted"] and not second["adopted"]


# ------------------------------------------------------------------ elastic runs


@pytest.mark.slow
def test_device_schedule_8_4_6_8_equals_fixed_mesh(tmp_path, capsys):
    steps = 12
    fixed = Trainer(small(steps=steps)).fit()
    cfg = small("elastic.enabled=true", "elastic.min_devices=4",
                "elastic.device_schedule=[[0,8],[3,4],[6,6],[9,8]]", steps=steps)
    trainer = Trainer(cfg, run_dir=tmp_path / "elastic")
    elastic = TryRunController(trainer).fit()

    assert [r["step"] for r in elastic] == list(range(1, steps + 1))  # none lost, none repeated
    np.testing.assert_allclose([r["loss"] for r in elastic], [r["loss"] for r in fixed], rtol=1e-4, atol=1e-4)
    available = {s: n for s, n in [(0, 8), (3, 4), (6, 6), (9, 8)]}
    for r in elastic:
        allowed = available[max(s for s in available if s < r["step"])]
        assert n_devices(r["mesh"]) <= allowed, r

    decisions = read_log(tmp_path / "elastic")
    assert [(d["step"], d["available_devices"], d["integer_multiple"]) for d in decisions] == [
        (3, 4, True), (6, 6, False), (9, 8, True)]
    # devices lost: the try-runs start from the checkpoint (read once); devices added: from the live state
    assert [d["state_from"] for d in decisions] == ["checkpoint", "live", "live"]
    assert decisions[1]["seconds"]["checkpoint_restore"] == decisions[2]["seconds"]["checkpoint_restore"] == 0
    # 6 devices, 4 per replica: no horizontal candidate, and the one vertical split (6) runs no layout (batch 16
    # over 6 or 3, tensor 3 or 6 over 4 heads); nor does any over 5: both counts are in the log with their
    # reasons, and the candidates are the layouts over 4 (the live mesh's among them: not tried again), 2 idle
    dropped = [(d["n_devices"], d["kind"], d["split"]) for d in decisions[1]["dropped"]]
    assert dropped == [(6, "horizontal", 4), (6, "vertical", 6), (5, "horizontal", 4), (5, "vertical", 5)]
    assert decisions[1]["dropped"][0]["reason"] == "6 devices are not a multiple of 4"
    assert "tensor=3 does not divide model.n_heads=4" in decisions[1]["dropped"][1]["reason"]
    assert {c["n_devices"] for c in decisions[1]["candidates"]} <= {4} and decisions[1]["chosen"]["n_devices"] == 4
    assert decisions[1]["idle_devices"] == 2 and "no layout over 6 devices fits" in decisions[1]["idle_reason"]
    assert {c["kind"] for c in decisions[2]["candidates"]} == {"horizontal", "vertical"}
    for d in decisions:  # real timings: the adopted one is the best measured past the threshold
        passing = [c for c in d["candidates"] if c["improvement"] > d["threshold"]]
        if passing:
            best = max(passing, key=lambda c: c["samples_per_s"])
            assert d["adopted"] and d["chosen"]["mesh"] == best["mesh"] and d["chosen"]["n_devices"] == best["n_devices"]
        else:
            assert not d["adopted"] and d["chosen"] == d["baseline"]
        assert d["checkpoint_step"] == d["step"]
    assert int(trainer.state.step) == steps and int(trainer.state.data_pos) == steps
    assert "try-run at step 6 (device_change): 6 devices available" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_on_fewer_devices_runs_the_controller_at_startup(tmp_path):
    steps, saved_at = 8, 4
    reference = Trainer(small(steps=steps))  # 8 devices, fsdp=8
    first = reference.fit(saved_at)
    store = Checkpointer(tmp_path / "checkpoints")
    store.save(saved_at, reference.state)
    store.close()
    rest = reference.fit(steps)  # the uninterrupted run, for comparison

    # 6 devices: the config's fsdp=-1 would split the batch of 16 six ways, which cannot work
    r = run_script("train.py", "--config", TINY, "--run-dir", str(tmp_path), "--cpu-devices", "6",
                   *SMALL, f"train.steps={steps}", "logging.progress=false", "elastic.enabled=true",
                   "elastic.min_devices=2")
    assert r.returncode == 0, r.stderr[-3000:]
    (decision,) = read_log(tmp_path)
    # the config's mesh does not fit 6 devices: a decision among the layouts that do (trigger misfit)
    assert (decision["trigger"], decision["step"], decision["available_devices"]) == ("misfit", saved_at, 6)
    resumed = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in resumed] == list(range(saved_at + 1, steps + 1))
    # no layout runs on all 6 (batch 16 over 6 or 3; tensor 3 or 6 over 4 heads): the candidates are those over 4
    # of them, and the decision logs why each layout over 6 was left out
    assert {c["n_devices"] for c in decision["candidates"]} <= {4} and decision["idle_devices"] == 2
    assert {d["split"] for d in decision["dropped"] if d["n_devices"] == 6} == {2, 3, 6}
    assert all(n_devices(rec["mesh"]) == 4 == decision["chosen"]["n_devices"] for rec in resumed)
    np.testing.assert_allclose([rec["loss"] for rec in resumed], [rec["loss"] for rec in rest], rtol=1e-4, atol=1e-4)
    assert len(first) == saved_at and f"done: step {steps}" in r.stdout


@pytest.mark.slow
def test_processes_follow_process_0_decisions_when_their_scores_differ(tmp_path):
    # 2 processes x 4 devices; from step 2 only 4 devices (2 from each process). On its own, process 0
    # would adopt the horizontal candidate and process 1 keep the baseline (tests/tryrun_worker.py).
    steps, schedule = 4, "elastic.device_schedule=[[0,8],[2,4]]"
    overrides = [*SMALL, "elastic.enabled=true", "elastic.min_devices=2", "elastic.threshold=0.5", schedule]
    r = run([sys.executable, str(ROOT / "scripts" / "launch_local.py"), "--processes", "2", "--devices-per-process", "4",
             "--", str(ROOT / "tests" / "tryrun_worker.py"), "--run-dir", str(tmp_path / "elastic"),
             "--steps", str(steps), *overrides], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = {p: json.loads(line.split("result ", 1)[1]) for p in ("p0", "p1")
               for line in r.stdout.splitlines() if line.startswith(f"[{p}] result ")}
    assert results["p0"] == results["p1"]
    (decision,) = read_log(tmp_path / "elastic")
    assert (decision["step"], decision["available_devices"], decision["adopted"]) == (2, 4, True)
    assert decision["baseline"]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert decision["chosen"]["kind"] == "horizontal" and decision["chosen"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert results["p1"]["chosen"] == [decision["chosen"]["mesh"]]
    assert results["p1"]["meshes"] == [{"data": 1, "fsdp": 8, "tensor": 1}] * 2 + [{"data": 2, "fsdp": 2, "tensor": 1}] * 2

    fixed = Trainer(small(steps=steps)).fit()
    np.testing.assert_allclose(results["p0"]["losses"], [rec["loss"] for rec in fixed], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ fairness and cost


class SteadyStep(Trainer):
    """Each step first waits 80 ms on the host, while the step before runs: a step long against timing noise,
    whose length does not follow the load other processes put on the shared cores."""

    def step(self, state, batch):
        time.sleep(0.08)
        return super().step(state, batch)


class SlowStart(BatchLoader):
    """Its batch at position ``slow_at`` takes 1 s to build, as a loop's first batch may (grain's threads start,
    a cold source)."""

    def __init__(self, loader: BatchLoader, slow_at: int):
        vars(self).update(vars(loader))
        self.slow_at = slow_at

    def host_batch(self, position):
        if position == self.slow_at:
            time.sleep(1.0)
        return super().host_batch(position)


@pytest.mark.slow  # 15-60 s: mostly compiling the init and the step on the shared cores
def test_tryrun_of_the_current_mesh_scores_as_its_live_steps(tmp_path):
    # Live steps and try-run steps are run and timed by one loop (Trainer.run_steps), on the same data path and
    # warm-up rule: on an unchanged device set a try-run of the current mesh measures what the live rolling
    # baseline measured. Several decisions, each a live segment then a try-run; the median ratio decides.
    cfg = small("elastic.enabled=true", "elastic.warmup_steps=1", "elastic.tryrun_steps=5",
                "elastic.trigger=every_n_steps", "elastic.every_n_steps=8", steps=100)
    trainer = SteadyStep(cfg, run_dir=tmp_path)
    ctl = TryRunController(trainer)
    trainer.state = trainer.init_state()
    ratios, step = [], 0
    for _ in range(5):
        warmup = ctl.warmup_for(trainer)  # as TryRunController.fit: 1 before the first segment, then 0
        trainer.elastic = ctl
        segment = trainer.fit()  # stops at the next multiple of 8, where the controller would decide
        trainer.elastic = None
        ctl.add_live_steps(segment, warmup)
        step += 8
        rolling = cfg.train.global_batch / statistics.median(ctl.rolling)
        with ctl.starting_from(trainer.state, step):
            trial = ctl.try_run(ctl.current_layout(trainer), trainer.devices, step)
        ratios.append(trial.measured_samples_per_s / rolling)
        assert (trial.warmup_steps, trial.measured_steps) == (0, 5)  # the live mesh's step has run: no warm-up
        assert int(trainer.state.step) == step  # the try-run ran on a copy: the live state goes on from here
    assert abs(statistics.median(ratios) - 1) < 0.05, ratios
    # a loop's first interval is a plain step: its batch is fetched before the clock starts, so a one-step
    # try-run of a layout that has run (no warm-up step) is not scored by its loop's start-up
    trainer.loader = SlowStart(trainer.loader, int(trainer.state.data_pos))
    ctl.elastic = dataclasses.replace(ctl.elastic, tryrun_steps=1)
    with ctl.starting_from(trainer.state, step):
        one = ctl.try_run(ctl.current_layout(trainer), trainer.devices, step)
    assert (one.warmup_steps, one.measured_steps) == (0, 1)
    assert cfg.train.global_batch / one.measured_samples_per_s < 0.5, one  # steps of ~0.1 s; 1 s with the fetch
