"""Hugging Face checkpoints <-> meshpilot params: safetensors in and out, no torch.

Each architecture has one table, read top to bottom: Hugging Face tensor name -> meshpilot
param path, with how the tensor is laid out. A meshpilot param ``M`` is obtained from the
Hugging Face tensor ``H`` by

    1. split:     fused tensors: piece ``part`` of ``parts`` equal pieces of H's last axis;
    2. transpose: Hugging Face stores the kernel (out, in); meshpilot contracts (in, out);
    3. reshape:   to meshpilot's named dims, e.g. (d, n*hd) -> (d, n, hd).

Export applies the inverse (reshape, transpose, concatenate the pieces). ``{i}`` is the layer.

Import places every tensor straight into its sharding: ``jax.make_array_from_callback`` asks
for the slice each local device holds, and only that slice is read from disk (safetensors'
``get_slice``), so no process reads what its devices do not hold, and no device ever holds
the whole model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from framework.config import Config, ConfigError, ModelConfig, TrainConfig, load_config
from framework.fileio import atomic_path, atomic_write


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

ARCHITECTURES = {"GPT2LMHeadModel": ("gpt", GPT2), "LlamaForCausalLM": ("llama", LLAMA)}
STYLE_ARCH = {style: arch for arch, (style, _) in ARCHITECTURES.items()}
# buffers some checkpoints carry that are not parameters (causal masks, RoPE frequencies)
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "exact"}
DEFAULT_MAX_SHARD_BYTES = 5 << 30  # transformers' save_pretrained default max_shard_size ("5GB")


# ------------------------------------------------------------------ config.json <-> model config


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


def model_fields(hf: dict, where: str) -> dict[str, Any]:
    """The meshpilot ``model.*`` values a Hugging Face config.json implies (one-line error if unsupported)."""
    try:
        return _model_fields(hf, where)
    except KeyError as e:
        raise ConfigError(f"{where}: {e.args[0]} missing") from None


def _model_fields(hf: dict, where: str) -> dict[str, Any]:
    arch = architecture(hf, where)

    def unsupported(key, value, expected):
        raise ConfigError(f"{where}: {key}={value!r}: meshpilot supports {expected}")

    if arch == "GPT2LMHeadModel":
        act = hf.get("activation_function", "gelu_new")
        if act not in GELU:
            unsupported("activation_function", act, " or ".join(GELU))
        if hf.get("scale_attn_by_inverse_layer_idx", False):
            unsupported("scale_attn_by_inverse_layer_idx", True, "false")
        if not hf.get("scale_attn_weights", True):
            unsupported("scale_attn_weights", False, "true")
        d = hf["n_embd"]
        return dict(style="gpt", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
                    n_kv_heads=hf["n_head"], d_mlp=hf.get("n_inner") or 4 * d, max_seq_len=hf["n_positions"],
                    tie_embeddings=hf.get("tie_word_embeddings", True), norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                    gelu=GELU[act])
    if hf.get("hidden_act", "silu") != "silu":
        unsupported("hidden_act", hf["hidden_act"], "'silu'")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False):
            unsupported(key, True, "false (no biases in llama style)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers 5 / 4 spelling
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        unsupported("rope_scaling", rope, "the default RoPE (no scaling)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // n):
        unsupported("head_dim", hf["head_dim"], f"hidden_size / num_attention_heads = {d // n}")
    return dict(style="llama", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=n,
                n_kv_heads=hf.get("num_key_value_heads") or n, d_mlp=hf["intermediate_size"],
                max_seq_len=hf.get("max_position_embeddings", 2048), tie_embeddings=hf.get("tie_word_embeddings", False),
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),  # LlamaConfig's default; Llama-2 sets 1e-5
                rope_theta=float(theta))


def _effective(m: ModelConfig) -> dict[str, Any]:
    """The model's values as they shape params and numerics (defaults resolved)."""
    return dict(style=m.style, vocab_size=m.vocab_size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
                n_kv_heads=m.n_kv_heads or m.n_heads, d_mlp=m.d_mlp, max_seq_len=m.max_seq_len,
                tie_embeddings=m.tie_embeddings if m.tie_embeddings is not None else m.style == "gpt",
                norm_eps=m.norm_eps, rope_theta=m.rope_theta, gelu=m.gelu)


def mismatches(m: ModelConfig, fields: dict[str, Any]) -> list[str]:
    """``model.key=ours (config.json: theirs)`` for every value that differs.

    A llama model's max_seq_len shapes no param (RoPE), so fine-tuning may use another.
    """
    ours = _effective(m)
    skip = {"max_seq_len"} if fields["style"] == "llama" else set()
    return [f"model.{k}={ours[k]!r} (config.json: {v!r})" for k, v in fields.items()
            if k not in skip and ours[k] != v]


def check_model(m: ModelConfig, hf_dir: str | Path) -> dict:
    """Raise one ConfigError naming every mismatch between ``m`` and ``hf_dir``'s config.json; return that config."""
    hf = read_hf_config(hf_dir)
    bad = mismatches(m, model_fields(hf, f"{hf_dir}/config.json"))
    if bad:
        raise ConfigError(f"model config does not match {hf_dir}/config.json: {'; '.join(bad)}")
    return hf


TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def hf_config(m: ModelConfig, token_ids: dict | None = None) -> dict:
    """config.json for ``transformers``' from_pretrained (both styles); ``token_ids``: bos/eos/pad ids to record."""
    e = _effective(m)
    common = dict(vocab_size=m.vocab_size, tie_word_embeddings=e["tie_embeddings"], torch_dtype="float32")
    common.update({k: (token_ids or {}).get(k) for k in TOKEN_IDS})  # null, not GPT2Config's 50256, when unknown
    if m.style == "gpt":
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_embd=m.d_model, n_layer=m.n_layers,
                    n_head=m.n_heads, n_inner=m.d_mlp, n_positions=m.max_seq_len, n_ctx=m.max_seq_len,
                    activation_function="gelu_new" if m.gelu == "tanh" else "gelu", layer_norm_epsilon=m.norm_eps,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=m.d_model,
                num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=e["n_kv_heads"],
                head_dim=m.d_model // m.n_heads, intermediate_size=m.d_mlp, max_position_embeddings=m.max_seq_len,
                rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, hidden_act="silu", attention_bias=False,
                mlp_bias=False, **common)


# ------------------------------------------------------------------ tables -> per-param sources


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + "/") if isinstance(v, dict) else {key: v})
    return out


def _unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        parts = [int(p) if p.isdigit() else p for p in path.split("/")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return tree



# ------------------------------------------------------------------ tables -> one placement per meshpilot param


@dataclasses.dataclass(frozen=True)
class Placement:
    """How one meshpilot param relates to Hugging Face tensors (one layer's view)."""

    rule: Rule
    names: tuple[str, ...]  # one Hugging Face name per layer when layer-stacked (scan_layers), else one
    stacked: bool  # the meshpilot param has a leading layer axis
    layer_shape: tuple[int, ...]  # one layer's meshpilot shape
    groups: tuple[tuple[int, ...], ...]  # meshpilot dims whose product is each (transposed, unsplit) Hugging Face dim

    @property
    def merged_shape(self) -> tuple[int, ...]:  # meshpilot dims merged: (d, n, hd) -> (d, n*hd)
        return tuple(math.prod(self.layer_shape[j] for j in g) for g in self.groups)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        h = self.merged_shape[::-1] if self.rule.transpose else self.merged_shape
        return h[:-1] + (h[-1] * self.rule.parts,)


def _groups(axes) -> tuple[tuple[int, ...], ...]:
    """Hugging Face keeps heads and head_dim as one dim (n*hd); every other named dim stands alone."""
    groups: list[list[int]] = []
    for j, name in enumerate(axes):
        if name == "head_dim" and groups:
            groups[-1].append(j)
        else:
            groups.append([j])
    return tuple(tuple(g) for g in groups)


def plan(m: ModelConfig, shapes: dict[str, Any], axes: dict[str, tuple]) -> dict[str, Placement]:
    """meshpilot param path -> Placement, from the architecture's table (flat "/" paths in, table order out)."""
    _, table = ARCHITECTURES[STYLE_ARCH[m.style]]
    out: dict[str, Placement] = {}

    def add(path, rule, names, stacked):
        shape, ax = tuple(shapes[path].shape), tuple(axes[path])
        if stacked:
            shape, ax = shape[1:], ax[1:]
        out[path] = Placement(rule, tuple(names), stacked, shape, _groups(ax))

    for rule in table:
        if "{i}" not in rule.path:
            if rule.path in shapes:
                add(rule.path, rule, [rule.hf], False)
        elif m.scan_layers:
            path = rule.path.replace("{i}/", "")
            if path in shapes:
                add(path, rule, [rule.hf.format(i=i) for i in range(m.n_layers)], True)
        else:
            for i in range(m.n_layers):
                if rule.path.format(i=i) in shapes:
                    add(rule.path.format(i=i), rule, [rule.hf.format(i=i)], False)
    unmapped = sorted(set(shapes) - set(out))
    if unmapped:
        raise ValueError(f"no Hugging Face tensor maps to meshpilot params {unmapped}")
    return out


# ------------------------------------------------------------------ import


def weight_files(hf_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or a sharded index)."""
    d = Path(hf_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError):
            raise ConfigError(f"{index}: expected JSON with a 'weight_map'") from None
        return {name: d / file for name, file in weight_map.items()}
    single = d / "model.safetensors"
    if single.is_file():
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    raise ConfigError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json "
                      "(pytorch_model.bin is not read: save the model with safe_serialization)")


def _read_slice(tensor, p: Placement, index: tuple[slice, ...]) -> np.ndarray:
    """One layer's meshpilot ``[index]`` read from the Hugging Face tensor: only the rows and columns it covers."""
    merged, expand, rest = [], [], []
    for g in p.groups:
        start, stop, _ = index[g[0]].indices(p.layer_shape[g[0]])
        inner = math.prod(p.layer_shape[j] for j in g[1:])
        merged.append(slice(start * inner, stop * inner))  # whole heads: contiguous along the merged dim
        expand += [stop - start] + [p.layer_shape[j] for j in g[1:]]
        rest += [slice(None)] + [index[j] for j in g[1:]]  # a split head_dim is cut after reading
    h = merged[::-1] if p.rule.transpose else merged
    width = p.hf_shape[-1] // p.rule.parts
    h[-1] = slice(h[-1].start + p.rule.part * width, h[-1].stop + p.rule.part * width)
    x = tensor[tuple(h)]
    x = x.T if p.rule.transpose else x
    return x.reshape(expand)[tuple(rest)]


def load_params(hf_dir: str | Path, m: ModelConfig, shapes: dict, logical_axes: dict, shardings: dict) -> dict:
    """The model's params read from ``hf_dir``, each created directly in its sharding.

    ``shapes``/``logical_axes``/``shardings``: the abstract params' trees (framework.state). Each
    local device's callback reads only its own slice from disk; replicated slices are read once.
    """
    check_model(m, hf_dir)
    flat_shapes, flat_shardings = _flatten(shapes), _flatten(shardings)
    placements = plan(m, flat_shapes, _flatten(logical_axes))
    files = weight_files(hf_dir)

    def resolve(name: str) -> str:  # the hub's GPT-2 files name tensors without "transformer."
        bare = name.removeprefix("transformer.")
        return name if name in files or bare not in files else bare

    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def tensor(name: str):
            path = files[resolve(name)]
            if path not in handles:
                if not path.is_file():
                    raise ConfigError(f"{path}: listed in model.safetensors.index.json but missing")
                handles[path] = stack.enter_context(safe_open(path, framework="numpy"))
            return handles[path].get_slice(resolve(name))

        _check_tensors(hf_dir, m, placements, files, resolve, tensor)
        out = {}
        for path, p in placements.items():
            out[path] = _place(p, tensor, flat_shapes[path], flat_shardings[path])
    return _unflatten(out)


def _check_tensors(hf_dir, m: ModelConfig, placements, files, resolve, tensor) -> None:
    used = set()
    for p in placements.values():
        for name in p.names:
            if resolve(name) not in files:
                raise ConfigError(f"{hf_dir}: tensor {name} missing (needed for the {m.style} model's {p.rule.path})")
            shape = tuple(tensor(name).get_shape())
            if shape != p.hf_shape:
                raise ConfigError(f"{hf_dir}: tensor {name} has shape {list(shape)}, expected {list(p.hf_shape)}")
            used.add(resolve(name))
    tied_head = {"lm_head.weight"} if _effective(m)["tie_embeddings"] else set()  # some tied checkpoints store it too
    extra = sorted(n for n in set(files) - used - tied_head if not n.endswith(IGNORED_SUFFIXES))
    if extra:
        raise ConfigError(f"{hf_dir}: {len(extra)} tensors the {STYLE_ARCH[m.style]} layout does not have, e.g. {extra[:3]}")


def _place(p: Placement, tensor, shape: jax.ShapeDtypeStruct, sharding) -> jax.Array:
    cache: dict[tuple, np.ndarray] = {}

    def read(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple(s.indices(n)[:2] for s, n in zip(index, shape.shape))
        if key not in cache:
            if p.stacked:
                lo, hi, _ = index[0].indices(shape.shape[0])
                x = np.stack([_read_slice(tensor(p.names[i]), p, index[1:]) for i in range(lo, hi)])
            else:
                x = _read_slice(tensor(p.names[0]), p, index)
            cache[key] = np.asarray(x, dtype=shape.dtype)
        return cache[key]

    return jax.make_array_from_callback(shape.shape, sharding, read)


# ------------------------------------------------------------------ export


def hf_tensors(params: dict, m: ModelConfig, logical_axes: dict) -> dict[str, np.ndarray]:
    """Full host params (numpy) -> Hugging Face tensors, in table order (reshape, transpose, fuse)."""
    flat = _flatten(params)
    pieces: dict[str, dict[int, np.ndarray]] = {}
    placements = plan(m, flat, _flatten(logical_axes))
    for path, p in placements.items():
        layers = flat[path] if p.stacked else [flat[path]]
        for name, layer in zip(p.names, layers):
            merged = np.asarray(layer).reshape(p.merged_shape)
            pieces.setdefault(name, {})[p.rule.part] = merged.T if p.rule.transpose else merged
    out = {}
    for name, parts in pieces.items():
        x = np.concatenate([parts[k] for k in sorted(parts)], axis=-1) if len(parts) > 1 else parts[0]
        if x.dtype.name not in ("float32", "float16", "float64"):
            x = x.astype(np.float32)  # bfloat16: safetensors' numpy writer has no BF16; float32 holds it exactly
        out[name] = np.ascontiguousarray(x)
    return out


def save(tensors: dict[str, np.ndarray], config: dict, out_dir: str | Path,
         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer: str | Path | None = None) -> list[Path]:
    """Write config.json and safetensors as ``save_pretrained`` does: one model.safetensors, or
    model-0000k-of-0000n.safetensors plus model.safetensors.index.json above ``max_shard_bytes``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in tensors.items():
        if shards[-1] and size + x.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    # Crash-safe order: an earlier save's index goes first and the new one comes last, each file renamed into
    # place complete (fileio), so a killed save leaves no index naming shards that are missing or half new.
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    if len(shards) == 1:
        files = [out / "model.safetensors"]
    else:
        files = [out / f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for f, shard in zip(files, shards):
        with atomic_path(f) as tmp:
            save_file(shard, str(tmp), metadata=meta)
    atomic_write(out / "config.json", json.dumps(config, indent=2))
    if tokenizer is not None:
        with atomic_path(out / "tokenizer.json") as tmp:
            shutil.copyfile(tokenizer, tmp)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())},
                 "weight_map": {name: f.name for f, shard in zip(files, shards) for name in shard}}
        atomic_write(out / "model.safetensors.index.json", json.dumps(index, indent=2))
    return files


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
