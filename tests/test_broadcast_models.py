"""Broadcast plans on the real models, 8 devices: measured collective bytes of the compiled train step."""
import json

import jax
import numpy as np
import pytest

from framework.collectives import count_compiled
from framework.config import load_config
from framework.train import Trainer
from tests.helpers import ROOT, run_script, tiny_config

CNN = str(ROOT / "configs" / "cnn_small.yaml")


def cnn_config(*overrides, steps=3):
    return load_config(CNN, [f"train.steps={steps}", "logging.progress=false", "logging.tensorboard=false", *overrides])


def measure(cfg, steps):
    trainer = Trainer(cfg)
    trainer.compile()
    report = count_compiled(trainer.compiled_step, jax.device_count())
    losses = [r["loss"] for r in trainer.fit(steps)] if steps else []
    return trainer.abstract.broadcast_plan, report, losses


def check_auto_beats_fixed(make_cfg, steps):
    runs = {mode: measure(make_cfg(f"broadcast.mode={mode}"), steps) for mode in ("auto", "kernel", "map")}
    measured = {mode: report.total for mode, (_, report, _) in runs.items()}
    assert measured["auto"] <= measured["kernel"] and measured["auto"] <= measured["map"], measured
    for mode, (plan, report, _) in runs.items():
        assert abs(plan.total_bytes - report.total) <= 0.15 * report.total, (mode, plan.total_bytes, report.total)
        by_layer = report.by_layer()
        attributed = sum(by_layer.get(layer.name, 0) for layer in plan.layers)
        assert abs(plan.layer_bytes - attributed) <= 0.01 * attributed, (mode, plan.layer_bytes, attributed)
    return runs


@pytest.mark.slow
def test_cnn_auto_plan_moves_least():
    runs = check_auto_beats_fixed(cnn_config, steps=3)
    plan = runs["auto"][0]
    assert plan.modes() == {"convs.0": "kernel", "convs.1": "kernel", "denses.0": "map", "denses.1": "kernel"}
    ref = runs["kernel"][2]
    for mode in ("auto", "map"):  # the modes change what moves, not the numbers
        np.testing.assert_allclose(runs[mode][2], ref, rtol=1e-5)


@pytest.mark.slow
def test_tiny_lm_auto_plan_moves_least_and_matches_default():
    runs = check_auto_beats_fixed(lambda *o: tiny_config(*o, steps=2), steps=2)
    _, _, default_losses = measure(tiny_config(steps=2), steps=2)  # broadcast.mode: none (the foundation's path)
    for mode, (_, _, losses) in runs.items():
        np.testing.assert_allclose(losses, default_losses, rtol=1e-5, err_msg=mode)


@pytest.mark.slow
def test_int8_training_stays_close_to_float32():
    """20 CNN steps, all layers in kernel mode (so every kernel travels compressed)."""
    losses = {c: measure(cnn_config("broadcast.mode=kernel", f"broadcast.compress={c}", steps=20), 20)[2]
              for c in ("none", "int8")}
    assert losses["none"][-1] < 0.5 * losses["none"][0]  # it learns
    diff = np.abs(np.array(losses["int8"]) - np.array(losses["none"]))
    assert diff.max() <= 0.05, (losses, diff.max())
    assert diff.max() > 0  # the int8 run really used quantised kernels


@pytest.mark.slow
def test_plan_script_broadcast_section_and_errors():
    out = run_script("plan.py", "--config", CNN, "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)["broadcast"]
    assert plan["devices"] == 8 and [layer["mode"] for layer in plan["layers"]] == ["kernel", "kernel", "map", "kernel"]
    bad = run_script("plan.py", "--config", CNN, "broadcast.overrides={'re:(': map}")
    assert bad.returncode == 2 and bad.stderr.startswith("error: broadcast.overrides") and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_plan_script_measure():
    out = run_script("plan.py", "--config", CNN, "--measure", "--json")
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)["broadcast_measured"]
    assert m["predicted_layers"] == sum(layer["predicted"] for layer in m["layers"])
    assert abs(m["measured_total"] - m["predicted_total"]) <= 0.01 * m["measured_total"]
    text = run_script("plan.py", "--config", CNN, "--measure")
    assert "predicted" in text.stdout and "denses.0" in text.stdout and text.returncode == 0
