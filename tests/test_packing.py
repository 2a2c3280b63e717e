"""Packed documents (data.packing: eos): attention and positions stay inside a document, in the training call and in
the KV-cache decode, and the loss counts exactly the targets of each document (and of a loss mask)."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from framework.data.batch import eos_segments
from framework.train.objective import next_token_loss
from models.transformer import Transformer
from tests.helpers import SMALLER, tiny_config

EOS = 0
LENGTHS = (6, 9, 5)  # three documents, each ending with EOS: 20 tokens, one row of 19 inputs + 1


@functools.cache
def model_of(style: str, scan: bool = False) -> Transformer:
    """A tiny model (GQA: 4 query heads, 2 KV heads); its params made in one compiled call (eager init is slow)."""
    cfg = tiny_config(*SMALLER, f"model.style={style}", "model.n_heads=4", "model.n_kv_heads=2",
                      f"model.scan_layers={str(scan).lower()}").model
    make = lambda: nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    with nnx.use_eager_sharding(False):
        graphdef = nnx.eval_shape(make)[0]
        return nnx.merge(graphdef, jax.jit(lambda: make()[1])())


def jitted(model: Transformer):
    """The model's training call, compiled (one compile per shape; eager dispatch costs more on 2 cores)."""
    graphdef, params = nnx.split(model)
    run = jax.jit(lambda p, tokens, extra: nnx.merge(graphdef, p)(tokens, **extra))
    return lambda tokens, **extra: np.asarray(run(params, jnp.asarray(tokens), jax.tree.map(jnp.asarray, extra)))


def documents(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(1, 256, n - 1), EOS).astype(np.int32) for n in LENGTHS]


def packed(docs) -> dict:
    tokens = np.concatenate(docs)[None]
    segment_ids, positions = eos_segments(tokens, EOS)
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


def test_segments_and_positions_of_a_packed_row():
    batch = packed(documents())
    np.testing.assert_array_equal(batch["segment_ids"][0], np.repeat([1, 2, 3], LENGTHS))
    np.testing.assert_array_equal(batch["positions"][0], np.concatenate([np.arange(n) for n in LENGTHS]))


@pytest.mark.parametrize("style,scan", [("llama", False), ("gpt", True)])
def test_each_document_of_a_packed_row_has_its_own_logits(style, scan):
    """RoPE (llama) and learned positions (gpt, scanned layers) restart per document; attention never crosses one."""
    model, docs = jitted(model_of(style, scan)), documents()
    batch = packed(docs)
    logits = model(batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"])[0]
    # each document alone: one row each, EOS after it to a common length (causal: nothing later reaches its logits)
    alone = model(np.stack([np.pad(doc, (0, max(LENGTHS) - len(doc))) for doc in docs]))
    starts = np.cumsum((0,) + LENGTHS)
    for i, (a, b) in enumerate(itertools.pairwise(starts)):
        np.testing.assert_allclose(logits[a:b], alone[i, :b - a], atol=1e-5, rtol=0)
    unmasked = model(batch["tokens"])[0]
    assert np.abs(unmasked[starts[1]:] - logits[starts[1]:]).max() > 1e-3  # without segments the documents mix


def test_the_loss_counts_the_targets_of_each_document_and_of_the_mask():
    model, docs = model_of("llama"), documents(1)
    batch = packed(docs)
    tokens = batch["tokens"][0]
    logits = jitted(model)(tokens[None, :-1], segment_ids=batch["segment_ids"][:, :-1],
                           positions=batch["positions"][:, :-1])[0]
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    # by hand: input i is trained on unless it is a document's EOS (its target is the next document's first token)
    inputs = [i for i in range(len(tokens) - 1) if tokens[i] != EOS]
    assert len(inputs) == len(tokens) - 1 - 2  # the two EOS tokens inside the row
    want = -np.mean([logp[i, tokens[i + 1]] for i in inputs])
    loss = jax.jit(lambda batch: next_token_loss(model, batch))
    np.testing.assert_allclose(float(loss(batch)), want, rtol=1e-6)
    # a loss mask (fine-tuning): only the marked targets of the second document count
    mask = np.zeros_like(batch["tokens"])
    mask[0, LENGTHS[0] + 3:LENGTHS[0] + LENGTHS[1]] = 1  # the second document's last 6 tokens, its EOS included
    marked = [i for i in inputs if mask[0, i + 1]]
    want = -np.mean([logp[i, tokens[i + 1]] for i in marked])
    np.testing.assert_allclose(float(loss({**batch, "loss_mask": mask})), want, rtol=1e-6)


@pytest.mark.parametrize("style", ["llama", "gpt"])
def test_kv_cache_decode_keeps_to_the_segment(style):
    """Prefill a packed row (document 1, then the start of document 2), decode one token: document 2's logits alone."""
    model, docs = model_of(style), documents(2)
    first, second = docs[0], docs[1][:5]
    row = np.concatenate([first, second])[None]
    segment_ids, positions = eos_segments(row, EOS)
    graphdef, params = nnx.split(model)

    @jax.jit
    def prefill_and_step(params, row, segment_ids, positions):
        model, n = nnx.merge(graphdef, params), row.shape[1] - 1
        _, cache = model.decode(row[:, :n], model.init_cache(1, 16, segments=True), 0, segment_ids=segment_ids[:, :n],
                                positions=positions[:, :n])
        step = model.decode(row[:, n:], cache, n, segment_ids=segment_ids[:, n:], positions=positions[:, n:])[0]
        return step, model(row[:, len(first):])  # the second document run alone

    step, alone = prefill_and_step(params, row, segment_ids, positions)
    np.testing.assert_allclose(np.asarray(step)[0, -1], np.asarray(alone)[0, -1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="segments=True"):
        model.decode(jnp.asarray(row), model.init_cache(1, 16), 0, segment_ids=jnp.asarray(segment_ids))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A token store of documents of 3..40 tokens (ids 0..62), each ending with EOS 63; train and eval splits."""
    from tests.test_data import make_store

    rng = np.random.default_rng(0)
    split = lambda n: np.concatenate([np.append(rng.integers(0, 63, rng.integers(2, 40)), 63) for _ in range(n)])
    path = tmp_path_factory.mktemp("packed")
    make_store(path, split(120), split(30), vocab=64, shard_tokens=1000)
    return path


def test_the_trainer_trains_on_the_targets_of_packed_documents(store):
    """The default for a token store: batches with segment ids and positions; the step's loss is the mean over the
    targets counted by hand across both micro-batches (each counts by its targets), and trained_tokens their number."""
    from framework.train import Trainer

    cfg = tiny_config(*SMALLER, "data.source=tokens", f"data.path={store}", "model.vocab_size=auto",
                      "model.style=llama", "train.grad_accum=2", steps=1)
    tr = Trainer(cfg)
    logits = jax.jit(lambda p, b: jax.vmap(lambda m: tr.model(p)(m["tokens"][:, :-1], segment_ids=m["segment_ids"][:, :-1],
                                                                 positions=m["positions"][:, :-1]))(b))

    def by_hand(params, batch):  # the losses of the inputs trained on: all but EOS (its target starts the next document)
        logp, tokens = np.asarray(jax.nn.log_softmax(logits(params, batch), -1)), batch["tokens"]
        return [[-logp[a, r, i, tokens[a, r, i + 1]] for r in range(8) for i in range(32) if tokens[a, r, i] != 63]
                for a in range(2)]

    batch = jax.device_get(tr.loader.batch(0))
    assert sorted(batch) == ["positions", "segment_ids", "tokens"] and batch["tokens"].shape == (2, 8, 33)
    picked = by_hand(tr.init_state().params, batch)  # the run's own initial params (seeded)
    record = tr.fit()[0]
    assert record["trained_tokens"] == len(picked[0]) + len(picked[1]) < 16 * 32
    np.testing.assert_allclose(record["loss"], np.mean(picked[0] + picked[1]), rtol=1e-5)
    # micro-batches with very different numbers of targets: a document every 3 tokens in the first, none in the second
    tokens = batch["tokens"].copy()
    tokens[0, :, 2::3], tokens[1][tokens[1] == 63] = 63, 5
    segment_ids, positions = eos_segments(tokens.reshape(16, 33), 63)
    skewed = {"tokens": tokens, "segment_ids": segment_ids.reshape(2, 8, 33), "positions": positions.reshape(2, 8, 33)}
    picked = by_hand(tr.state.params, skewed)
    mean_of_means = np.mean([np.mean(p) for p in picked])  # what weighing the micro-batches equally would give
    assert abs(mean_of_means - np.mean(picked[0] + picked[1])) > 1e-4 * mean_of_means  # 10x the tolerance below
    _, metrics = tr.step(tr.state, tr.loader.to_global(skewed))
    assert int(metrics["trained_tokens"]) == len(picked[0]) + len(picked[1])
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(picked[0] + picked[1]), rtol=1e-5)


def test_packing_config_errors(store):
    from framework.config import ConfigError

    with pytest.raises(ConfigError, match=r"^data.packing=eos: data.source=text has no documents"):
        tiny_config("data.packing=eos")
    tokens = ["data.source=tokens", f"data.path={store}", "model.vocab_size=auto"]
    assert tiny_config(*tokens, "mesh.stage=2").data.packing == "auto"  # segment ids travel through the stages
