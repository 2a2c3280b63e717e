"""Hand-built Hugging Face checkpoints (names and shapes as transformers' GPT-2 and Llama code
define them, random values) and an independent numpy forward pass written from the Hugging Face
equations: no meshpilot code is used here, so the two can check each other.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

GPT2_CONFIG = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=64, n_positions=32, n_embd=32,
                   n_layer=2, n_head=4, n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                   tie_word_embeddings=True)
LLAMA_CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=32,
                    intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=32, rms_norm_eps=1e-6, rope_theta=500000.0, hidden_act="silu",
                    tie_word_embeddings=False)
# Qwen2: q/k/v biases; Qwen3: q/k RMSNorm per head and a head_dim other than hidden_size / heads (16, not 8)
QWEN2_CONFIG = dict(LLAMA_CONFIG, architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=1000000.0,
                    tie_word_embeddings=True, use_sliding_window=False, sliding_window=32, max_window_layers=2)
QWEN3_CONFIG = dict(LLAMA_CONFIG, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=16,
                    rope_theta=1000000.0, attention_bias=False, use_sliding_window=False, sliding_window=None)
# Mixtral: 4 experts (width intermediate_size=24), top-2 renormalised, every layer sparse
MIXTRAL_CONFIG = dict(LLAMA_CONFIG, architectures=["MixtralForCausalLM"], model_type="mixtral", intermediate_size=24,
                      rms_norm_eps=1e-5, rope_theta=1000000.0, num_local_experts=4, num_experts_per_tok=2,
                      router_aux_loss_coef=0.02, router_jitter_noise=0.0, sliding_window=None, output_router_logits=False)
# Qwen3-MoE: Qwen3's attention; layers 1 and 3 of 4 sparse (decoder_sparse_step 2), 0 and 2 dense (width 48);
# 4 experts of width 16, top-2 not renormalised (norm_topk_prob false, Qwen3MoeConfig's default)
QWEN3_MOE_CONFIG = dict(QWEN3_CONFIG, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_hidden_layers=4,
                        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=2,
                        mlp_only_layers=[], norm_topk_prob=False, router_aux_loss_coef=0.001, output_router_logits=False)


def gpt2_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """GPT2LMHeadModel's state dict as save_pretrained writes it (Conv1D weights are (in, out))."""
    r = np.random.default_rng(seed)
    d, f, v = cfg["n_embd"], cfg["n_inner"] or 4 * cfg["n_embd"], cfg["vocab_size"]
    w = lambda *s: (0.3 * r.standard_normal(s)).astype(np.float32)  # noqa: E731
    gain = lambda n: (1 + 0.1 * r.standard_normal(n)).astype(np.float32)  # noqa: E731
    t = {"transformer.wte.weight": w(v, d), "transformer.wpe.weight": w(cfg["n_positions"], d)}
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        t.update({
            p + "ln_1.weight": gain(d), p + "ln_1.bias": w(d),
            p + "attn.c_attn.weight": w(d, 3 * d), p + "attn.c_attn.bias": w(3 * d),
            p + "attn.c_proj.weight": w(d, d), p + "attn.c_proj.bias": w(d),
            p + "ln_2.weight": gain(d), p + "ln_2.bias": w(d),
            p + "mlp.c_fc.weight": w(d, f), p + "mlp.c_fc.bias": w(f),
            p + "mlp.c_proj.weight": w(f, d), p + "mlp.c_proj.bias": w(d),
        })
    t["transformer.ln_f.weight"], t["transformer.ln_f.bias"] = gain(d), w(d)
    if not cfg.get("tie_word_embeddings", True):
        t["lm_head.weight"] = w(v, d)
    return t


def _arch(cfg: dict) -> str:
    return cfg["architectures"][0]


def _qk_norm(cfg: dict) -> bool:
    return _arch(cfg) in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")


def _sparse(cfg: dict, i: int):
    """Layer i's sparse MLP as (module, gate, up, down, expert width), or None for a dense one (HF's rules)."""
    if _arch(cfg) == "MixtralForCausalLM":
        return "block_sparse_moe", "w1", "w3", "w2", cfg["intermediate_size"]
    if (_arch(cfg) == "Qwen3MoeForCausalLM" and i not in cfg["mlp_only_layers"] and cfg["num_experts"] > 0
            and (i + 1) % cfg["decoder_sparse_step"] == 0):
        return "mlp", "gate_proj", "up_proj", "down_proj", cfg["moe_intermediate_size"]
    return None


def _experts(cfg: dict) -> int:
    return cfg.get("num_local_experts") or cfg.get("num_experts", 0)


def llama_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """LlamaForCausalLM's state dict (nn.Linear weights are (out, in)); Qwen2's adds q/k/v biases, Qwen3's
    q_norm/k_norm weights (head_dim,); Mixtral's and Qwen3-MoE's sparse layers a router (experts, d) and
    one gate/up/down per expert."""
    r = np.random.default_rng(seed)
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    n, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // n
    w = lambda *s: (0.3 * r.standard_normal(s)).astype(np.float32)  # noqa: E731
    gain = lambda n_: (1 + 0.1 * r.standard_normal(n_)).astype(np.float32)  # noqa: E731
    t = {"model.embed_tokens.weight": w(v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({
            p + "input_layernorm.weight": gain(d),
            p + "self_attn.q_proj.weight": w(n * hd, d), p + "self_attn.k_proj.weight": w(kv * hd, d),
            p + "self_attn.v_proj.weight": w(kv * hd, d), p + "self_attn.o_proj.weight": w(d, n * hd),
            p + "post_attention_layernorm.weight": gain(d),
        })
        sparse = _sparse(cfg, i)
        if sparse is None:
            t.update({p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
                      p + "mlp.down_proj.weight": w(d, f)})
        else:
            mod, gate, up, down, fe = sparse
            t[p + f"{mod}.gate.weight"] = w(_experts(cfg), d)
            for e in range(_experts(cfg)):
                x = p + f"{mod}.experts.{e}."
                t.update({x + f"{gate}.weight": w(fe, d), x + f"{up}.weight": w(fe, d), x + f"{down}.weight": w(d, fe)})
        if _arch(cfg) == "Qwen2ForCausalLM":
            t.update({p + "self_attn.q_proj.bias": w(n * hd), p + "self_attn.k_proj.bias": w(kv * hd),
                      p + "self_attn.v_proj.bias": w(kv * hd)})
        if _qk_norm(cfg):
            t.update({p + "self_attn.q_norm.weight": gain(hd), p + "self_attn.k_norm.weight": gain(hd)})
    t["model.norm.weight"] = gain(d)
    if not cfg.get("tie_word_embeddings", False):
        t["lm_head.weight"] = w(v, d)
    return t


def write(hf_dir: Path, cfg: dict, tensors: dict[str, np.ndarray], shards: int = 1) -> Path:
    """config.json + model.safetensors, or ``shards`` files with model.safetensors.index.json."""
    hf_dir.mkdir(parents=True, exist_ok=True)
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    if shards == 1:
        save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
        return hf_dir
    names = list(tensors)
    weight_map = {}
    for k in range(shards):
        part = names[k::shards]
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(hf_dir / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return hf_dir


# ------------------------------------------------------------------ numpy forward from the Hugging Face equations


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _causal_attention(q, k, v):
    """q (n, T, hd), k/v (n, T, hd) -> (T, n*hd)."""
    t, hd = q.shape[1], q.shape[2]
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    return (_softmax(scores) @ v).transpose(1, 0, 2).reshape(t, -1)


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def gpt2_forward(t: dict, cfg: dict, tokens: np.ndarray) -> np.ndarray:
    """GPT2LMHeadModel logits (T, vocab) for one sequence, float64."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    d, n, eps = cfg["n_embd"], cfg["n_head"], cfg["layer_norm_epsilon"]
    gelu_new = lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))  # noqa: E731
    T = len(tokens)
    h = t["transformer.wte.weight"][tokens] + t["transformer.wpe.weight"][:T]
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        a = _layer_norm(h, t[p + "ln_1.weight"], t[p + "ln_1.bias"], eps)
        qkv = a @ t[p + "attn.c_attn.weight"] + t[p + "attn.c_attn.bias"]  # Conv1D: x @ W, W (in, out)
        q, k, v = (x.reshape(T, n, d // n).transpose(1, 0, 2) for x in np.split(qkv, 3, axis=-1))
        h = h + _causal_attention(q, k, v) @ t[p + "attn.c_proj.weight"] + t[p + "attn.c_proj.bias"]
        m = _layer_norm(h, t[p + "ln_2.weight"], t[p + "ln_2.bias"], eps)
        h = h + gelu_new(m @ t[p + "mlp.c_fc.weight"] + t[p + "mlp.c_fc.bias"]) @ t[p + "mlp.c_proj.weight"] \
            + t[p + "mlp.c_proj.bias"]
    h = _layer_norm(h, t["transformer.ln_f.weight"], t["transformer.ln_f.bias"], eps)
    head = t.get("lm_head.weight", t["transformer.wte.weight"])
    return h @ head.T


def llama_forward(t: dict, cfg: dict, tokens: np.ndarray) -> np.ndarray:
    """LlamaForCausalLM logits (T, vocab) for one sequence, float64 (rotate_half RoPE, repeat_kv for GQA).

    Qwen2ForCausalLM: q/k/v projections add their biases. Qwen3ForCausalLM (and Qwen3-MoE): head_dim from the
    config; q_norm and k_norm (RMSNorm over head_dim, per head) on the projected q and k, before RoPE.
    Mixtral / Qwen3-MoE sparse layers: ``_sparse_mlp``.
    """
    t = {k: v.astype(np.float64) for k, v in t.items()}
    d, n, kv, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]
    hd = cfg.get("head_dim") or d // n
    T = len(tokens)
    inv_freq = 1.0 / cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    emb = np.concatenate([np.outer(np.arange(T), inv_freq)] * 2, axis=-1)  # (T, hd)
    cos, sin = np.cos(emb), np.sin(emb)

    def rotate_half(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return np.concatenate([-x2, x1], axis=-1)

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    silu = lambda x: x / (1 + np.exp(-x))  # noqa: E731
    h = t["model.embed_tokens.weight"][tokens]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = rms(h, t[p + "input_layernorm.weight"])
        bias = {x: t[p + f"self_attn.{x}_proj.bias"] if _arch(cfg) == "Qwen2ForCausalLM" else 0.0 for x in "qkv"}
        q = (a @ t[p + "self_attn.q_proj.weight"].T + bias["q"]).reshape(T, n, hd)  # nn.Linear: x @ W.T + b
        k = (a @ t[p + "self_attn.k_proj.weight"].T + bias["k"]).reshape(T, kv, hd)
        v = (a @ t[p + "self_attn.v_proj.weight"].T + bias["v"]).reshape(T, kv, hd)
        if _qk_norm(cfg):  # Qwen3RMSNorm(head_dim) on q_proj(x).view(..., heads, head_dim)
            q, k = rms(q, t[p + "self_attn.q_norm.weight"]), rms(k, t[p + "self_attn.k_norm.weight"])
        q, k, v = (x.transpose(1, 0, 2) for x in (q, k, v))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, n // kv, axis=0), np.repeat(v, n // kv, axis=0)  # repeat_kv
        h = h + _causal_attention(q, k, v) @ t[p + "self_attn.o_proj.weight"].T
        m = rms(h, t[p + "post_attention_layernorm.weight"])
        if _sparse(cfg, i) is not None:
            h = h + _sparse_mlp(t, cfg, i, m)
        else:
            h = h + (silu(m @ t[p + "mlp.gate_proj.weight"].T) * (m @ t[p + "mlp.up_proj.weight"].T)) \
                @ t[p + "mlp.down_proj.weight"].T
    h = rms(h, t["model.norm.weight"])
    head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    return h @ head.T


def _sparse_mlp(t: dict, cfg: dict, i: int, x: np.ndarray) -> np.ndarray:
    """MixtralSparseMoeBlock / Qwen3MoeSparseMoeBlock on x (T, d), token by token: softmax over all experts'
    router logits, the top num_experts_per_tok kept (renormalised: always in Mixtral, with norm_topk_prob in
    Qwen3-MoE), each chosen expert's down(silu(gate(x)) * up(x)) weighted and summed."""
    mod, gate, up, down, _ = _sparse(cfg, i)
    p = f"model.layers.{i}.{mod}."
    logits = x @ t[p + "gate.weight"].T  # (T, experts)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    renorm = _arch(cfg) == "MixtralForCausalLM" or cfg.get("norm_topk_prob", False)
    out = np.zeros_like(x)
    for row, token in enumerate(x):
        top = np.argsort(-probs[row])[: cfg["num_experts_per_tok"]]
        weights = probs[row, top] / (probs[row, top].sum() if renorm else 1.0)
        for e, weight in zip(top, weights):
            ex = p + f"experts.{e}."
            g, u = token @ t[ex + f"{gate}.weight"].T, token @ t[ex + f"{up}.weight"].T
            out[row] += weight * ((g / (1 + np.exp(-g)) * u) @ t[ex + f"{down}.weight"].T)
    return out


def write_tokenizer(hf_dir: Path, vocab_size: int) -> list[str]:
    """A word-level tokenizer.json over ``vocab_size`` words ("w0".."w{V-1}"), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = [f"w{i}" for i in range(vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(hf_dir / "tokenizer.json"))
    return words


# config.json of real hub checkpoints (gpt2, Llama-3.2-1B without its llama3 RoPE scaling, Qwen2.5-0.5B, Qwen3-0.6B,
# Mixtral-8x7B-v0.1, Qwen3-30B-A3B), as published: every field must be read or known inert
HUB_CONFIGS = {
    "gpt2": {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
             "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
             "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
             "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": None,
             "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
             "summary_use_proj": True, "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
             "vocab_size": 50257},
    "llama-3.2-1b": {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
                     "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
                     "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
                     "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
                     "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
                     "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": True,
                     "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0", "use_cache": True,
                     "vocab_size": 128256},
    "qwen2.5-0.5b": {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
                     "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
                     "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
                     "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
                     "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
                     "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True,
                     "use_sliding_window": False, "vocab_size": 151936},
    "qwen3-0.6b": {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
                   "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
                   "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
                   "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
                   "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
                   "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
                   "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
                   "use_sliding_window": False, "vocab_size": 151936},
    "mixtral-8x7b": {"architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
                     "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
                     "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
                     "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
                     "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
                     "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
                     "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                     "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000},
    "qwen3-30b-a3b": {"architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
                      "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
                      "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
                      "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
                      "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": True,
                      "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
                      "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
                      "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
                      "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                      "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
                      "vocab_size": 151936},
}
