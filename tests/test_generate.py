"""KV-cache generation (models/transformer.py decode path, framework/generate.py, scripts/generate.py)."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from framework import generate, hf, sharding
from framework.mesh import MeshManager, describe
from framework.state import abstract_state
from tests import hf_fixtures as fx
from tests.helpers import run_script

CASES = {"gpt2": (fx.GPT2_CONFIG, fx.gpt2_tensors, fx.gpt2_forward),
         "llama-gqa": (fx.LLAMA_CONFIG, fx.llama_tensors, fx.llama_forward),
         "qwen3": (fx.QWEN3_CONFIG, fx.llama_tensors, fx.llama_forward)}  # q/k norms, head_dim 16 in the cache
PROMPT = np.array([[3, 7, 11, 5], [60, 2, 9, 9]], np.int32)


def loaded(tmp_path, case, *overrides):
    cfg_json, make, forward = CASES[case]
    tensors = make(cfg_json)
    hf_dir = fx.write(tmp_path / case, cfg_json, tensors)
    cfg = hf.run_config(hf_dir, None, ["mesh.fsdp=4", "mesh.tensor=2", *overrides])
    mesh = MeshManager(cfg.mesh).build()
    a = abstract_state(cfg, describe(mesh))
    params = hf.load_params(hf_dir, cfg.model, a.shapes.params, a.logical_axes, sharding.named(mesh, a.specs.params))
    dcfg, dparams, graphdef = generate.unstacked(cfg, params, mesh)
    return generate.Generator(dcfg, graphdef, mesh), dparams, (a.graphdef, params), (tensors, cfg_json, forward, hf_dir)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_argmax_of_full_forward(tmp_path, case):
    # llama runs with scanned layers: decoding unstacks them
    gen, dparams, (graphdef, params), _ = loaded(tmp_path, case, *(["model.scan_layers=true"] if case == "llama-gqa" else []))
    new = gen(dparams, PROMPT, 20)
    assert new.shape == (2, 20)
    seq = np.concatenate([PROMPT, new], axis=1)
    logits = np.asarray(jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, seq))
    np.testing.assert_array_equal(np.argmax(logits[:, PROMPT.shape[1] - 1:-1], -1), new)
    # the cached decode's logits are the full forward's, position by position
    @jax.jit
    def prefill_and_step(p, seq):
        model = nnx.merge(gen.graphdef, p)
        pre, cache = model.decode(seq[:, :6], model.init_cache(2, seq.shape[1]), 0)
        return pre, model.decode(seq[:, 6:7], cache, 6)[0]

    pre, step = prefill_and_step(dparams, seq)
    np.testing.assert_allclose(np.asarray(pre), logits[:, :6], atol=1e-4)
    np.testing.assert_allclose(np.asarray(step)[:, 0], logits[:, 6], atol=1e-4)


def test_sampling_is_reproducible_and_stops_at_eos(tmp_path):
    gen, dparams, _, _ = loaded(tmp_path, "llama-gqa")
    a = gen(dparams, PROMPT, 16, temperature=1.0, top_k=8, seed=3)
    b = gen(dparams, PROMPT, 16, temperature=1.0, top_k=8, seed=3)
    c = gen(dparams, PROMPT, 16, temperature=1.0, top_k=8, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = gen(dparams, PROMPT[:1], 16)
    eos = int(greedy[0, 3])
    first = int(np.argmax(greedy[0] == eos))
    stopped = gen(dparams, PROMPT[:1], 16, eos_id=eos)
    np.testing.assert_array_equal(stopped[0], greedy[0, : first + 1])  # up to and including the first EOS


@pytest.mark.slow
def test_generate_script_hf_dir_matches_numpy(tmp_path):
    """scripts/generate.py --hf-dir: the greedy ids are the argmax of the independent numpy forward."""
    cfg_json, make, forward = CASES["llama-gqa"]
    tensors = make(cfg_json)
    hf_dir = fx.write(tmp_path / "llama", cfg_json, tensors)
    fx.write_tokenizer(hf_dir, 64)
    r = run_script("generate.py", "--hf-dir", str(hf_dir), "--prompt", "w3 w7 w11 w5", "--max-new-tokens", "10",
                   "--json", "mesh.tensor=2")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["prompt_ids"] == [3, 7, 11, 5] and len(out["ids"]) == 10
    assert out["text"] == " ".join(f"w{i}" for i in out["ids"])
    seq = np.array(out["prompt_ids"] + out["ids"])
    np.testing.assert_array_equal(np.argmax(forward(tensors, cfg_json, seq[:-1]), -1)[3:], out["ids"])
    r = run_script("generate.py", "--hf-dir", str(hf_dir), "--prompt", "w1", "--max-new-tokens", "40")
    assert r.returncode == 2
    assert r.stderr == "error: --prompt (1 tokens) + --max-new-tokens 40 = 41 exceeds model.max_seq_len=32\n"
