"""Mixture-of-experts layer (models/moe.py, models/moe_dispatch.py) against a numpy reference that loops over tokens
and experts: dropless, capacity-limited (the same tokens dropped), and with the experts split over the mesh's
``expert`` axis (the all-to-all path); the config's bad inputs."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh

from framework import sharding
from framework.config import ConfigError, load_config
from models import moe
from tests.helpers import TINY

E, K, D, F, B, T = 4, 2, 16, 24, 4, 8


def _cfg(*overrides):
    return load_config(TINY, [f"model.moe.n_experts={E}", f"model.moe.top_k={K}", f"model.d_model={D}",
                              f"model.moe.d_expert_mlp={F}", "model.n_heads=4", "model.n_layers=1", *overrides]).model


def _weights(seed=0):
    r = np.random.default_rng(seed)
    return (r.normal(size=(B, T, D)).astype(np.float32), r.normal(size=(D, E)).astype(np.float32),
            *(0.3 * r.normal(size=s).astype(np.float32) for s in ((E, D, F), (E, D, F), (E, F, D))))


def _silu(v):
    return v / (1 + np.exp(-v))


def reference(cfg, x, router, wg, wu, wd):
    """Per sequence, token by token: softmax router, top-k, renormalised; each expert on the tokens it got.
    Capacity: choice j of every token before choice j + 1 of any, tokens in order; full experts drop them."""
    m = cfg.moe
    cap = math.ceil(m.capacity_factor * T * K / E) if m.capacity_factor > 0 else None
    y, kept, dropped = np.zeros_like(x), np.zeros((B, T, K), bool), 0
    for b in range(B):
        choices = []
        for t in range(T):
            logits = x[b, t] @ router
            p = np.exp(logits - logits.max())
            p /= p.sum()
            ids = np.argsort(-p, kind="stable")[:K]
            w = p[ids] / p[ids].sum() if m.norm_topk_prob else p[ids]
            choices.append((ids, w))
        used = np.zeros(E, int)
        for j in range(K):
            for t in range(T):
                e = choices[t][0][j]
                if cap is None or used[e] < cap:
                    used[e] += 1
                    kept[b, t, j] = True
                else:
                    dropped += 1
        for t in range(T):
            for e in range(E):
                for j in range(K):
                    if choices[t][0][j] == e and kept[b, t, j]:
                        h = _silu(x[b, t] @ wg[e]) * (x[b, t] @ wu[e])
                        y[b, t] += choices[t][1][j] * (h @ wd[e])
    return y, kept, dropped


def _layer(cfg, args):
    return moe._sharded(lambda *a, axis, shards: moe.layer(cfg, *a, axis=axis, shards=shards), args)


@pytest.mark.parametrize("overrides", [(), ("model.moe.norm_topk_prob=false",)])
def test_dropless_layer_equals_the_token_by_token_reference(overrides):
    cfg = _cfg(*overrides)
    args = _weights()
    y, stats = jax.jit(lambda *a: _layer(cfg, a))(*args)
    want, _, _ = reference(cfg, *args)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    assert float(stats[:, moe.N_STATS:].sum()) == B * T * K and float(stats[:, 2].sum()) == 0


def test_capacity_layer_drops_exactly_the_tokens_the_reference_drops():
    cfg = _cfg("model.moe.capacity_factor=0.5")  # 2 slots per expert per sequence of 8 tokens x 2 choices
    args = _weights(1)
    _, _, ids, _ = moe.route(cfg, jnp.asarray(args[0]), jnp.asarray(args[1]))
    _, keep = moe.moe_dispatch.capacity_positions(ids, E, 2)
    y, stats = jax.jit(lambda *a: _layer(cfg, a))(*args)
    want, kept, dropped = reference(cfg, *args)
    assert dropped > 0 and (np.asarray(keep) == kept).all()
    assert float(stats[:, 2].sum()) == dropped
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    # the metric: dropped over all assignments of the one MoE layer
    routing = moe.finish(cfg, stats, T)
    assert float(routing["metrics"]["moe/dropped_fraction"]) == pytest.approx(dropped / (B * T * K))


@pytest.mark.parametrize("shape,capacity", [((1, 1, 4, 2), 0.0), ((1, 2, 2, 2), 0.0), ((1, 2, 2, 2), 0.5)])
def test_expert_parallel_layer_equals_the_reference(shape, capacity):
    """Experts split over the expert axis, tokens sent with all_to_all inside the shard_map: same output, and
    the same gradients as the single-device layer."""
    cfg = _cfg(f"model.moe.capacity_factor={capacity}")
    args = _weights(2)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(shape), ("data", "fsdp", "expert", "tensor"),
                axis_types=(AxisType.Auto,) * 4)
    rules = sharding.rules_table(load_config(TINY).sharding.activation_rules)

    def loss(*a):
        y, stats = _layer(cfg, a)
        return (y ** 2).sum() + stats[:, 0].sum(), y

    def run(*a):
        with sharding.activation_sharding(mesh, rules):
            return jax.value_and_grad(loss, argnums=(1, 2, 3, 4), has_aux=True)(*a)

    (_, y), grads = jax.jit(run)(*args)
    want, _, _ = reference(cfg, *args)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    (_, _), local = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3, 4), has_aux=True))(*args)
    for g, h in zip(grads, local):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-4, atol=1e-5)


def test_moe_every_other_layer_and_shared_experts_in_a_scanned_model():
    from models.transformer import Transformer

    cfg = _cfg("model.n_layers=4", "model.moe.every=2", "model.moe.n_shared_experts=1", "model.scan_layers=true")
    with nnx.use_eager_sharding(False):
        model = Transformer(cfg, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    group = params["blocks"]["layers"]
    assert group[1]["mlp"]["w_gate"].shape == (2, E, D, F) and "router" not in group[0]["mlp"]
    assert group[1]["mlp"]["shared"]["fc_in"]["kernel"].shape == (2, D, F)
    logits, routing = nnx.jit(lambda m, tokens: m(tokens))(model, jnp.zeros((2, T), jnp.int32))
    assert logits.shape == (2, T, cfg.vocab_size)
    assert set(routing["metrics"]) == {"moe/aux_loss", "moe/z_loss", "moe/load_min", "moe/load_max", "moe/dropped_fraction",
                                       "moe/routing_loss"}
    assert float(routing["metrics"]["moe/routing_loss"]) == float(routing["loss"])


@pytest.mark.parametrize("overrides,key", [
    (("model.moe.top_k=5",), "model.moe.top_k=5"),
    (("model.moe.every=5",), "model.moe.every=5"),
    (("model.moe.every=3", "model.scan_layers=true"), "model.moe.every=3"),
    (("mesh.expert=3",), "mesh.expert=3"),
    (("model.moe.n_experts=0", "mesh.expert=2"), "mesh.expert=2"),
])
def test_bad_moe_config_is_one_line_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        _cfg(*overrides)
    assert str(err.value).startswith(key) and "\n" not in str(err.value)
