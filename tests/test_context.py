"""Context parallelism (models/context.py): the sequence split over mesh.context gives the logits and gradients of
the unsplit model (ring and all-gather attention, with and without segment ids, GQA, with the other axes); the ring's
compiled step passes K/V blocks with collective-permutes and gathers no full-sequence activation; bad input."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh

from framework import sharding
from framework.config import ConfigError, load_config
from framework.train import Trainer
from models import context
from models.transformer import Transformer
from tests.helpers import loss_and_grads, TINY, run_script, tiny_config

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
T = 48  # a sequence length no weight dimension has: an all-gather of this length is a full-sequence activation
LLAMA = ["model.style=llama", "model.n_layers=1", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2",
         "model.d_mlp=64", f"model.max_seq_len={T}", f"train.seq_len={T}", "train.global_batch=4", "data.source=synthetic"]
RULES = sharding.rules_table(tiny_config().sharding.activation_rules)


def mesh_of(context_size, data=1):
    devices = np.array(jax.devices()[: data * context_size]).reshape(data, context_size)
    return Mesh(devices, ("data", "context"), axis_types=(AxisType.Auto,) * 2)


def segments(batch, seq):
    """Three documents per row, of different lengths per row."""
    cuts = np.array([[seq // 4, seq // 2], [5, seq - 7]])[np.arange(batch) % 2]
    return (np.arange(seq)[None, :, None] >= cuts[:, None, :]).sum(-1).astype(np.int32)


def build(style, *overrides):
    with nnx.use_eager_sharding(False):  # replicated parameters: the test is about the sequence split
        return Transformer(tiny_config(*LLAMA, f"model.style={style}", *overrides).model, rngs=nnx.Rngs(0))


def split_run(fn, mesh, *args):
    """``fn(*args)`` (outputs with the sequence on axis 1) with the sequence split over ``mesh``'s context axis, in
    true order again; unsplit without a mesh."""
    if mesh is None:
        return jax.jit(fn)(*args)
    with sharding.activation_sharding(mesh, RULES):
        out = jax.jit(fn)(*context.to_layout(args))
    return jax.tree.map(lambda x: context.from_layout(x, mesh.shape["context"]) if x.ndim > 1 and x.shape[1] == T else x, out)


def attention_and_grads(mode):
    """Attention output and the gradients (q, k, v) of an output-weighted sum."""
    def f(q, k, v, seg, weights):
        out = context.attention(q, k, v, segment_ids=seg, mode=mode)
        return out, jax.grad(lambda *a: (context.attention(*a, segment_ids=seg, mode=mode) * weights).sum(),
                             argnums=(0, 1, 2))(q, k, v)
    return f


def model_logits_and_grads(model):
    """Logits and the parameter gradient of a logit-weighted sum (parameters have no sequence axis of length T)."""
    graphdef, params = nnx.split(model)

    def f(tokens, seg, weights):
        def loss(params):
            logits = nnx.merge(graphdef, params)(tokens, segment_ids=seg)
            return (logits * weights).sum(), logits
        (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return logits, grads
    return f


def assert_close(got, want, tol=1e-5):
    leaves = jax.tree_util.tree_leaves_with_path(want)
    assert len(leaves) == len(jax.tree.leaves(got)) > 0
    for (path, w), g in zip(leaves, jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def qkv():
    """GQA: 4 query heads over 2 K/V heads; 2 rows of 3 documents each."""
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.normal(size=(2, T, n, 8)), jnp.float32) for n in (4, 2, 2, 4))
    return q, k, v, jnp.asarray(segments(2, T)), w


CASES = [(size, "ring", segmented) for size in (2, 4, 8) for segmented in (False, True)]
CASES += [(4, "allgather", segmented) for segmented in (False, True)]


@pytest.mark.parametrize("size,mode,segmented", CASES, ids=[f"context={c},{m},{'segments' if s else 'no segments'}"
                                                            for c, m, s in CASES])
def test_attention_and_gradients_equal_unsplit(qkv, size, mode, segmented):
    q, k, v, seg, w = qkv
    seg = seg if segmented else None
    want = split_run(attention_and_grads(mode), None, q, k, v, seg, w)
    assert_close(split_run(attention_and_grads(mode), mesh_of(size), q, k, v, seg, w), want)


@pytest.mark.parametrize("style,size,segmented", [("llama", 8, True), ("gpt", 4, False)])
def test_model_logits_and_gradients_equal_unsplit(style, size, segmented):
    """The whole model, its sequence split: RoPE (llama) and learned positions (gpt) read the true positions."""
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, 256, (2, T), dtype=np.int32))
    seg = jnp.asarray(segments(2, T)) if segmented else None
    weights = jnp.sin(jnp.arange(2 * T * 256, dtype=jnp.float32)).reshape(2, T, 256)
    model = build(style, "model.context_attention=ring")
    want = split_run(model_logits_and_grads(model), None, tokens, seg, weights)
    got = split_run(model_logits_and_grads(model), mesh_of(size), tokens, seg, weights)
    assert_close(got, want)
    if segmented:  # a document of the packed row gives the logits it has run alone (RoPE is relative)
        start, stop = T // 4, T // 2
        alone = jax.jit(model)(tokens[:1, start:stop])
        np.testing.assert_allclose(got[0][0, start:stop], alone[0], atol=1e-5)


# ------------------------------------------------------------------ the Trainer's step on meshes with other axes

_trainers = {}


def trainer(*overrides, n=8):
    key = (overrides, n)
    if key not in _trainers:
        _trainers[key] = Trainer(tiny_config(*LLAMA, *overrides, steps=1), devices=jax.devices()[:n])
    return _trainers[key]


SCANNED = ["model.scan_layers=true", "model.n_layers=2"]  # every case compares with one reference trainer
MESHES = {
    "context=2,data=2,tensor=2": ["mesh.context=2", "mesh.data=2", "mesh.tensor=2", "mesh.fsdp=1"],
    "context=2,stage=2,fsdp=2": ["mesh.context=2", "mesh.stage=2", "mesh.fsdp=2", "train.pipeline_microbatches=2"],
}


@pytest.mark.parametrize("name", list(MESHES))
def test_trainer_loss_and_gradients_equal_one_device(name):
    ref = trainer("mesh.fsdp=1", *SCANNED, n=1)
    params = jax.device_get(ref.init_state().params)
    batch = {"tokens": np.random.default_rng(1).integers(0, 256, (4, T + 1), dtype=np.int32)}
    want_loss, want_grads = loss_and_grads(ref, params, batch)
    loss, grads = loss_and_grads(trainer(*SCANNED, *MESHES[name]), params, batch)
    assert abs(loss - want_loss) < 1e-5
    assert_close(grads, want_grads)


def _ops(hlo: str, kind: str) -> list[tuple[str, str]]:
    """(result shape, source_target_pairs or replica_groups) of every ``kind`` op of a compiled program."""
    pattern = r"=\s*(\w+\[[\d,]*\])\S*\s+" + kind + r"(?:-start)?\(.*?(?:source_target_pairs|replica_groups)=(\{\{.*?\}\}|\S+?),"
    return re.findall(pattern, hlo)


def test_ring_step_permutes_kv_blocks_and_gathers_no_sequence():
    """The compiled train step (context=4 x data=2, 1 layer): 2 K/V permutes forward, 4 (K/V and their gradients)
    per backward hop and 2 bringing the gradients home, each of one local block (2 rows, T/4 tokens, 2 kv heads of
    8) round the context ring; no all-gather has the full sequence length. All-gather mode has them."""
    hlo = trainer("mesh.context=4", "mesh.data=2", "mesh.fsdp=1", "model.context_attention=ring").compiled_step.as_text()
    ring = "{{0,1},{1,2},{2,3},{3,0},{4,5},{5,6},{6,7},{7,4}}"
    assert _ops(hlo, "collective-permute") == [("f32[2,12,2,8]", ring)] * 8
    assert not [shape for shape, _ in _ops(hlo, "all-gather") if f",{T}," in shape]
    gathered = trainer("mesh.context=4", "mesh.data=2", "mesh.fsdp=1", "model.context_attention=allgather")
    assert [s for s, _ in _ops(gathered.compiled_step.as_text(), "all-gather")] == [f"f32[2,{T},2,8]"] * 2


def test_seq_len_the_zigzag_split_does_not_divide_exits_2():
    r = run_script("train.py", "--config", TINY, "mesh.context=4", "train.seq_len=36", "model.max_seq_len=36")
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: train.seq_len=36 is not divisible by 2 * mesh.context = 8 "
                                "(context parallelism's zig-zag split: two chunks per device)")
    with pytest.raises(ConfigError, match="train.seq_len=36"):
        load_config(TINY, ["mesh.context=4", "train.seq_len=36", "model.max_seq_len=36"])


# ------------------------------------------------------------------ planning: memory, try-run layouts, scripts/plan.py


def planned_activations(size: int, seq: int = T) -> int:
    """The planner's estimate (no devices) of the activations one device keeps, one sequence split over ``size``."""
    from framework import memory
    from framework.mesh import MeshManager, describe
    from framework.state import abstract_state
    from framework.train.objective import loss_for_config

    cfg = tiny_config(*LLAMA, f"train.seq_len={seq}", f"model.max_seq_len={seq}", "train.global_batch=1", "mesh.fsdp=1",
                      f"mesh.context={size}", "model.context_attention=ring")
    sizes = describe(MeshManager(cfg.mesh).abstract(size))
    needs = memory.estimate_needs(cfg, abstract_state(cfg, sizes), sizes, sharding.batch_axes(cfg.sharding.activation_rules,
                                                                                              sizes), 1, loss_for_config(cfg, sizes))
    return needs.activations["save"]["device"]


def test_planner_counts_activations_per_device_under_the_context_split():
    """The loss is traced as it runs (the ring keeps local blocks, not a (T, T) score matrix per head) and each
    residual with a sequence dimension counts 1/context of it: the estimate falls at least as fast as 1/context
    (the old planner traced dense attention and counted whole sequences: the same figure at every context size)."""
    one, two, four = (planned_activations(c, 96) for c in (1, 2, 4))
    assert 0 < four < two < one
    assert two <= one / 2 and four <= one / 4


def test_tryrun_proposes_a_context_split_when_rows_are_fewer_than_devices():
    from framework.mesh import MeshManager
    from framework.tryrun.layouts import Gates, with_layout

    cfg = tiny_config(*LLAMA, "train.global_batch=2", "mesh.fsdp=2")
    gates = Gates(cfg, {"data": 1, "fsdp": 2, "tensor": 1}, [])
    found = [c for c in gates.candidates(8, 2) if c.kind == "context"]
    # split 4: 2 replicas of one row each -> fsdp 1 x context 4; split 8: 1 replica of 2 rows -> fsdp 2 x context 4
    assert [(c.mesh, c.grad_accum) for c in found] == [
        ({"data": 2, "fsdp": 1, "context": 4, "tensor": 1}, 1), ({"data": 1, "fsdp": 2, "context": 4, "tensor": 1}, 1)]
    assert MeshManager(with_layout(cfg, found[0]).mesh).axis_sizes(8) == {"data": 2, "fsdp": 1, "context": 4, "tensor": 1}
    many_rows = Gates(tiny_config(*LLAMA, "train.global_batch=16", "mesh.fsdp=2"), {"data": 1, "fsdp": 2, "tensor": 1}, [])
    assert not [c for c in many_rows.candidates(8, 2) if c.kind == "context"]  # fsdp splits 16 rows: no need


def test_plan_prints_the_context_split():
    r = run_script("plan.py", "--config", TINY, "--devices", "8", "--estimate", "mesh.context=4", "mesh.fsdp=2",
                   f"train.seq_len={T}", f"model.max_seq_len={T}", "model.context_attention=ring")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (f"context: each sequence of {T} tokens split over 4 devices ({T // 4} each, zig-zag: chunks d and 7-d); "
            "attention ring (model.context_attention=ring)") in r.stdout
