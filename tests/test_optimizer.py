"""Weight decay on matrices only: the mask leaf by leaf, and what an update actually does to each leaf."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from framework.optimizer import build_optimizer, decay_mask
from framework.state import build_params
from tests.helpers import tiny_config

MATRICES = {
    "['blocks'][0]['attn']['query']['kernel']", "['blocks'][0]['attn']['key']['kernel']",
    "['blocks'][0]['attn']['value']['kernel']", "['blocks'][0]['attn']['out']['kernel']",
    "['blocks'][0]['mlp']['fc_in']['kernel']", "['blocks'][0]['mlp']['fc_out']['kernel']",
}
GPT_NO_DECAY = {
    "['blocks'][0]['attn']['query']['bias']", "['blocks'][0]['attn']['key']['bias']",
    "['blocks'][0]['attn']['value']['bias']", "['blocks'][0]['attn']['out']['bias']",
    "['blocks'][0]['mlp']['fc_in']['bias']", "['blocks'][0]['mlp']['fc_out']['bias']",
    "['blocks'][0]['ln_attn']['scale']", "['blocks'][0]['ln_attn']['bias']",
    "['blocks'][0]['ln_mlp']['scale']", "['blocks'][0]['ln_mlp']['bias']",
    "['ln_f']['scale']", "['ln_f']['bias']",
}
LLAMA_NO_DECAY = {"['blocks'][0]['ln_attn']['scale']", "['blocks'][0]['ln_mlp']['scale']", "['ln_f']['scale']"}
EXPECTED = {  # style -> (always decayed, never decayed, embeddings)
    "gpt": (MATRICES, GPT_NO_DECAY, {"['embed']", "['pos_embed']"}),
    "llama": (MATRICES | {"['blocks'][0]['mlp']['gate']['kernel']", "['unembed']"}, LLAMA_NO_DECAY, {"['embed']"}),
}


def _params(style, *overrides):
    cfg = tiny_config(f"model.style={style}", "model.n_layers=1", *overrides)
    _, state = build_params(cfg, 0)
    return cfg, nnx.to_pure_dict(state)


def _flat(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("style", ["gpt", "llama"])
@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_mask_leaf_by_leaf(style, decay_embeddings):
    _, params = _params(style)
    mask = _flat(decay_mask(params, decay_embeddings))
    decayed, kept, embeddings = EXPECTED[style]
    assert set(mask) == decayed | kept | embeddings  # every leaf is named above
    for path, decays in mask.items():
        want = path in decayed or (path in embeddings and decay_embeddings)
        assert decays == want, path


def test_mask_by_name_with_scanned_layers():
    """Scanned layers give norm gains a layer axis (2-D): they must still not decay."""
    _, params = _params("llama", "model.scan_layers=true")
    mask = _flat(decay_mask(params, True))
    assert mask["['blocks']['ln_attn']['scale']"] is False and params["blocks"]["ln_attn"]["scale"].ndim == 2
    assert mask["['blocks']['attn']['query']['kernel']"] is True


@pytest.mark.parametrize("name", ["adamw", "lion"])
@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_update_decays_only_masked_leaves(name, style):
    """Zero gradients and all-ones params (biases start at zero): the update is pure weight decay,
    so exactly the masked leaves move."""
    cfg, params = _params(style, f"optimizer.name={name}", "optimizer.weight_decay=0.1",
                          "optimizer.warmup_steps=0", "optimizer.decay_embeddings=false")
    params = jax.tree.map(jnp.ones_like, params)
    tx = build_optimizer(cfg.optimizer, cfg.train.steps)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    mask = _flat(decay_mask(params, False))
    for path, u in _flat(updates).items():
        moved = bool(np.any(np.asarray(u) != 0))
        assert moved == mask[path], path


def test_gpt_position_embeddings_init_std_002():
    """GPT-2's reference init draws the learned position table from N(0, 0.02), like the token table."""
    _, params = _params("gpt", "model.max_seq_len=512", "model.d_model=256", "model.n_heads=8")
    for name in ("pos_embed", "embed"):
        assert abs(float(np.std(params[name])) - 0.02) < 0.001, name
