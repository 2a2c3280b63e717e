"""Decoder-only transformer LM in Flax NNX: GPT-2 style or Llama style, sizes from config.

Every weight carries logical axis names (``nnx.with_partitioning``) and every layer
boundary constrains its activation by name, so the same code shards on any mesh.
Intermediate values are tagged with ``checkpoint_name`` inside the (optionally
rematerialised) block, so remat/offload policies can name them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from framework.config import ModelConfig
from framework.sharding import constrain
from models import attention, context, moe, ops

BLC = ("batch", "length", "embed")  # residual stream layout


def _param(rngs: nnx.Rngs, shape, axes, dtype, init=nnx.initializers.normal(0.02)) -> nnx.Param:
    return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, dtype))


class Dense(nnx.Module):
    """``y = einsum(x, W) (+ b)`` with named kernel dimensions; computes in ``dtype``.

    Runs through ``models.ops.dense`` (the kernel's leading dims contract with x's trailing
    dims), so a broadcast plan can pick its mode by ``name`` (its module path).
    """

    def __init__(self, spec: str, shape, axes, *, bias_axes=None, dtype, param_dtype, rngs, std=0.02):
        self.spec = spec
        self.dtype = dtype
        x_dims, k_dims = spec.split("->")[0].split(",")
        self.n_in = len(set(x_dims) & set(k_dims))
        self.name = ""  # set by ops.name_layers once the model is built
        self.kernel = _param(rngs, shape, axes, param_dtype, nnx.initializers.normal(std))
        out_shape = [shape[i] for i, a in enumerate(axes) if a in (bias_axes or ())]
        self.bias = (
            nnx.Param(nnx.with_partitioning(nnx.initializers.zeros_init(), bias_axes)(rngs.params(), out_shape, param_dtype))
            if bias_axes
            else None
        )

    def __call__(self, x):
        bias = None if self.bias is None else self.bias[...].astype(self.dtype)
        return ops.dense(x.astype(self.dtype), self.kernel[...].astype(self.dtype), bias, name=self.name, n_in=self.n_in)


class Norm(nnx.Module):
    """LayerNorm (GPT-2) or RMSNorm (Llama), in float32 for stability; over the last axis, named ``axis``."""

    def __init__(self, d: int, kind: str, eps: float, param_dtype, rngs, axis: str = "embed"):
        self.kind, self.eps = kind, eps
        self.scale = nnx.Param(nnx.with_partitioning(nnx.initializers.ones_init(), (axis,))(rngs.params(), (d,), param_dtype))
        self.bias = (
            nnx.Param(nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",))(rngs.params(), (d,), param_dtype))
            if kind == "layer"
            else None
        )

    def __call__(self, x):
        dtype = x.dtype
        x = x.astype(jnp.float32)
        if self.kind == "layer":
            x = x - x.mean(-1, keepdims=True)
        x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps)
        x = x * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            x = x + self.bias[...].astype(jnp.float32)
        return x.astype(dtype)


def rope(x, positions, theta: float):
    """Rotary position embedding on (B, T, N, H) at ``positions``: (T,) for every row, or (B, T) (packed documents)."""
    h = x.shape[-1]
    freqs = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    if positions.ndim == 2:
        angles = positions[..., None].astype(jnp.float32) * freqs  # (B, T, H/2)
        sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    else:
        angles = positions[:, None].astype(jnp.float32) * freqs[None, :]  # (T, H/2)
        sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, param_dtype, rngs):
        d, n, hd = cfg.d_model, cfg.n_heads, cfg.resolved_head_dim
        kv = cfg.n_kv_heads or n
        self.cfg, self.dtype = cfg, dtype
        bias = cfg.style == "gpt"
        qkv_bias = bias or cfg.qkv_bias  # Qwen2: q, k, v biased, the output not
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = Dense("btd,dnh->btnh", (d, n, hd), ("embed", "heads", "head_dim"),
                           bias_axes=("heads", "head_dim") if qkv_bias else None, **kw)
        self.key = Dense("btd,dnh->btnh", (d, kv, hd), ("embed", "kv_heads", "head_dim"),
                         bias_axes=("kv_heads", "head_dim") if qkv_bias else None, **kw)
        self.value = Dense("btd,dnh->btnh", (d, kv, hd), ("embed", "kv_heads", "head_dim"),
                           bias_axes=("kv_heads", "head_dim") if qkv_bias else None, **kw)
        # Qwen3: each head's q and k RMS-normalised (one scale over head_dim, shared by the heads) before RoPE
        self.q_norm, self.k_norm = ((Norm(hd, "rms", cfg.norm_eps, param_dtype, rngs, axis="head_dim"),
                                     Norm(hd, "rms", cfg.norm_eps, param_dtype, rngs, axis="head_dim"))
                                    if cfg.qk_norm else (None, None))
        self.out = Dense("btnh,nhd->btd", (n, hd, d), ("heads", "head_dim", "embed"),
                         bias_axes=("embed",) if bias else None, std=0.02 / (2 * cfg.n_layers) ** 0.5, **kw)

    def _qkv(self, x, positions=None):
        """Projected q, k, v (RoPE applied in llama style) of tokens at ``positions`` (default: the true positions
        of the tokens as the mesh holds them, 0..T-1 without a context axis)."""
        q = checkpoint_name(constrain(self.query(x), ("batch", "length", "heads", "head_dim")), "query_proj")
        k = checkpoint_name(constrain(self.key(x), ("batch", "length", "kv_heads", "head_dim")), "key_proj")
        v = checkpoint_name(constrain(self.value(x), ("batch", "length", "kv_heads", "head_dim")), "value_proj")
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.cfg.style == "llama":
            positions = context.positions(x.shape[1]) if positions is None else positions
            q, k = rope(q, positions, self.cfg.rope_theta), rope(k, positions, self.cfg.rope_theta)
        return q, k, v

    def __call__(self, x, segment_ids=None, positions=None):
        q, k, v = self._qkv(x, positions)
        impl = {"xla": "xla", "cudnn": "cudnn", "auto": None}[self.cfg.attention]
        ctx = context.attention(q, k, v, segment_ids=segment_ids, mode=self.cfg.context_attention, implementation=impl)
        ctx = checkpoint_name(constrain(ctx, ("batch", "length", "heads", "head_dim")), "context")
        return checkpoint_name(self.out(ctx), "out_proj")

    def decode(self, x, cache_k, cache_v, start, positions=None, segment_ids=None, cache_segment_ids=None):
        """Attention of ``x`` (tokens ``start``.. ``start+T-1`` of the row) over the KV cache, after writing x's keys
        and values into it; with segment ids (x's and the cache's, this call's written in) only within a segment."""
        index = start + jnp.arange(x.shape[1])
        q, k, v = self._qkv(x, index if positions is None else positions)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, start, 0, 0))
        cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, start, 0, 0))
        cache_k = constrain(cache_k, ("batch", "length", "kv_heads", "head_dim"))
        cache_v = constrain(cache_v, ("batch", "length", "kv_heads", "head_dim"))
        ctx = attention.cached_attention(q, cache_k, cache_v, index, segment_ids, cache_segment_ids)
        return self.out(constrain(ctx, ("batch", "length", "heads", "head_dim"))), cache_k, cache_v


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, param_dtype, rngs):
        d, f = cfg.d_model, cfg.d_mlp
        self.style, self.gelu_approximate = cfg.style, cfg.gelu == "tanh"
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if cfg.style == "gpt":
            self.fc_in = Dense("btd,df->btf", (d, f), ("embed", "mlp"), bias_axes=("mlp",), **kw)
            self.gate = None
        else:
            self.fc_in = Dense("btd,df->btf", (d, f), ("embed", "mlp"), **kw)
            self.gate = Dense("btd,df->btf", (d, f), ("embed", "mlp"), **kw)
        self.fc_out = Dense("btf,fd->btd", (f, d), ("mlp", "embed"), bias_axes=("embed",) if cfg.style == "gpt" else None,
                            std=0.02 / (2 * cfg.n_layers) ** 0.5, **kw)

    def __call__(self, x):
        h = self.fc_in(x)
        if self.gate is None:
            h = jax.nn.gelu(h, approximate=self.gelu_approximate)
        else:
            h = jax.nn.silu(checkpoint_name(self.gate(x), "mlp_gate")) * h
        h = checkpoint_name(constrain(h, ("batch", "length", "mlp")), "mlp_hidden")
        return checkpoint_name(self.fc_out(h), "mlp_out")


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, param_dtype, rngs, is_moe: bool = False):
        norm = "layer" if cfg.style == "gpt" else "rms"
        self.ln_attn = Norm(cfg.d_model, norm, cfg.norm_eps, param_dtype, rngs)
        self.attn = Attention(cfg, dtype, param_dtype, rngs)
        self.ln_mlp = Norm(cfg.d_model, norm, cfg.norm_eps, param_dtype, rngs)
        if is_moe:  # models/moe.py: routed experts (and shared ones, a dense MLP)
            shared = MLP(moe.shared_config(cfg), dtype, param_dtype, rngs) if cfg.moe.n_shared_experts else None
            self.mlp = moe.MoE(cfg, dtype, param_dtype, rngs, shared)
        else:
            self.mlp = MLP(cfg, dtype, param_dtype, rngs)

    def __call__(self, x, segment_ids=None, positions=None):
        x, stats = moe.split(x)  # an MoE model's carry also holds the routing sums
        x = checkpoint_name(constrain(x, BLC), "decoder_layer_input")
        x = x + self.attn(self.ln_attn(x), segment_ids, positions)
        h, stats = moe.mlp_call(self.mlp, self.ln_mlp(x), stats)
        return moe.join(constrain(x + h, BLC), stats)

    def decode(self, x, cache_k, cache_v, start, *segments):
        h, cache_k, cache_v = self.attn.decode(self.ln_attn(constrain(x, BLC)), cache_k, cache_v, start, *segments)
        x = x + h
        x = x + self.mlp(self.ln_mlp(x))
        return constrain(x, BLC), cache_k, cache_v


class LayerGroup(nnx.Module):
    """``every`` consecutive layers, the last an MoE one: the scanned unit of an MoE model with moe.every > 1."""

    def __init__(self, cfg: ModelConfig, dtype, param_dtype, rngs):
        every = cfg.moe.every
        self.layers = nnx.List([Block(cfg, dtype, param_dtype, rngs, is_moe=j == every - 1) for j in range(every)])

    def __call__(self, x, segment_ids=None, positions=None):
        for block in self.layers:
            x = block(x, segment_ids, positions)
        return x


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer at every position so far: (layers, batch, length, kv_heads, head_dim) each;
    with packed rows, each position's segment id (batch, length)."""

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array | None = None


class Stages(Protocol):
    """What the model needs of a pipeline: run the stacked layers as stages (framework.pipeline.Pipeline)."""

    def run(self, stage_fn: Callable, stacked, x: jax.Array, logical_axes, unroll_ticks: bool = False) -> jax.Array: ...


def _to_device(module: nnx.Module) -> nnx.Module:
    """The module with its parameters brought to device memory (they live in pinned_host)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda a: jax.device_put(a, jax.memory.Space.Device), state))


class Transformer(nnx.Module):
    """tokens (B, T) int32 -> logits (B, T, vocab) float32; with ``model.moe`` (logits, {"loss": routing loss,
    "metrics": moe/...}) (models/moe.py).

    ``stream_params``: parameters live in pinned_host and each layer's weights are brought to
    the device where the layer runs. The fetch sits inside the remat boundary: with checkpointed
    layers the backward pass fetches them again; without, the device copies are kept for backward.
    ``pipeline``: the scanned layer stack runs as pipeline stages (``Stages``: framework/pipeline.py's
    ``Pipeline``); the parameters are the same either way, only their sharding differs.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat_policy: Callable | None = None, stream_params: bool = False,
                 pipeline: Stages | None = None):
        self.cfg, self.dtype = cfg, dtype
        self.remat_policy = remat_policy
        self.stream_params = stream_params
        self.pipeline = pipeline
        self.tied = cfg.tie_embeddings if cfg.tie_embeddings is not None else cfg.style == "gpt"
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), param_dtype)
        self.pos_embed = (
            _param(rngs, (cfg.max_seq_len, cfg.d_model), ("length", "embed"), param_dtype)  # std 0.02 as GPT-2
            if cfg.style == "gpt"
            else None
        )
        if cfg.scan_layers:
            grouped = cfg.moe.n_experts > 0 and cfg.moe.every > 1  # models/moe.py: groups of `every` layers
            self.n_stacked = cfg.n_layers // cfg.moe.every if grouped else cfg.n_layers

            @nnx.split_rngs(splits=self.n_stacked)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(r):
                if grouped:
                    return LayerGroup(cfg, dtype, param_dtype, r)
                return Block(cfg, dtype, param_dtype, r, is_moe=cfg.moe.n_experts > 0)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([Block(cfg, dtype, param_dtype, rngs, is_moe=moe.is_moe_layer(cfg, i))
                                    for i in range(cfg.n_layers)])
        self.ln_f = Norm(cfg.d_model, "layer" if cfg.style == "gpt" else "rms", cfg.norm_eps, param_dtype, rngs)
        self.unembed = None if self.tied else _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), param_dtype)
        ops.name_layers(self, Dense)

    def _fetch(self, x):
        return jax.device_put(x, jax.memory.Space.Device) if self.stream_params else x

    def _block_fn(self):
        """``call(block, x, segment_ids, positions)``: one layer, as configured (streamed, rematerialised)."""
        call = (lambda block, *a: _to_device(block)(*a)) if self.stream_params else (lambda block, *a: block(*a))
        if self.cfg.remat or self.remat_policy is not None:
            call = nnx.remat(call, policy=self.remat_policy, prevent_cse=not self.cfg.scan_layers)
        return call

    def __call__(self, tokens, *, segment_ids=None, positions=None):
        """Logits of ``tokens`` (B, T); packed rows give ``segment_ids`` (B, T: attention stays within a segment) and
        ``positions`` (B, T: each token's position in its document, for RoPE or the position embedding). Under a
        context axis the tokens come in the mesh's (zig-zag) order: models/context.py ``to_layout``."""
        x = ops.lookup(tokens, self._fetch(self.embed[...]), name="embed", param="embed", dtype=self.dtype)
        if self.pos_embed is not None:
            table = self._fetch(self.pos_embed[...])
            if positions is None and context.context_axis() is None:  # positions 0..T-1: the table's first rows
                x = x + table[: tokens.shape[1]].astype(self.dtype)
            else:  # a packed row's, or the zig-zag order's under a context axis
                where = context.positions(tokens.shape[1]) if positions is None else positions
                x = x + jnp.take(table, where, axis=0).astype(self.dtype)
        x = moe.start(self.cfg, constrain(x, BLC))  # an MoE model carries its routing sums beside x
        call = self._block_fn()
        if self.cfg.scan_layers:
            @nnx.scan(in_axes=(0, nnx.Carry, None, None), out_axes=nnx.Carry)
            def run(block, h, segment_ids, positions):
                return call(block, h, segment_ids, positions)

            if self.pipeline is not None:
                x = self._pipelined(run, x, segment_ids, positions)
            else:
                with ops.repeated(self.n_stacked):  # the plan charges the body's layers once per stacked layer
                    x = run(self.blocks, x, segment_ids, positions)
        else:
            for block in self.blocks:
                x = call(block, x, segment_ids, positions)
        x, stats = moe.split(x)
        logits = self._logits((_to_device(self.ln_f) if self.stream_params else self.ln_f)(x))
        return logits if stats is None else (logits, moe.finish(self.cfg, stats, tokens.shape[1]))

    def one_layer(self):
        """(fn(layer params, x) -> x, shapes of one layer's params): a single stacked layer as the model runs it,
        remat included; the planner traces it for the activation bytes one pipeline stage keeps per layer."""
        graphdef, stacked = nnx.split(self.blocks)
        call = self._block_fn()
        layer = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), stacked)
        return (lambda layer, x: call(nnx.merge(graphdef, layer), x, None, None)), layer

    def _pipelined(self, run, x, segment_ids=None, positions=None):
        """The stacked layers as pipeline stages: each stage scans its own contiguous layers. What travels from stage
        to stage with each micro-batch is flat: x, an MoE model's routing sums, a packed batch's segment ids and
        positions (passed on unchanged, so every stage masks and rotates as the unpipelined model does)."""
        graphdef, stacked = nnx.split(self.blocks)
        x, stats = moe.split(x)
        extra = {k: v for k, v in (("segment_ids", segment_ids), ("positions", positions)) if v is not None}
        carry = (x, *(() if stats is None else (stats,)), *extra.values())
        axes = (BLC, *(() if stats is None else (("batch", None),)), *(("batch", "length"),) * len(extra))
        n_carry = 1 if stats is None else 2

        def stage_fn(stage_blocks, h):
            seq = dict(zip(extra, h[n_carry:]))
            out = run(nnx.merge(graphdef, stage_blocks), moe.join(*h[:n_carry]) if stats is not None else h[0],
                      seq.get("segment_ids"), seq.get("positions"))
            return (*(out if isinstance(out, tuple) else (out,)), *h[n_carry:])

        if len(carry) == 1:  # a dense model without segments: x alone, as the pipeline had it before
            out = self.pipeline.run(lambda b, h: stage_fn(b, (h,))[0], stacked, x, BLC, unroll_ticks=self.stream_params)
            return constrain(out, BLC)
        out = self.pipeline.run(stage_fn, stacked, carry, axes, unroll_ticks=self.stream_params)
        return moe.join(constrain(out[0], BLC), out[1] if stats is not None else None)

    def _logits(self, x):
        """The output head, a broadcast layer named ``head``: its map mode splits the vocabulary and broadcasts ``x``."""
        w = self._fetch(self.embed[...]).T if self.tied else self._fetch(self.unembed[...])
        logits = ops.apply(
            lambda x, w: jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32), x, w.astype(self.dtype), None,
            name="head", kind="dense", out_axis=1, param="embed" if self.tied else "unembed", transposed=self.tied)
        return constrain(logits, ("batch", "length", "vocab"))

    # ------------------------------------------------------------------ generation (framework/generate.py)

    def init_cache(self, batch: int, length: int, segments: bool = False) -> KVCache:
        """An empty KV cache for ``length`` positions: keys and values of every layer, in the compute dtype; with
        ``segments``, room for each position's segment id (packed rows: ``decode(..., segment_ids=...)``)."""
        c = self.cfg
        shape = (c.n_layers, batch, length, c.n_kv_heads or c.n_heads, c.resolved_head_dim)
        seg = jnp.zeros((batch, length), jnp.int32) if segments else None
        return KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype), seg)

    def decode(self, tokens, cache: KVCache, start, *, segment_ids=None, positions=None) -> tuple[jax.Array, KVCache]:
        """Logits of ``tokens`` (B, T) at row positions ``start``.. given the cache of earlier positions; the cache, extended.

        Prefill is one call with the prompt (start 0); each later call adds one token. The training
        path (``__call__``) is untouched. Layers must be distinct modules (``model.scan_layers=false``;
        framework/generate.py unstacks scanned params). Packed rows (a cache made with ``segments``) pass each
        token's ``segment_ids`` and in-document ``positions`` (B, T), as training does.
        """
        if self.cfg.scan_layers or self.stream_params:
            raise ValueError("Transformer.decode needs model.scan_layers=false and device-resident params")
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        if self.pos_embed is not None:
            x = x + (jax.lax.dynamic_slice_in_dim(self.pos_embed[...], start, tokens.shape[1]) if positions is None
                     else jnp.take(self.pos_embed[...], positions, axis=0)).astype(self.dtype)
        seg = cache.segment_ids
        if (segment_ids is None) != (seg is None):
            raise ValueError("Transformer.decode: segment_ids need a cache made with init_cache(..., segments=True)")
        segments = ()
        if seg is not None:
            seg = jax.lax.dynamic_update_slice(seg, segment_ids.astype(seg.dtype), (0, start))
            segments = (segment_ids, seg)
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block.decode(x, cache.k[i], cache.v[i], start, positions, *segments)
            ks.append(k)
            vs.append(v)
        return self._logits(self.ln_f(x)), KVCache(jnp.stack(ks), jnp.stack(vs), seg)
