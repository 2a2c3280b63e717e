"""One name table per Hugging Face architecture, read top to bottom.

Each row: Hugging Face tensor name -> meshpilot param path, with how the tensor is laid out.
A meshpilot param ``M`` is obtained from the Hugging Face tensor ``H`` by

    1. split:     fused tensors: piece ``part`` of ``parts`` equal pieces of H's last axis;
    2. transpose: Hugging Face stores the kernel (out, in); meshpilot contracts (in, out);
    3. reshape:   to meshpilot's named dims, e.g. (d, n*hd) -> (d, n, hd).

Export applies the inverse (reshape, transpose, concatenate the pieces). ``{i}`` is the layer,
``{e}`` the expert (one Hugging Face tensor per expert, stacked on the meshpilot param's expert dim).
"""
from __future__ import annotations

import dataclasses

from framework.config import ConfigError, ModelConfig


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # Hugging Face tensor name; {i}: layer index
    path: str  # meshpilot param path ("/"-separated); {i}: layer index
    transpose: bool = False  # Hugging Face (out, in) -> meshpilot (in, ...)
    part: int = 0  # fused tensors: this param is piece `part` ...
    parts: int = 1  # ... of `parts` equal pieces of the Hugging Face tensor's last axis


# GPT-2 (GPT2LMHeadModel). Conv1D stores weights (in, out): no transpose. q, k, v are fused
# in c_attn along the output axis, in that order. GELU is the tanh approximation ("gelu_new").
# The output head is tied to wte unless tie_word_embeddings is false; then lm_head is (vocab, d).
# Older checkpoints (the hub's "gpt2") name tensors without the "transformer." prefix: both load.
GPT2 = (
    Rule("transformer.wte.weight", "embed"),
    Rule("transformer.wpe.weight", "pos_embed"),
    Rule("transformer.h.{i}.ln_1.weight", "blocks/{i}/ln_attn/scale"),
    Rule("transformer.h.{i}.ln_1.bias", "blocks/{i}/ln_attn/bias"),
    Rule("transformer.h.{i}.attn.c_attn.weight", "blocks/{i}/attn/query/kernel", part=0, parts=3),
    Rule("transformer.h.{i}.attn.c_attn.weight", "blocks/{i}/attn/key/kernel", part=1, parts=3),
    Rule("transformer.h.{i}.attn.c_attn.weight", "blocks/{i}/attn/value/kernel", part=2, parts=3),
    Rule("transformer.h.{i}.attn.c_attn.bias", "blocks/{i}/attn/query/bias", part=0, parts=3),
    Rule("transformer.h.{i}.attn.c_attn.bias", "blocks/{i}/attn/key/bias", part=1, parts=3),
    Rule("transformer.h.{i}.attn.c_attn.bias", "blocks/{i}/attn/value/bias", part=2, parts=3),
    Rule("transformer.h.{i}.attn.c_proj.weight", "blocks/{i}/attn/out/kernel"),
    Rule("transformer.h.{i}.attn.c_proj.bias", "blocks/{i}/attn/out/bias"),
    Rule("transformer.h.{i}.ln_2.weight", "blocks/{i}/ln_mlp/scale"),
    Rule("transformer.h.{i}.ln_2.bias", "blocks/{i}/ln_mlp/bias"),
    Rule("transformer.h.{i}.mlp.c_fc.weight", "blocks/{i}/mlp/fc_in/kernel"),
    Rule("transformer.h.{i}.mlp.c_fc.bias", "blocks/{i}/mlp/fc_in/bias"),
    Rule("transformer.h.{i}.mlp.c_proj.weight", "blocks/{i}/mlp/fc_out/kernel"),
    Rule("transformer.h.{i}.mlp.c_proj.bias", "blocks/{i}/mlp/fc_out/bias"),
    Rule("transformer.ln_f.weight", "ln_f/scale"),
    Rule("transformer.ln_f.bias", "ln_f/bias"),
    Rule("lm_head.weight", "unembed", transpose=True),
)

# Llama (LlamaForCausalLM). nn.Linear stores (out, in): every kernel is transposed. q, k, v, o
# are separate; k and v have num_key_value_heads heads (grouped-query attention). RoPE: both
# Hugging Face Llama and meshpilot rotate split halves (rotate_half), so q and k copy without
# the interleave permutation Meta's original checkpoints need. The MLP is
# down(silu(gate(x)) * up(x)): meshpilot's gate is gate_proj, fc_in is up_proj.
LLAMA = (
    Rule("model.embed_tokens.weight", "embed"),
    Rule("model.layers.{i}.input_layernorm.weight", "blocks/{i}/ln_attn/scale"),
    Rule("model.layers.{i}.self_attn.q_proj.weight", "blocks/{i}/attn/query/kernel", transpose=True),
    Rule("model.layers.{i}.self_attn.k_proj.weight", "blocks/{i}/attn/key/kernel", transpose=True),
    Rule("model.layers.{i}.self_attn.v_proj.weight", "blocks/{i}/attn/value/kernel", transpose=True),
    Rule("model.layers.{i}.self_attn.o_proj.weight", "blocks/{i}/attn/out/kernel", transpose=True),
    Rule("model.layers.{i}.post_attention_layernorm.weight", "blocks/{i}/ln_mlp/scale"),
    Rule("model.layers.{i}.mlp.gate_proj.weight", "blocks/{i}/mlp/gate/kernel", transpose=True),
    Rule("model.layers.{i}.mlp.up_proj.weight", "blocks/{i}/mlp/fc_in/kernel", transpose=True),
    Rule("model.layers.{i}.mlp.down_proj.weight", "blocks/{i}/mlp/fc_out/kernel", transpose=True),
    Rule("model.norm.weight", "ln_f/scale"),
    Rule("lm_head.weight", "unembed", transpose=True),
)

# Qwen2 (Qwen2ForCausalLM): Llama's layout, plus biases on q, k and v (o_proj has none). A bias
# (n*hd,) is meshpilot's (n, hd) bias merged, like the kernels' output axis.
QWEN2 = (
    *LLAMA[:5],
    Rule("model.layers.{i}.self_attn.q_proj.bias", "blocks/{i}/attn/query/bias"),
    Rule("model.layers.{i}.self_attn.k_proj.bias", "blocks/{i}/attn/key/bias"),
    Rule("model.layers.{i}.self_attn.v_proj.bias", "blocks/{i}/attn/value/bias"),
    *LLAMA[5:],
)

# Qwen3 (Qwen3ForCausalLM): Llama's layout with its own head_dim (q_proj (n*head_dim, d), o_proj
# (d, n*head_dim)), plus q_norm and k_norm: one RMSNorm weight (head_dim,) each, applied to every
# head of q and k after the projection and before RoPE.
QWEN3 = (
    *LLAMA[:5],
    Rule("model.layers.{i}.self_attn.q_norm.weight", "blocks/{i}/attn/q_norm/scale"),
    Rule("model.layers.{i}.self_attn.k_norm.weight", "blocks/{i}/attn/k_norm/scale"),
    *LLAMA[5:],
)

# The routed experts of an MoE layer (models/moe.py): the router [D, E] is the transposed gate (E, D);
# expert e's w1/gate_proj, w3/up_proj, w2/down_proj (out, in) are w_gate[e], w_up[e], w_down[e] transposed.
# {e} is the expert: E Hugging Face tensors make one meshpilot param, stacked on its leading expert dim.
def _experts(moe: str, gate: str, up: str, down: str) -> tuple[Rule, ...]:
    return (
        Rule(f"model.layers.{{i}}.{moe}.gate.weight", "blocks/{i}/mlp/router", transpose=True),
        Rule(f"model.layers.{{i}}.{moe}.experts.{{e}}.{gate}.weight", "blocks/{i}/mlp/w_gate", transpose=True),
        Rule(f"model.layers.{{i}}.{moe}.experts.{{e}}.{up}.weight", "blocks/{i}/mlp/w_up", transpose=True),
        Rule(f"model.layers.{{i}}.{moe}.experts.{{e}}.{down}.weight", "blocks/{i}/mlp/w_down", transpose=True),
    )


# Mixtral (MixtralForCausalLM): Llama's attention; every layer's MLP is block_sparse_moe, its experts
# w2(silu(w1(x)) * w3(x)). Routing: softmax over all experts, top-k, renormalised (always).
MIXTRAL = (*LLAMA[:7], *_experts("block_sparse_moe", "w1", "w3", "w2"), *LLAMA[10:])

# Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3's attention (q/k norms, head_dim); layer i's mlp is sparse
# (mlp.gate, mlp.experts.{e}.gate_proj/up_proj/down_proj) when (i + 1) % decoder_sparse_step == 0, else
# dense like Llama's. Only the rows whose meshpilot param exists apply to a layer.
QWEN3_MOE = (*QWEN3[:-2], *_experts("mlp", "gate_proj", "up_proj", "down_proj"), *QWEN3[-2:])

ARCHITECTURES = {"GPT2LMHeadModel": ("gpt", GPT2), "LlamaForCausalLM": ("llama", LLAMA),
                 "Qwen2ForCausalLM": ("llama", QWEN2), "Qwen3ForCausalLM": ("llama", QWEN3),
                 "MixtralForCausalLM": ("llama", MIXTRAL), "Qwen3MoeForCausalLM": ("llama", QWEN3_MOE)}


def arch_of(m: ModelConfig) -> str:
    """The Hugging Face architecture a meshpilot model config is (import checks it, export writes it)."""
    e = m.moe
    if m.style == "gpt":
        if e.n_experts:
            raise ConfigError("model.moe.n_experts with model.style=gpt: no Hugging Face GPT-2 has experts")
        return "GPT2LMHeadModel"
    if m.qkv_bias and (m.qk_norm or e.n_experts):
        raise ConfigError(f"model.qkv_bias=true with {'model.qk_norm=true' if m.qk_norm else 'model.moe'}: no Hugging "
                          "Face architecture meshpilot reads or writes has both (Qwen2 has the biases)")
    if not e.n_experts:
        return "Qwen2ForCausalLM" if m.qkv_bias else "Qwen3ForCausalLM" if m.qk_norm else "LlamaForCausalLM"
    if e.n_shared_experts:
        raise ConfigError(f"model.moe.n_shared_experts={e.n_shared_experts}: neither Mixtral nor Qwen3-MoE has shared experts")
    if m.qk_norm:
        return "Qwen3MoeForCausalLM"
    for key, value, mixtral in (("every", e.every, 1), ("norm_topk_prob", e.norm_topk_prob, True)):
        if value != mixtral:
            raise ConfigError(f"model.moe.{key}={value!r}: MixtralForCausalLM has {key}={mixtral!r} "
                              "(with model.qk_norm=true the model is a Qwen3MoeForCausalLM, which has both)")
    return "MixtralForCausalLM"


def table_of(m: ModelConfig) -> tuple[Rule, ...]:
    return ARCHITECTURES[arch_of(m)][1]

# buffers some checkpoints carry that are not parameters (causal masks, RoPE frequencies)
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
