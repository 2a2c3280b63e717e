"""Research by subclassing: a Trainer with a z-loss term and a custom metric (the README's extension example),
a Callback, and the memory planner measuring a subclass's own loss."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from framework.train import Callback, Trainer
from tests.helpers import SMALLER, tiny_config


# ---- the example (README, "Extending meshpilot"): under 30 lines
class ZLossTrainer(Trainer):
    """PaLM's z-loss: pushes the softmax normaliser log Z towards 0, which keeps large-vocabulary logits stable."""

    z_weight = 1e-4

    def loss_fn(self, params, batch, rng):
        tokens = batch["tokens"]  # the batch's fields: framework/data/batch.py
        logits = self.model(params)(tokens[:, :-1])
        log_z = jax.nn.logsumexp(logits, axis=-1)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        z_loss = self.z_weight * jnp.mean(log_z ** 2)
        return ce + z_loss, {"z_loss": z_loss, "log_z": jnp.mean(log_z)}  # the metrics are logged with each step


class StepLog(Callback):
    def __init__(self):
        self.seen = []

    def on_step_end(self, trainer, step, record):
        self.seen.append((step, record["log_z"]))
# ---- end of the example


def test_z_loss_subclass_trains_and_logs_its_metrics(tmp_path):
    overrides = [*SMALLER, "mesh.fsdp=2", "mesh.data=4", "train.grad_accum=2"]
    tr = ZLossTrainer(tiny_config(*overrides, steps=3), run_dir=tmp_path)
    tr.callbacks.append(log := StepLog())
    state = tr.init_state()  # the same initial params as the run's own (seeded)
    batch = tr.loader.batch(0)["tokens"]  # step 1's tokens: (grad_accum, micro-batch, seq + 1)
    logits = jax.jit(lambda p, b: tr.model(p)(b[:, :, :-1].reshape(-1, b.shape[-1] - 1)))(state.params, batch)
    log_z = np.asarray(jax.nn.logsumexp(logits, axis=-1))
    targets = np.asarray(batch[:, :, 1:]).reshape(log_z.shape)
    ce = float(np.mean(log_z - np.take_along_axis(np.asarray(logits), targets[..., None], -1)[..., 0]))

    records = tr.fit()
    first = records[0]
    np.testing.assert_allclose(first["z_loss"], 1e-4 * np.mean(log_z ** 2), rtol=1e-5)
    assert abs(first["loss"] - (ce + first["z_loss"])) < 1e-5  # the z-loss term is in the optimised loss
    assert abs(first["log_z"] - np.mean(log_z)) < 1e-4
    assert [s for s, _ in log.seen] == [1, 2, 3] and log.seen[0][1] == first["log_z"]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["z_loss"] for r in logged] == [r["z_loss"] for r in records]


class TanhHead(Trainer):
    """An extra loss term whose backward pass keeps one more (batch, length, vocab) float32 tensor: tanh's output."""

    def loss_fn(self, params, batch, rng):
        logits = self.model(params)(batch["tokens"][:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:]).mean()
        return ce + 1e-3 * jnp.mean(jnp.tanh(logits)), {}


def test_memory_planner_measures_the_trainers_own_loss():
    cfg = tiny_config(*SMALLER, "mesh.fsdp=8")
    base, extra = Trainer(cfg), TanhHead(cfg)
    t, vocab = cfg.train, cfg.model.vocab_size
    kept = t.global_batch * t.seq_len * vocab * 4 // 8  # one (batch, length, vocab) float32 tensor over 8 batch devices
    # the estimate traces the loss each trainer optimises: tanh's backward keeps tanh(logits) and 1 - tanh(logits)
    estimated = {tr: tr.memory_needs().activations["save"]["device"] for tr in (base, extra)}
    assert estimated[extra] - estimated[base] == 2 * kept
    # the compiled figure is the subclass's own step (XLA fuses tanh into the backward: a little more, not 2x)
    compiled = {tr: tr.memory_plan().bytes["activations"]["device"] for tr in (base, extra)}
    assert compiled[extra] > compiled[base]
    assert compiled[extra] == extra.compiled_step.memory_analysis().temp_size_in_bytes - extra.memory_plan().bytes[
        "grads"]["device"]
