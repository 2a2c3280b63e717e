"""A minimal hand-written JAX training step for meshpilot's transformer: the benchmark's yardstick.

Same model, same math, same parameter layout and shardings as the framework's step, but
written directly: the forward pass is plain functions over the params dict, the optimizer
is a hand-built optax chain, and the step is one ``jax.jit`` with in/out shardings and
donation. Nothing from ``framework`` or ``models`` runs inside it; bench.py only hands it
the mesh, the NamedShardings and the initial state (plain values). If the framework's
step is slower than this, the framework is adding cost.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P


def make_optimizer(opt, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm + AdamW with linear warm-up and cosine decay (the configs benchmarked)."""
    if opt.name != "adamw" or opt.schedule != "cosine":
        raise ValueError(f"reference step supports optimizer.name=adamw with cosine schedule, got {opt.name}/{opt.schedule}")
    warmup = min(opt.warmup_steps, max(total_steps - 1, 0))
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, opt.lr, warmup),
         optax.cosine_decay_schedule(opt.lr, max(total_steps - warmup, 1), alpha=opt.min_lr_ratio)],
        [warmup],
    )
    adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                        mask=lambda params: _decayed(params, opt.decay_embeddings))
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip), adamw), schedule


def _decayed(params, decay_embeddings: bool):
    """Weight decay on kernels and the output projection; embeddings as configured; never biases or norm gains."""
    def decays(path, leaf) -> bool:
        name = path[-1].key
        if name in ("embed", "pos_embed"):
            return decay_embeddings
        return name not in ("bias", "scale")

    return jax.tree_util.tree_map_with_path(decays, params)


class ReferenceStep:
    """``step(state, batch) -> (state, {loss, grad_norm, lr})`` on the framework's TrainState pytree."""

    def __init__(self, cfg, mesh, state_shardings, batch_sharding):
        m = cfg.model
        if cfg.train.grad_accum != 1:
            raise ValueError("reference step supports train.grad_accum=1 only")
        if cfg.data.source == "tokens" and cfg.data.packing != "none":
            raise ValueError("reference step trains on whole windows only: set data.packing=none")
        if tuple(mesh.axis_names) != ("data", "fsdp", "tensor"):
            raise ValueError(f"reference step expects mesh axes (data, fsdp, tensor), got {mesh.axis_names}")
        self.m, self.mesh = m, mesh
        self.dtype = jnp.dtype(cfg.train.dtype)
        self.sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
        self.tied = m.tie_embeddings if m.tie_embeddings is not None else m.style == "gpt"
        self.tx, self.schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
        self.param_shardings = state_shardings.params
        replicated = NamedSharding(mesh, P())
        self.step = jax.jit(
            self._step,
            in_shardings=(state_shardings, batch_sharding),
            out_shardings=(state_shardings, replicated),
            donate_argnums=0,
        )

    # -------------------------------------------------------------- sharding by hand

    def _pin(self, x, *axes):
        """Constrain ``x``: batch over data*fsdp, and the named dims over 'tensor' when they divide."""
        spec = []
        for size, a in zip(x.shape, axes):
            if a == "batch":
                spec.append(("data", "fsdp"))
            elif a == "tensor" and size % self.sizes["tensor"] == 0:
                spec.append("tensor")
            else:
                spec.append(None)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(*spec)))

    # -------------------------------------------------------------- the model

    def _dense(self, spec, x, p):
        """``einsum(spec)`` written as a tensordot of x's trailing dims with the kernel's leading ones."""
        x_dims, k_dims = spec.split("->")[0].split(",")
        y = jnp.tensordot(x.astype(self.dtype), p["kernel"].astype(self.dtype), axes=len(set(x_dims) & set(k_dims)))
        return y + p["bias"].astype(self.dtype) if "bias" in p else y

    def _norm(self, x, p):
        dtype = x.dtype
        x = x.astype(jnp.float32)
        if self.m.style == "gpt":
            x = x - x.mean(-1, keepdims=True)
        x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.m.norm_eps)
        x = x * p["scale"].astype(jnp.float32)
        if "bias" in p:
            x = x + p["bias"].astype(jnp.float32)
        return x.astype(dtype)

    def _rope(self, x):
        h, t = x.shape[-1], x.shape[1]
        freqs = 1.0 / (self.m.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
        angles = jnp.arange(t)[:, None].astype(jnp.float32) * freqs[None, :]
        sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]
        x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)

    def _block(self, x, p):
        x = self._pin(x, "batch", None, None)
        h = self._norm(x, p["ln_attn"])
        a = p["attn"]
        q = self._pin(self._dense("btd,dnh->btnh", h, a["query"]), "batch", None, "tensor", None)
        k = self._pin(self._dense("btd,dnh->btnh", h, a["key"]), "batch", None, "tensor", None)
        v = self._pin(self._dense("btd,dnh->btnh", h, a["value"]), "batch", None, "tensor", None)
        if self.m.style == "llama":
            q, k = self._rope(q), self._rope(k)
        impl = {"xla": "xla", "cudnn": "cudnn", "auto": None}[self.m.attention]
        ctx = self._pin(jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl),
                        "batch", None, "tensor", None)
        x = x + self._dense("btnh,nhd->btd", ctx, a["out"])
        h = self._norm(x, p["ln_mlp"])
        f = p["mlp"]
        up = self._dense("btd,df->btf", h, f["fc_in"])
        up = jax.nn.gelu(up) if self.m.style == "gpt" else jax.nn.silu(self._dense("btd,df->btf", h, f["gate"])) * up
        up = self._pin(up, "batch", None, "tensor")
        x = x + self._dense("btf,fd->btd", up, f["fc_out"])
        return self._pin(x, "batch", None, None)

    def _logits(self, params, tokens):
        x = jnp.take(params["embed"], tokens, axis=0).astype(self.dtype)
        if self.m.style == "gpt":
            x = x + params["pos_embed"][: tokens.shape[1]].astype(self.dtype)
        x = self._pin(x, "batch", None, None)
        block = jax.checkpoint(self._block, prevent_cse=not self.m.scan_layers) if self.m.remat else self._block
        if self.m.scan_layers:
            x, _ = jax.lax.scan(lambda h, p: (block(h, p), None), x, params["blocks"])
        else:
            for i in range(self.m.n_layers):
                x = block(x, params["blocks"][i])
        x = self._norm(x, params["ln_f"])
        w = params["embed"].T if self.tied else params["unembed"]
        logits = jnp.einsum("btd,dv->btv", x, w.astype(self.dtype), preferred_element_type=jnp.float32)
        return self._pin(logits, "batch", None, "tensor")

    def _loss(self, params, batch):
        logits = self._logits(params, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    # -------------------------------------------------------------- the step

    def _step(self, state, batch):
        """``batch``: the framework's batch dict; the reference reads its tokens only."""
        loss, grads = jax.value_and_grad(self._loss)(state.params, batch["tokens"][0])
        grads = jax.lax.with_sharding_constraint(grads, self.param_shardings)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": self.schedule(state.step)}
        new_state = dataclasses.replace(state, step=state.step + 1, params=params, opt_state=opt_state,
                                        data_pos=state.data_pos + 1)
        return new_state, metrics
