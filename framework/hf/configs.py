"""config.json <-> meshpilot's ``model.*``: what a Hugging Face config implies, and what export writes.

Every field of a config.json is either read here (``FIELDS``: it shapes the params or the numerics,
and values meshpilot cannot run are named in one line), or known not to change the forward pass
(``INERT``: dropout, generation defaults, bookkeeping), or unknown: then import stops with one line
naming it, rather than load a model that might compute something else.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from framework.config import Config, ConfigError, ModelConfig, TrainConfig, load_config
from framework.hf.tables import ARCHITECTURES, arch_of

GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "exact"}
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")

# PretrainedConfig's own attributes, generation defaults, dropout (meshpilot has none) and bookkeeping:
# none of them changes the forward pass of the params. Fields starting with "_" are bookkeeping too.
INERT = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache", "initializer_range",
    *TOKEN_IDS, "sep_token_id", "decoder_start_token_id", "tokenizer_class", "prefix", "task_specific_params",
    "problem_type", "id2label", "label2id", "finetuning_task", "return_dict", "output_attentions",
    "output_hidden_states", "output_scores", "return_dict_in_generate", "torchscript", "use_bfloat16",
    "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "cross_attention_hidden_size", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "attention_dropout",
    "pretraining_tp",  # Llama: the same product computed in slices
})
_GPT2_FIELDS = {"vocab_size", "n_positions", "n_ctx", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
                "layer_norm_epsilon", "tie_word_embeddings", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
                "add_cross_attention", "resid_pdrop", "embd_pdrop", "attn_pdrop", "reorder_and_upcast_attn",
                "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
                "summary_first_dropout"}  # summary_*: GPT2DoubleHeadsModel's head, not in a causal LM
_DECODER_FIELDS = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                   "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings"}
_WINDOW_FIELDS = {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}  # Qwen: checked off
FIELDS = {
    "GPT2LMHeadModel": _GPT2_FIELDS,
    "LlamaForCausalLM": _DECODER_FIELDS | {"attention_bias", "mlp_bias"},
    "Qwen2ForCausalLM": _DECODER_FIELDS | _WINDOW_FIELDS,
    "Qwen3ForCausalLM": _DECODER_FIELDS | _WINDOW_FIELDS | {"attention_bias"},
    "MixtralForCausalLM": _DECODER_FIELDS | {"num_local_experts", "num_experts_per_tok", "router_aux_loss_coef",
                                             "router_jitter_noise", "output_router_logits", "sliding_window"},
    "Qwen3MoeForCausalLM": _DECODER_FIELDS | _WINDOW_FIELDS | {
        "attention_bias", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
        "mlp_only_layers", "norm_topk_prob", "router_aux_loss_coef", "output_router_logits"},
}
QWEN3_HEAD_DIM = 128  # Qwen3Config's and Qwen3MoeConfig's default head_dim when config.json has none
QK_NORM = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{hf_dir}: no config.json (expected a Hugging Face model directory)")
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise ConfigError(f"{path}: not valid JSON") from None


def architecture(hf: dict, where: str) -> str:
    archs = hf.get("architectures") or []
    known = [a for a in archs if a in ARCHITECTURES]
    if not known:
        raise ConfigError(f"{where}: architectures={archs}: expected one of {', '.join(ARCHITECTURES)}")
    return known[0]


def check_known(hf: dict, arch: str, where: str) -> None:
    """One line naming every config.json field meshpilot neither reads nor knows to be harmless."""
    unknown = [k for k in hf if not k.startswith("_") and k not in INERT and k not in FIELDS[arch]]
    if unknown:
        raise ConfigError(f"{where}: unknown field{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} for {arch}: "
                          "meshpilot does not know what it does to the model (remove it if it changes nothing)")


def model_fields(hf: dict, where: str) -> dict[str, Any]:
    """The meshpilot ``model.*`` values a Hugging Face config.json implies (one-line error if unsupported)."""
    arch = architecture(hf, where)
    check_known(hf, arch, where)
    try:
        return (_gpt2_fields if arch == "GPT2LMHeadModel" else _llama_fields)(hf, arch, where)
    except KeyError as e:
        raise ConfigError(f"{where}: {e.args[0]} missing") from None


def _unsupported(where, key, value, expected):
    raise ConfigError(f"{where}: {key}={value!r}: meshpilot supports {expected}")


def _gpt2_fields(hf: dict, arch: str, where: str) -> dict[str, Any]:
    act = hf.get("activation_function", "gelu_new")
    if act not in GELU:
        _unsupported(where, "activation_function", act, " or ".join(GELU))
    for key, default, supported in (("scale_attn_by_inverse_layer_idx", False, False), ("scale_attn_weights", True, True),
                                    ("add_cross_attention", False, False)):
        if bool(hf.get(key, default)) != supported:
            _unsupported(where, key, hf[key], str(supported).lower())
    d = hf["n_embd"]
    return dict(style="gpt", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
                n_kv_heads=hf["n_head"], head_dim=d // hf["n_head"], d_mlp=hf.get("n_inner") or 4 * d,
                max_seq_len=hf["n_positions"], tie_embeddings=hf.get("tie_word_embeddings", True),
                norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), gelu=GELU[act], **{"moe.n_experts": 0})


def _llama_fields(hf: dict, arch: str, where: str) -> dict[str, Any]:
    """Llama, Qwen2, Qwen3, Mixtral, Qwen3-MoE: one decoder, with q/k/v biases (Qwen2) or q/k norms and their
    own head_dim (Qwen3, Qwen3-MoE), and routed experts (Mixtral, Qwen3-MoE; ``_moe_fields``)."""
    if hf.get("hidden_act", "silu") != "silu":
        _unsupported(where, "hidden_act", hf["hidden_act"], "'silu'")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False):
            _unsupported(where, key, True, "false (biased o_proj or MLP; Qwen2's q/k/v biases are supported)")
    if hf.get("use_sliding_window", False) or set(hf.get("layer_types") or ["full_attention"]) != {"full_attention"}:
        _unsupported(where, "use_sliding_window", True, "full attention in every layer (use_sliding_window=false)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers 5 / 4 spelling
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        _unsupported(where, "rope_scaling", rope, "the default RoPE (no scaling)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or (QWEN3_HEAD_DIM if arch in QK_NORM else d // n)
    fields = dict(style="llama", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=n,
                  n_kv_heads=hf.get("num_key_value_heads") or n, head_dim=head_dim, qkv_bias=arch == "Qwen2ForCausalLM",
                  qk_norm=arch in QK_NORM, d_mlp=hf["intermediate_size"],
                  max_seq_len=hf.get("max_position_embeddings", 2048), tie_embeddings=hf.get("tie_word_embeddings", False),
                  norm_eps=float(hf.get("rms_norm_eps", 1e-6)),  # LlamaConfig's default; Llama-2 sets 1e-5
                  rope_theta=float(theta))
    return {**fields, **_moe_fields(hf, arch, where)}


def _moe_fields(hf: dict, arch: str, where: str) -> dict[str, Any]:
    """``model.moe.*`` (dotted keys): Mixtral's experts in every layer, renormalised top-k; Qwen3-MoE's every
    decoder_sparse_step-th layer (models/moe.py's moe.every: layer i when (i + 1) % every == 0)."""
    if arch == "MixtralForCausalLM":
        for key, value, expected in (("sliding_window", None, "null (full attention)"),
                                     ("router_jitter_noise", 0.0, "0.0 (no noise on the router's input)")):
            if hf.get(key, value) != value:
                _unsupported(where, key, hf[key], expected)
        return {"moe.n_experts": hf["num_local_experts"], "moe.top_k": hf["num_experts_per_tok"],
                "moe.d_expert_mlp": hf["intermediate_size"], "moe.every": 1, "moe.norm_topk_prob": True,
                "moe.n_shared_experts": 0, "moe.aux_loss_weight": float(hf.get("router_aux_loss_coef", 0.02))}
    if arch == "Qwen3MoeForCausalLM":
        step = hf.get("decoder_sparse_step", 1)
        dense = hf.get("mlp_only_layers") or []
        if set(dense) & {i for i in range(hf["num_hidden_layers"]) if (i + 1) % step == 0}:
            _unsupported(where, "mlp_only_layers", dense, f"no layer that decoder_sparse_step={step} makes sparse "
                         "(meshpilot's model.moe.every: layer i is MoE when (i + 1) % every == 0)")
        return {"moe.n_experts": hf["num_experts"], "moe.top_k": hf["num_experts_per_tok"],
                "moe.d_expert_mlp": hf["moe_intermediate_size"], "moe.every": step,
                "moe.norm_topk_prob": bool(hf.get("norm_topk_prob", False)), "moe.n_shared_experts": 0,
                "moe.aux_loss_weight": float(hf.get("router_aux_loss_coef", 0.001))}
    return {"moe.n_experts": 0}


def effective(m: ModelConfig) -> dict[str, Any]:
    """The model's values as they shape params and numerics (defaults resolved)."""
    return dict(style=m.style, vocab_size=m.vocab_size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
                n_kv_heads=m.n_kv_heads or m.n_heads, head_dim=m.resolved_head_dim, qkv_bias=m.qkv_bias,
                qk_norm=m.qk_norm, d_mlp=m.d_mlp, max_seq_len=m.max_seq_len,
                tie_embeddings=m.tie_embeddings if m.tie_embeddings is not None else m.style == "gpt",
                norm_eps=m.norm_eps, rope_theta=m.rope_theta, gelu=m.gelu,
                **{f"moe.{k}": getattr(m.moe, k) for k in ("n_experts", "top_k", "every", "norm_topk_prob",
                                                            "n_shared_experts", "aux_loss_weight")},
                **{"moe.d_expert_mlp": m.moe.d_expert_mlp or m.d_mlp})


def mismatches(m: ModelConfig, fields: dict[str, Any]) -> list[str]:
    """``model.key=ours (config.json: theirs)`` for every value that differs.

    A llama model's max_seq_len shapes no param (RoPE), so fine-tuning may use another; the routing
    loss weight (router_aux_loss_coef) is a training choice too.
    """
    ours = effective(m)
    skip = {"max_seq_len", "moe.aux_loss_weight"} if fields["style"] == "llama" else set()
    return [f"model.{k}={ours[k]!r} (config.json: {v!r})" for k, v in fields.items()
            if k not in skip and ours[k] != v]


def check_model(m: ModelConfig, hf_dir: str | Path) -> dict:
    """Raise one ConfigError naming every mismatch between ``m`` and ``hf_dir``'s config.json; return that config."""
    hf = read_hf_config(hf_dir)
    bad = mismatches(m, model_fields(hf, f"{hf_dir}/config.json"))
    if bad:
        raise ConfigError(f"model config does not match {hf_dir}/config.json: {'; '.join(bad)}")
    return hf


def hf_config(m: ModelConfig, token_ids: dict | None = None) -> dict:
    """config.json for ``transformers``' from_pretrained; ``token_ids``: bos/eos/pad ids to record."""
    e, arch = effective(m), arch_of(m)
    common = dict(vocab_size=m.vocab_size, tie_word_embeddings=e["tie_embeddings"], torch_dtype="float32")
    common.update({k: (token_ids or {}).get(k) for k in TOKEN_IDS})  # null, not GPT2Config's 50256, when unknown
    if arch == "GPT2LMHeadModel":
        return dict(architectures=[arch], model_type="gpt2", n_embd=m.d_model, n_layer=m.n_layers,
                    n_head=m.n_heads, n_inner=m.d_mlp, n_positions=m.max_seq_len, n_ctx=m.max_seq_len,
                    activation_function="gelu_new" if m.gelu == "tanh" else "gelu", layer_norm_epsilon=m.norm_eps,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    decoder = dict(architectures=[arch], hidden_size=m.d_model, num_hidden_layers=m.n_layers,
                   num_attention_heads=m.n_heads, num_key_value_heads=e["n_kv_heads"], head_dim=e["head_dim"],
                   intermediate_size=m.d_mlp, max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
                   rope_theta=m.rope_theta, hidden_act="silu", **common)
    if arch == "LlamaForCausalLM":
        return dict(model_type="llama", **decoder, attention_bias=False, mlp_bias=False)
    if arch == "Qwen2ForCausalLM":  # q/k/v biases are Qwen2's own; it reads head_dim when given
        return dict(model_type="qwen2", **decoder, use_sliding_window=False)
    if arch == "Qwen3ForCausalLM":
        return dict(model_type="qwen3", **decoder, attention_bias=False, use_sliding_window=False)
    moe = dict(num_experts_per_tok=m.moe.top_k, router_aux_loss_coef=m.moe.aux_loss_weight)
    if arch == "MixtralForCausalLM":  # its intermediate_size is the experts' width
        return dict(model_type="mixtral", **{**decoder, "intermediate_size": e["moe.d_expert_mlp"]},
                    num_local_experts=m.moe.n_experts, sliding_window=None, **moe)
    return dict(model_type="qwen3_moe", **decoder, attention_bias=False, use_sliding_window=False,
                num_experts=m.moe.n_experts, moe_intermediate_size=e["moe.d_expert_mlp"],
                decoder_sparse_step=m.moe.every, mlp_only_layers=[], norm_topk_prob=m.moe.norm_topk_prob, **moe)


def run_config(hf_dir: str | Path, config_path: str | Path | None = None, overrides=()) -> Config:
    """The run config that starts from ``hf_dir`` (``model.init_from`` set).

    With ``config_path`` its model must match config.json; without, the defaults take config.json's
    model (and ``train.seq_len`` at most its context). Overrides apply last; a model value they set
    against config.json is a mismatch too. Every mismatch is named in one ConfigError.
    """
    fields = model_fields(read_hf_config(hf_dir), f"{hf_dir}/config.json")
    implied = [] if config_path else [f"model.{k}={json.dumps(v)}" for k, v in fields.items()] + \
        [f"train.seq_len={min(TrainConfig.seq_len, fields['max_seq_len'])}"]
    cfg = load_config(config_path, [*implied, *overrides, f"model.init_from={json.dumps(str(hf_dir))}"])
    check_model(cfg.model, hf_dir)
    return cfg
