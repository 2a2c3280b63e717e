"""Goodput: the timed parts of a run add up to its wall time; replayed steps are told apart; plot panel."""
import json
import shutil
import sys
import time

import pytest

from framework.goodput import PARTS, GoodputClock
from framework.train import Trainer
from tests.helpers import ROOT, tiny_config
from tests.test_resume import compile_once  # noqa: F401  (module fixture: one compile per config)

SMALL = ("model.n_layers=2", "data.source=synthetic")


@pytest.mark.slow
def test_parts_add_up_to_wall_time_and_replayed_steps_are_not_productive(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(*SMALL, "checkpoint.every_steps=4", "train.eval_every=5", "logging.tensorboard=true", steps=10)

    class Timed(Trainer):
        def init_state(self):
            t = time.time()
            state = super().init_state()
            self.init_s = time.time() - t
            return state

        def write_plans(self, step):
            t = time.time()
            super().write_plans(step)
            self.plans_s = time.time() - t

    t0 = time.time()
    first = Timed(cfg, run_dir=run)
    built = time.time() - t0
    first.goodput = GoodputClock(origin=t0)
    first.fit(steps=6)  # checkpoints at 4 and 6
    outside = time.time() - t0
    report = json.loads((run / "goodput.json").read_text())["runs"][0]
    assert report["wall_s"] == pytest.approx(outside, abs=0.05 * outside)
    parts = sum(report[f"{p}_s"] for p in PARTS)
    assert parts == pytest.approx(report["wall_s"], rel=0.02)  # the parts cover the run
    # start-up: what came before the loop and no other part took (building the Trainer, initialising the state,
    # writing plans.json)
    assert report["startup_s"] == pytest.approx(built + first.init_s + first.plans_s, abs=0.02 * report["wall_s"])
    for part in ("productive_steps", "compile", "checkpoint_save", "evaluation"):
        assert report[f"{part}_s"] > 0, part
    assert report["replayed_steps_s"] == 0 and report["goodput"] == report["productive_steps_s"] / report["wall_s"]

    shutil.rmtree(run / "checkpoints" / "6")  # a crash lost the newest checkpoint: steps 5 and 6 are trained again
    second = Trainer(cfg, run_dir=run)
    records = second.fit()
    history = json.loads((run / "goodput.json").read_text())
    assert len(history["runs"]) == 2
    again = history["runs"][1]
    assert again["replayed_steps_s"] == pytest.approx(sum(r["step_time_s"] for r in records if r["step"] <= 6))
    assert again["productive_steps_s"] == pytest.approx(sum(r["step_time_s"] for r in records if r["step"] > 6))
    assert again["checkpoint_restore_s"] > 0
    assert sum(again[f"{p}_s"] for p in PARTS) == pytest.approx(again["wall_s"], rel=0.02)
    total = history["total"]
    assert total["wall_s"] == pytest.approx(report["wall_s"] + again["wall_s"])
    assert second.goodput_line.startswith(f"goodput: {total['goodput']:.1%} of {total['wall_s']:.1f} s wall over 2 runs: ")
    assert "replayed steps" in second.goodput_line
    events = b"".join(p.read_bytes() for p in (run / "tensorboard").glob("events.*"))
    assert b"goodput/goodput" in events and b"goodput/replayed_steps_s" in events

    sys.path.insert(0, str(ROOT / "scripts"))
    from plot import make_plots

    assert run / "plots" / "goodput.png" in make_plots(run, run / "plots")
    assert (run / "plots" / "goodput.png").stat().st_size > 0
