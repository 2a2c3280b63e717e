"""Evaluation on held-out data: same number on every mesh, equal to a hand computation,
drawn from data training never sees, logged during fit, validated at start."""
import dataclasses
import json
import sys

import jax
import numpy as np
import optax
import pytest

from framework.config import ConfigError, DataConfig, load_config
from framework.data import SyntheticSource, TextSource, make_source
from framework.train import Trainer
from tests.helpers import ROOT, TINY, run_script, tiny_config
from tests.test_distributed import run
from tests.test_perf import read_event_scalars

SMALL = ["model.n_layers=2", "train.global_batch=8", "train.seq_len=32"]
MESHES = {
    "data=8": (["mesh.data=8", "mesh.fsdp=1"], 8),
    "fsdp=8": (["mesh.fsdp=8"], 8),
    "data=2,fsdp=2,tensor=2": (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], 8),
    "2x2x2, grad_accum=2": (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.grad_accum=2"], 8),
    "fsdp=8, params and opt_state in pinned_host": (["mesh.fsdp=8", "memory.params=pinned_host",
                                                     "memory.opt_state=pinned_host"], 8),
}


@pytest.fixture(scope="module")
def trained():
    """A 1-device trainer after 3 steps: params that are not the init, so meshes are compared on trained weights."""
    tr = Trainer(tiny_config(*SMALL, "mesh.fsdp=1", steps=3), devices=jax.devices()[:1])
    tr.fit()
    return tr


@pytest.mark.slow
@pytest.mark.parametrize("name", MESHES)
def test_eval_loss_equal_across_meshes(trained, name):
    overrides, n = MESHES[name]
    tr = Trainer(tiny_config(*SMALL, *overrides, steps=3), devices=jax.devices()[:n])
    state = tr.init_state()
    state = dataclasses.replace(state, params=jax.device_put(jax.device_get(trained.state.params), tr.state_shardings.params))
    got = tr.evaluate(state)["eval_loss"]
    np.testing.assert_allclose(got, trained.evaluate()["eval_loss"], rtol=1e-5)
    assert got != pytest.approx(tr.evaluate(tr.init_state())["eval_loss"], rel=1e-3)  # the params, not the mesh, decide


def test_eval_loss_equals_hand_computation(trained):
    cfg = trained.cfg
    source = make_source(cfg.data, cfg.train, cfg.model.vocab_size, split="eval")
    params = jax.device_get(trained.state.params)
    model = trained.model(params)
    losses = []
    for pos in range(cfg.train.eval_batches):
        rows = source.rows(pos, np.arange(8), 8)
        logits = model(rows[:, :-1])
        losses.append(optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:]).mean())
    assert cfg.train.eval_batches == 4
    np.testing.assert_allclose(trained.evaluate()["eval_loss"], np.mean(losses), rtol=1e-5)
    # the eval batches are not the training batches of the same positions
    assert not np.array_equal(source.rows(0, np.arange(8), 8), trained.loader.source.rows(0, np.arange(8), 8))


def test_text_eval_split_disjoint_from_training(tmp_path):
    # bytes 1..100 in the first 800 bytes (the train split with eval_fraction=0.2), 200..249 after; no NUL (text)
    corpus = np.concatenate([1 + np.arange(800) % 100, 200 + np.arange(200) % 50]).astype(np.uint8)
    path = tmp_path / "corpus.txt"
    path.write_bytes(corpus.tobytes())
    cfg = DataConfig(paths=[str(path)], eval_fraction=0.2)
    train, held_out = TextSource(cfg, 32, 256, "train"), TextSource(cfg, 32, 256, "eval")
    train_rows = np.concatenate([train.rows(p, np.arange(64), 64) for p in range(200)])
    eval_rows = np.concatenate([held_out.rows(p, np.arange(64), 64) for p in range(20)])
    assert train_rows.max() <= 100 and eval_rows.min() >= 200
    assert (train_rows[:, -1] == 99).any()  # windows reach the boundary (index 798, the last a window ends on)
    with pytest.raises(ConfigError, match=r"^data.eval_fraction=0.0: the eval split of the 1000-byte corpus has 0 bytes"):
        TextSource(dataclasses.replace(cfg, eval_fraction=0.0), 32, 256, "eval")


def test_synthetic_eval_stream_never_used_by_training():
    src = {s: SyntheticSource(DataConfig(source="synthetic"), 16, 256, s) for s in ("train", "eval")}
    train = [src["train"].rows(p, np.arange(8), 8) for p in range(64)]
    for p in range(8):  # seeding pads [seed, position] with zeros: eval position 0 must not be train position 1
        held_out = src["eval"].rows(p, np.arange(8), 8)
        assert not any(np.array_equal(held_out, t) for t in train), p


class Recording(Trainer):
    def on_eval_end(self, step, record):
        self.eval_records = getattr(self, "eval_records", []) + [record]


@pytest.mark.slow
def test_fit_evaluates_every_n_steps_and_eval_loss_falls(tmp_path):
    cfg = tiny_config(*SMALL, "train.eval_every=5", "logging.tensorboard=true", steps=12)
    tr = Recording(cfg, run_dir=tmp_path)
    tr.state = tr.init_state()
    at_init = tr.evaluate()["eval_loss"]
    records = tr.fit()
    assert [r["step"] for r in records] == list(range(1, 13))  # fit returns the training steps only
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in logged if "eval_loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10, 10, 11, 12, 12]  # step order
    assert [sorted(r) for r in evals] == [["eval_loss", "step"]] * 3 and [r["step"] for r in evals] == [5, 10, 12]
    assert tr.eval_records == evals
    assert evals[-1]["eval_loss"] == tr.evaluate()["eval_loss"]  # the last evaluation is of the final state
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] < at_init - 0.5, (at_init, evals)
    scalars = read_event_scalars(tmp_path / "tensorboard")
    assert scalars["eval/loss"] == [(r["step"], pytest.approx(r["eval_loss"], rel=1e-6)) for r in evals]
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 13))
    # readers of metrics.jsonl: the plot script draws it, eval records included
    r = run_script("plot.py", str(tmp_path), "--out", str(tmp_path / "plots"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "plots" / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_two_processes_evaluate_like_one(tmp_path):
    """Each process builds only its rows of the eval batches; 2 x 4 devices with grad_accum=2 give the 1 x 8 numbers."""
    overrides = [*SMALL, "train.eval_every=3", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    r = run([sys.executable, str(ROOT / "scripts" / "launch_local.py"), "--processes", "2", "--devices-per-process", "4",
             "--", str(ROOT / "scripts" / "train.py"), "--config", TINY, "--run-dir", str(tmp_path), "train.steps=6",
             "logging.progress=false", "logging.tensorboard=false", "train.grad_accum=2", *overrides], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [rec for rec in logged if "eval_loss" in rec]
    single = Recording(tiny_config(*overrides, steps=6))
    single.fit()
    assert [rec["step"] for rec in evals] == [3, 6]
    np.testing.assert_allclose([rec["eval_loss"] for rec in evals], [rec["eval_loss"] for rec in single.eval_records],
                               rtol=1e-5)


def test_config_validation():
    for override, message in (
        ("train.eval_every=-1", "train.eval_every=-1: expected an integer >= 0 (0: no evaluation)"),
        ("train.eval_batches=0", "train.eval_batches=0: expected a positive integer"),
        ("data.eval_fraction=1.0", "data.eval_fraction=1.0: expected a fraction in [0, 1)"),
        ("data.eval_fraction=-0.1", "data.eval_fraction=-0.1: expected a fraction in [0, 1)"),
    ):
        with pytest.raises(ConfigError) as e:
            load_config(TINY, [override])
        assert str(e.value) == message


def test_bad_eval_every_exits_2():
    r = run_script("train.py", "--config", TINY, "train.eval_every=-1")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: train.eval_every=-1: expected an integer >= 0 (0: no evaluation)"
