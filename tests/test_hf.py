"""Hugging Face import/export (framework/hf.py, scripts/hf.py) against hand-built HF-layout checkpoints.

The fixtures' names and shapes are those of transformers' GPT-2 and Llama code; the reference
logits come from a numpy forward pass written from the Hugging Face equations (tests/hf_fixtures.py).
"""
import json
import re

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from framework import hf, runs, sharding
from framework.config import ConfigError, load_config
from framework.mesh import MeshManager, describe
from framework.state import abstract_state
from tests import hf_fixtures as fx
from tests.helpers import TINY, run_script

GPT2_UNTIED = {**fx.GPT2_CONFIG, "tie_word_embeddings": False, "n_inner": 48}
LLAMA_TIED_MHA = {**fx.LLAMA_CONFIG, "num_key_value_heads": 4, "tie_word_embeddings": True, "rms_norm_eps": 1e-5}
CASES = {
    "gpt2": (fx.GPT2_CONFIG, fx.gpt2_tensors, fx.gpt2_forward),
    "gpt2-untied": (GPT2_UNTIED, fx.gpt2_tensors, fx.gpt2_forward),
    "llama-gqa": (fx.LLAMA_CONFIG, fx.llama_tensors, fx.llama_forward),
    "llama-tied": (LLAMA_TIED_MHA, fx.llama_tensors, fx.llama_forward),
    "qwen2": (fx.QWEN2_CONFIG, fx.llama_tensors, fx.llama_forward),
    "qwen3": (fx.QWEN3_CONFIG, fx.llama_tensors, fx.llama_forward),
    "mixtral": (fx.MIXTRAL_CONFIG, fx.llama_tensors, fx.llama_forward),
    "qwen3-moe": (fx.QWEN3_MOE_CONFIG, fx.llama_tensors, fx.llama_forward),
}
TOKENS = np.random.default_rng(7).integers(0, 64, (2, 16)).astype(np.int32)


def fixture(tmp_path, case, shards=1):
    cfg, make, forward = CASES[case]
    tensors = make(cfg)
    return fx.write(tmp_path / case, cfg, tensors, shards), cfg, tensors, forward


def import_logits(hf_dir, *overrides, devices=None, tokens=TOKENS):
    """Params loaded from ``hf_dir`` onto the mesh the overrides describe, and the model's logits of ``tokens``."""
    cfg = hf.run_config(hf_dir, None, overrides)
    mesh = MeshManager(cfg.mesh).build(devices)
    a = abstract_state(cfg, describe(mesh))
    shardings = sharding.named(mesh, a.specs.params)
    params = hf.load_params(hf_dir, cfg.model, a.shapes.params, a.logical_axes, shardings)
    assert jax.tree.all(jax.tree.map(lambda p, s: p.sharding == s, params, shardings))  # placed, not resharded later
    out = jax.jit(lambda p, x: nnx.merge(a.graphdef, p)(x))(params, tokens)
    logits = out[0] if isinstance(out, tuple) else out  # an MoE model also returns its routing loss and metrics
    return np.asarray(logits), params, cfg, a


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_independent_numpy_forward(tmp_path, case):
    hf_dir, cfg, tensors, forward = fixture(tmp_path, case)
    scanned = case in ("llama-gqa", "qwen3", "qwen3-moe")  # qwen3-moe: stacked groups of 2 layers (dense, sparse)
    logits, _, _, _ = import_logits(hf_dir, "mesh.fsdp=8", *(["model.scan_layers=true"] if scanned else []))
    ref = np.stack([forward(tensors, cfg, row) for row in TOKENS])
    np.testing.assert_allclose(logits, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("case", ["gpt2", "llama-gqa", "qwen3"])
def test_fsdp8_and_data2_tensor2_give_the_same_logits(tmp_path, case):
    hf_dir, *_ = fixture(tmp_path, case)
    a, _, _, _ = import_logits(hf_dir, "mesh.fsdp=8")
    b, params, _, _ = import_logits(hf_dir, "mesh.data=2", "mesh.fsdp=1", "mesh.tensor=2", devices=jax.devices()[:4])
    q = params["blocks"][0]["attn"]["query"]["kernel"]
    assert q.sharding.spec[1] == "tensor" and len(q.sharding.device_set) == 4  # heads split over tensor=2
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_each_device_holds_only_its_slice(tmp_path):
    hf_dir, cfg, tensors, _ = fixture(tmp_path, "llama-gqa")
    _, params, _, _ = import_logits(hf_dir, "mesh.fsdp=8")
    up = params["blocks"][1]["mlp"]["fc_in"]["kernel"]  # HF up_proj (f, d) -> (d, f), d split over fsdp=8
    full = tensors["model.layers.1.mlp.up_proj.weight"].T
    for shard in up.addressable_shards:
        assert shard.data.shape == (4, 48)
        np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_bit_identical_and_same_config(tmp_path, case):
    hf_dir, cfg, tensors, _ = fixture(tmp_path, case)
    _, params, mcfg, a = import_logits(hf_dir, "mesh.fsdp=8", *(["model.scan_layers=true"] if case == "qwen3-moe" else []))
    out = tmp_path / "out"
    hf.save(hf.hf_tensors(runs.gather(params), mcfg.model, a.logical_axes), hf.hf_config(mcfg.model), out)
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for name in tensors:
            back = f.get_tensor(name)
            assert back.dtype == tensors[name].dtype and np.array_equal(back, tensors[name]), name
        assert f.metadata() == {"format": "pt"}
    exported = json.loads((out / "config.json").read_text())
    assert exported["architectures"] == cfg["architectures"]
    assert hf.model_fields(exported, "out") == hf.model_fields(cfg, "in")


@pytest.mark.parametrize("case", ["mixtral", "qwen3-moe"])
def test_moe_experts_load_onto_the_expert_axis(tmp_path, case):
    """expert=2 x fsdp=2 x tensor=2: each device holds its experts' slice of the HF tensors, read straight from
    disk, and the expert-parallel model (8 rows: tokens travel to their experts) gives the numpy logits."""
    hf_dir, cfg, tensors, forward = fixture(tmp_path, case)
    tokens = np.random.default_rng(8).integers(0, 64, (8, 16)).astype(np.int32)
    scan = ["model.scan_layers=true"] if case == "qwen3-moe" else []
    logits, params, _, _ = import_logits(hf_dir, "mesh.expert=2", "mesh.fsdp=2", "mesh.tensor=2", *scan, tokens=tokens)
    ref = np.stack([forward(tensors, cfg, row) for row in tokens])
    np.testing.assert_allclose(logits, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    moe, name = ((params["blocks"][1]["mlp"], "model.layers.1.block_sparse_moe.experts.{e}.w1.weight") if not scan else
                 (params["blocks"]["layers"][1]["mlp"], "model.layers.{i}.mlp.experts.{e}.gate_proj.weight"))
    w_gate = moe["w_gate"]  # Mixtral [E, D, F] of layer 1; Qwen3-MoE [groups, E, D, F]: group g's layer 2g + 1
    assert "expert" in w_gate.sharding.spec
    full = (np.stack([tensors[name.format(e=e)].T for e in range(4)]) if not scan else
            np.stack([np.stack([tensors[name.format(i=2 * g + 1, e=e)].T for e in range(4)]) for g in range(2)]))
    for shard in w_gate.addressable_shards:
        assert shard.data.shape[-3] == 2  # 2 of the 4 experts on each device
        np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])


def test_moe_config_fields_and_errors():
    """Mixtral and Qwen3-MoE config.json -> model.moe; decoder_sparse_step is moe.every; mlp_only_layers that
    moe.every cannot express, a sliding window, and models no MoE architecture has are named."""
    mix = hf.model_fields(fx.MIXTRAL_CONFIG, "m")
    assert {k: v for k, v in mix.items() if k.startswith("moe.")} == {
        "moe.n_experts": 4, "moe.top_k": 2, "moe.d_expert_mlp": 24, "moe.every": 1, "moe.norm_topk_prob": True,
        "moe.n_shared_experts": 0, "moe.aux_loss_weight": 0.02}
    q = hf.model_fields(fx.QWEN3_MOE_CONFIG, "q")
    assert (q["moe.every"], q["moe.d_expert_mlp"], q["d_mlp"], q["moe.norm_topk_prob"], q["qk_norm"]) == (2, 16, 48, False, True)
    assert hf.model_fields({**fx.QWEN3_MOE_CONFIG, "mlp_only_layers": [0, 2]}, "q") == q  # dense already
    with pytest.raises(ConfigError, match=r"^q: mlp_only_layers=\[1\]: meshpilot supports no layer that decoder_sparse_step=2"):
        hf.model_fields({**fx.QWEN3_MOE_CONFIG, "mlp_only_layers": [1]}, "q")
    with pytest.raises(ConfigError, match=r"^m: sliding_window=4096: meshpilot supports null"):
        hf.model_fields({**fx.MIXTRAL_CONFIG, "sliding_window": 4096}, "m")
    base = ["model.style=llama", "model.moe.n_experts=4"]
    for overrides, message in ((["model.moe.n_shared_experts=1"], "model.moe.n_shared_experts=1: neither Mixtral"),
                               (["model.moe.every=2"], "model.moe.every=2: MixtralForCausalLM has every=1"),
                               (["model.qkv_bias=true"], "model.qkv_bias=true with model.moe: no Hugging Face")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            hf.hf_config(load_config(None, [*base, *overrides]).model)
    assert hf.arch_of(load_config(None, [*base, "model.qk_norm=true", "model.moe.every=2"]).model) == "Qwen3MoeForCausalLM"


def test_sharded_index_in_and_out(tmp_path):
    hf_dir, cfg, tensors, _ = fixture(tmp_path, "llama-gqa", shards=3)
    assert not (hf_dir / "model.safetensors").exists()
    sharded, params, mcfg, a = import_logits(hf_dir, "mesh.fsdp=8")
    single, *_ = import_logits(fixture(tmp_path / "single", "llama-gqa")[0], "mesh.fsdp=8")
    np.testing.assert_array_equal(sharded, single)
    out = tmp_path / "out"
    files = hf.save(hf.hf_tensors(runs.gather(params), mcfg.model, a.logical_axes), hf.hf_config(mcfg.model), out,
                    max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(files) > 1 and sorted({f.name for f in files}) == sorted(set(index["weight_map"].values()))
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    again, *_ = import_logits(out, "mesh.fsdp=8")
    np.testing.assert_array_equal(again, single)


def test_hub_gpt2_names_without_transformer_prefix(tmp_path):
    cfg, tensors = fx.GPT2_CONFIG, fx.gpt2_tensors(fx.GPT2_CONFIG)
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    bare["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))  # old checkpoints carry the causal mask
    logits, *_ = import_logits(fx.write(tmp_path / "bare", cfg, bare), "mesh.fsdp=8")
    ref, *_ = import_logits(fx.write(tmp_path / "full", cfg, tensors), "mesh.fsdp=8")
    np.testing.assert_array_equal(logits, ref)


def test_bad_checkpoints_are_named(tmp_path):
    cfg, tensors = fx.LLAMA_CONFIG, fx.llama_tensors(fx.LLAMA_CONFIG)
    missing = fx.write(tmp_path / "missing", cfg, {k: v for k, v in tensors.items() if "layers.1.mlp.up" not in k})
    with pytest.raises(ConfigError, match=r"tensor model.layers.1.mlp.up_proj.weight missing"):
        import_logits(missing, "mesh.fsdp=8")
    wrong = fx.write(tmp_path / "wrong", cfg, {**tensors, "model.norm.weight": np.ones(16, np.float32)})
    with pytest.raises(ConfigError, match=r"tensor model.norm.weight has shape \[16\], expected \[32\]"):
        import_logits(wrong, "mesh.fsdp=8")
    biased = fx.write(tmp_path / "biased", cfg, {**tensors, "model.layers.0.self_attn.q_proj.bias": np.ones(32, np.float32)})
    with pytest.raises(ConfigError, match=r"1 tensors the LlamaForCausalLM layout does not have.*q_proj.bias"):
        import_logits(biased, "mesh.fsdp=8")
    with pytest.raises(ConfigError, match=r"rope_scaling=.*llama3.*default RoPE"):
        hf.model_fields({**cfg, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "x")


def test_model_init_from_in_trainer(tmp_path):
    """``model.init_from``: the Trainer's fresh state has the imported params and a fresh optimizer state."""
    from framework.train import Trainer

    hf_dir, cfg, tensors, _ = fixture(tmp_path, "gpt2")
    tcfg = hf.run_config(hf_dir, None, ["data.source=synthetic", "logging.progress=false", "train.seq_len=16"])
    trainer = Trainer(tcfg)
    state = trainer.init_state()
    assert int(state.step) == 0
    np.testing.assert_array_equal(np.asarray(state.params["embed"]), tensors["transformer.wte.weight"])
    np.testing.assert_array_equal(np.asarray(state.params["blocks"][1]["attn"]["value"]["kernel"]).reshape(32, 32),
                                  tensors["transformer.h.1.attn.c_attn.weight"][:, 64:])
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(state.opt_state))  # fresh moments and counts


@pytest.mark.parametrize("name", list(fx.HUB_CONFIGS))
def test_hub_configs_have_no_unknown_fields(name):
    fields = hf.model_fields(fx.HUB_CONFIGS[name], name)
    assert fields["n_layers"] == fx.HUB_CONFIGS[name].get("num_hidden_layers", fx.HUB_CONFIGS[name].get("n_layer"))


def test_qwen_params_and_config_keys():
    """Qwen2 reads as model.qkv_bias, Qwen3 as model.qk_norm with its own head_dim (Qwen3Config's 128 when absent);
    the keys are validated, and a model without them is named as a mismatch."""
    q2 = hf.model_fields(fx.QWEN2_CONFIG, "q2")
    assert (q2["qkv_bias"], q2["qk_norm"], q2["head_dim"]) == (True, False, 8)
    q3 = hf.model_fields(fx.QWEN3_CONFIG, "q3")
    assert (q3["qkv_bias"], q3["qk_norm"], q3["head_dim"]) == (False, True, 16)
    assert hf.model_fields({k: v for k, v in fx.QWEN3_CONFIG.items() if k != "head_dim"}, "x")["head_dim"] == 128
    llama = [f"model.{k}={json.dumps(v)}" for k, v in hf.model_fields(fx.LLAMA_CONFIG, "l").items()]
    plain = load_config(None, [*llama, "train.seq_len=16"]).model
    assert hf.mismatches(plain, q2) == ["model.qkv_bias=False (config.json: True)",
                                        "model.tie_embeddings=False (config.json: True)",
                                        "model.rope_theta=500000.0 (config.json: 1000000.0)"]
    with pytest.raises(ConfigError, match=r"use_sliding_window=True: meshpilot supports full attention"):
        hf.model_fields({**fx.QWEN2_CONFIG, "use_sliding_window": True}, "x")
    with pytest.raises(ConfigError, match=r"attention_bias=True: meshpilot supports false"):
        hf.model_fields({**fx.QWEN3_CONFIG, "attention_bias": True}, "x")
    for overrides, message in (
        (["model.head_dim=-1"], "model.head_dim=-1: expected a positive integer or 0"),
        (["model.style=llama", "model.head_dim=7"], "model.head_dim=7: RoPE rotates pairs"),
        (["model.qk_norm=true"], "model.qk_norm=true needs model.style=llama (got model.style=gpt)"),
        (["model.d_model=30"], "model.d_model=30 is not divisible by model.n_heads=8 (or set model.head_dim)"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, overrides)
    load_config(None, ["model.d_model=30", "model.head_dim=4"])  # an explicit head width needs no divisibility
    with pytest.raises(ConfigError, match=r"model.qkv_bias=true with model.qk_norm=true: no Hugging Face architecture"):
        hf.hf_config(load_config(None, ["model.style=llama", "model.qkv_bias=true", "model.qk_norm=true"]).model)


def test_unknown_config_field_is_named_exit_2(tmp_path):
    """A config.json field meshpilot neither reads nor knows to be inert stops the import: one line naming it."""
    with pytest.raises(ConfigError, match=r"^x: unknown fields 'attn_logit_softcapping', 'layer_scale' for GPT2LMHeadModel"):
        hf.model_fields({**fx.GPT2_CONFIG, "attn_logit_softcapping": 30.0, "use_cache": True, "layer_scale": 1}, "x")
    hf_dir, *_ = fixture(tmp_path, "llama-gqa")
    (hf_dir / "config.json").write_text(json.dumps({**fx.LLAMA_CONFIG, "_name_or_path": "x", "use_cache": True,
                                                    "attn_logit_softcapping": 50.0}))
    r = run_script("hf.py", "import", "--hf-dir", str(hf_dir), "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr == (f"error: {hf_dir}/config.json: unknown field 'attn_logit_softcapping' for LlamaForCausalLM: "
                        "meshpilot does not know what it does to the model (remove it if it changes nothing)\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_import_mismatch_exit_2(tmp_path):
    hf_dir, *_ = fixture(tmp_path, "llama-gqa")
    r = run_script("hf.py", "import", "--hf-dir", str(hf_dir), "--run-dir", str(tmp_path / "run"), "--config", TINY)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: model config does not match {hf_dir}/config.json: ")
    for key in ("model.style='gpt' (config.json: 'llama')", "model.vocab_size=256 (config.json: 64)",
                "model.d_model=128 (config.json: 32)", "model.n_kv_heads=8 (config.json: 2)",
                "model.tie_embeddings=True (config.json: False)", "model.norm_eps=1e-05 (config.json: 1e-06)",
                "model.rope_theta=10000.0 (config.json: 500000.0)"):
        assert key in r.stderr, key
    r = run_script("hf.py", "--run-dir", str(tmp_path / "run"), "import", "--hf-dir", str(hf_dir), "model.n_layers=3")
    assert r.returncode == 2 and "model.n_layers=3 (config.json: 2)" in r.stderr, r.stderr[-2000:]
    (hf_dir / "config.json").write_text(json.dumps({**fx.LLAMA_CONFIG, "architectures": ["BertModel"]}))
    r = run_script("hf.py", "import", "--hf-dir", str(hf_dir), "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2
    assert r.stderr == (f"error: {hf_dir}/config.json: architectures=['BertModel']: "
                        f"expected one of {', '.join(hf.ARCHITECTURES)}\n")
    assert "GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM" in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gpt2", "llama-gqa"])
def test_cli_import_train_export(tmp_path, case):
    """import -> a run dir train.py resumes from step 0 and generate.py reads; export of step 0 is the original, bit for bit."""
    hf_dir, cfg, tensors, forward = fixture(tmp_path, case)
    fx.write_tokenizer(hf_dir, 64)
    run = tmp_path / "run"
    r = run_script("hf.py", "import", "--hf-dir", str(hf_dir), "--run-dir", str(run), "data.source=synthetic",
                   "logging.progress=false", "train.seq_len=16", "train.steps=2", "checkpoint.async=false")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "tokenizer.json").is_file() and (run / "checkpoints" / "0").is_dir()
    out = tmp_path / "out"
    r = run_script("hf.py", "export", "--run-dir", str(run), "--step", "0", "--out", str(out), "--max-shard-bytes", "30000")
    assert r.returncode == 0, r.stderr[-2000:]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(tensors)
    for name, file in index["weight_map"].items():
        with safe_open(out / file, framework="numpy") as f:
            assert np.array_equal(f.get_tensor(name), tensors[name]), name
    assert hf.model_fields(json.loads((out / "config.json").read_text()), "out") == hf.model_fields(cfg, "in")
    assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    r = run_script("train.py", "--config", str(run / "config.yaml"), "--run-dir", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from step 0" in r.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == [1, 2]
    # step 1's loss is the imported model's on batch 0: the independent numpy forward gives it too
    from framework.data import make_source

    tcfg = runs.load_run_config(run)
    batch = make_source(tcfg.data, tcfg.train, 64).rows(0, np.arange(16), 16)
    logits = np.stack([forward(tensors, cfg, row[:-1]) for row in batch])
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    expected = -np.take_along_axis(logp, batch[:, 1:, None], -1).mean()
    assert abs(records[0]["loss"] - expected) < 1e-4 * expected, (records[0]["loss"], expected)
    r = run_script("generate.py", "--run-dir", str(run), "--prompt", "w3 w7", "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)  # the run's tokenizer is the one import copied
    assert out["prompt_ids"] == [3, 7] and len(out["ids"]) == 4 and out["text"] == " ".join(f"w{i}" for i in out["ids"])


@pytest.mark.slow
def test_cli_moe_import_export_on_the_expert_axis(tmp_path):
    """scripts/hf.py import of a Qwen3-MoE checkpoint onto expert=2 with stacked layer groups, then export of
    step 0: the same tensors bit for bit and the same config."""
    hf_dir, cfg, tensors, _ = fixture(tmp_path, "qwen3-moe")
    run, out = tmp_path / "run", tmp_path / "out"
    r = run_script("hf.py", "import", "--hf-dir", str(hf_dir), "--run-dir", str(run), "data.source=synthetic",
                   "logging.progress=false", "train.seq_len=16", "checkpoint.async=false", "mesh.expert=2",
                   "model.scan_layers=true")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_script("hf.py", "export", "--run-dir", str(run), "--step", "0", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for name in tensors:
            assert np.array_equal(f.get_tensor(name), tensors[name]), name
    exported = json.loads((out / "config.json").read_text())
    assert exported["architectures"] == ["Qwen3MoeForCausalLM"] and exported["decoder_sparse_step"] == 2
    assert hf.model_fields(exported, "out") == hf.model_fields(cfg, "in")
