"""Autoregressive generation: prefill the KV cache with the prompt, then one compiled loop on the mesh.

The whole decode (prefill, sampling, cache updates, stop at EOS) is one jitted function whose
loop is a ``jax.lax.while_loop``: one compile per (prompt length, max new tokens), no host round
trip per token. Params keep their training shardings; activations and the cache follow the run's
activation rules (``kv_heads`` split over ``tensor``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from framework import sharding
from framework.config import Config, ConfigError
from framework.mesh import STAGE
from framework.state import abstract_state


def sample(logits: jax.Array, key: jax.Array, temperature, top_k: int) -> jax.Array:
    """Next token per row of (B, vocab) logits: argmax when ``temperature`` is None, else softmax(logits / T) over the top k."""
    if temperature is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def unstacked(cfg: Config, params: dict, mesh) -> tuple[Config, dict, object]:
    """Decoding runs layer by layer: a scan_layers model's stacked params become one entry per layer.

    Returns the decode config (no scan, no remat, no stages), its params in its shardings, and its graphdef.
    """
    # decoding is not pipelined: a run's stage axis, if any, only replicates the unstacked layers
    dcfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=False, remat=False),
                               mesh=dataclasses.replace(cfg.mesh, stage=1))
    abstract = abstract_state(dcfg, {a: n for a, n in zip(mesh.axis_names, mesh.axis_sizes) if a != STAGE})
    if cfg.model.scan_layers:
        params = {**params, "blocks": layer_by_layer(cfg, params["blocks"])}
    params = jax.device_put(params, sharding.named(mesh, abstract.specs.params))
    return dcfg, params, abstract.graphdef


def layer_by_layer(cfg: Config, blocks: dict) -> dict:
    """``{i: layer i's params}`` of a stack of layers; an MoE model with ``moe.every > 1`` stacks groups of ``every``
    layers (models/transformer.py ``LayerGroup``): group g's ``layers.{j}`` is layer ``g * every + j``."""
    m = cfg.model
    every = m.moe.every if m.moe.n_experts and m.moe.every > 1 else 1
    if every == 1:
        return {i: jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(m.n_layers)}
    return {g * every + j: jax.tree.map(lambda x, g=g: x[g], blocks["layers"][j])
            for g in range(m.n_layers // every) for j in range(every)}


class Generator:
    """``Generator(cfg, graphdef, mesh)(params, prompt_ids, ...)`` -> generated ids (B, <= max_new_tokens)."""

    def __init__(self, cfg: Config, graphdef, mesh):
        if cfg.model.scan_layers:
            raise ValueError("Generator: pass the unstacked config and params (framework.generate.unstacked)")
        self.cfg, self.graphdef, self.mesh = cfg, graphdef, mesh
        self.rules = sharding.rules_table(cfg.sharding.activation_rules)
        self._loop = jax.jit(self._decode_loop, static_argnames=("max_new_tokens", "top_k", "greedy"))

    def _decode_loop(self, params, prompt, key, temperature, eos_id, *, max_new_tokens: int, top_k: int, greedy: bool):
        with sharding.activation_sharding(self.mesh, self.rules):
            model = nnx.merge(self.graphdef, params)
            batch, length = prompt.shape
            logits, cache = model.decode(prompt, model.init_cache(batch, length + max_new_tokens), 0)

            def body(carry):
                i, last, cache, out, done, key = carry
                key, sub = jax.random.split(key)
                token = sample(last, sub, None if greedy else temperature, top_k)
                token = jnp.where(done, eos_id, token)  # rows that ended keep emitting EOS
                out = out.at[:, i].set(token)
                done = done | (token == eos_id)
                logits, cache = model.decode(token[:, None], cache, length + i)
                return i + 1, logits[:, -1], cache, out, done, key

            def more(carry):
                i, _, _, _, done, _ = carry
                return (i < max_new_tokens) & ~jnp.all(done)

            out = jnp.full((batch, max_new_tokens), -1, jnp.int32)
            carry = (jnp.zeros((), jnp.int32), logits[:, -1], cache, out, jnp.zeros((batch,), bool), key)
            n, _, _, out, _, _ = jax.lax.while_loop(more, body, carry)
            return out, n

    def __call__(self, params, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
                 seed: int = 0, eos_id: int | None = None) -> np.ndarray:
        prompt = np.atleast_2d(np.asarray(prompt_ids, np.int32))  # (B, P); one prompt: (1, P)
        total = prompt.shape[1] + max_new_tokens
        if prompt.shape[1] < 1:
            raise ConfigError("--prompt: empty after tokenization")
        if total > self.cfg.model.max_seq_len:
            raise ConfigError(f"--prompt ({prompt.shape[1]} tokens) + --max-new-tokens {max_new_tokens} = {total} "
                              f"exceeds model.max_seq_len={self.cfg.model.max_seq_len}")
        if temperature < 0 or top_k < 0 or top_k > self.cfg.model.vocab_size:
            raise ConfigError(f"--temperature {temperature} --top-k {top_k}: expected T >= 0 and 0 <= k <= vocab")
        out, n = self._loop(params, prompt, jax.random.key(seed), jnp.float32(temperature),
                            jnp.int32(-1 if eos_id is None else eos_id), max_new_tokens=max_new_tokens,
                            top_k=top_k, greedy=temperature == 0)
        return np.asarray(out)[:, : int(n)]


class ByteTokenizer:
    """Byte-level runs (``data.source: text``): token ids are the bytes of UTF-8 text."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class FileTokenizer:
    """A Hugging Face ``tokenizer.json`` (the ``tokenizers`` library)."""

    def __init__(self, path: str | Path):
        from framework.data.tokenizer import load_tokenizer  # imports tokenizers only when a run has one

        self.tok = load_tokenizer(path)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])
