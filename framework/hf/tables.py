"""One name table per Hugging Face architecture, read top to bottom.

Each row: Hugging Face tensor name -> meshpilot param path, with how the tensor is laid out.
A meshpilot param ``M`` is obtained from the Hugging Face tensor ``H`` by

    1. split:     fused tensors: piece ``part`` of ``parts`` equal pieces of H's last axis;
    2. transpose: Hugging Face stores the kernel (out, in); meshpilot contracts (in, out);
    3. reshape:   to meshpilot's named dims, e.g. (d, n*hd) -> (d, n, hd).

Export applies the inverse (reshape, transpose, concatenate the pieces). ``{i}`` is the layer.
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

ARCHITECTURES = {"GPT2LMHeadModel": ("gpt", GPT2), "LlamaForCausalLM": ("llama", LLAMA),
                 "Qwen2ForCausalLM": ("llama", QWEN2), "Qwen3ForCausalLM": ("llama", QWEN3)}


def arch_of(m: ModelConfig) -> str:
    """The Hugging Face architecture a meshpilot model config is (import checks it, export writes it)."""
    if m.style == "gpt":
        return "GPT2LMHeadModel"
    if m.qkv_bias and m.qk_norm:
        raise ConfigError("model.qkv_bias=true with model.qk_norm=true: no Hugging Face architecture meshpilot "
                          "reads or writes has both (Qwen2 has the biases, Qwen3 the norms)")
    return "Qwen2ForCausalLM" if m.qkv_bias else "Qwen3ForCausalLM" if m.qk_norm else "LlamaForCausalLM"


def table_of(m: ModelConfig) -> tuple[Rule, ...]:
    return ARCHITECTURES[arch_of(m)][1]

# buffers some checkpoints carry that are not parameters (causal masks, RoPE frequencies)
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
