"""optax optimizer and learning-rate schedule from the ``optimizer`` config section."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from framework.config import OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up to ``lr``, then cosine / linear decay to ``lr * min_lr_ratio`` (or constant)."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    end = cfg.lr * cfg.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


EMBEDDINGS = ("embed", "pos_embed")  # lookup tables; ``unembed`` is the output projection, a matrix like any kernel
NO_DECAY = ("bias", "scale")  # biases and norm gains


def decay_mask(params, decay_embeddings: bool):
    """True for the leaves weight decay applies to: matrices (``kernel``, ``unembed``), embeddings if asked.

    Decided by name, not by rank: with ``model.scan_layers`` a norm gain has a layer axis and is 2-D.
    Other leaves decay when they have two or more dimensions (nanoGPT's rule).
    """
    def decays(path, leaf) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        if name in EMBEDDINGS:
            return decay_embeddings
        if name in NO_DECAY:
            return False
        return leaf.ndim >= 2  # kernels, unembed, and the matrices of other models

    return jax.tree_util.tree_map_with_path(decays, params)


def global_norm(tree) -> jax.Array:
    """The L2 norm of all leaves together, as ``optax.tree.norm`` sums it (leaf by leaf, in tree order).

    Safe inside a host computation (``compute_on("device_host")``): optax squares ``leaf.imag``,
    which for real leaves is a zero array created in device memory, and host and device
    operands cannot meet in one op.
    """
    squares = [jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(squares[1:], squares[0]))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` (same arithmetic, same empty state) with the host-safe ``global_norm``."""
    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        within = norm < max_norm
        scale = lambda t: jax.lax.select(within, t, (t / norm.astype(t.dtype)) * max_norm)  # noqa: E731
        return jax.tree.map(scale, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def build_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    lr = learning_rate_schedule(cfg, total_steps)
    mask = lambda params: decay_mask(params, cfg.decay_embeddings)  # noqa: E731 (optax calls it with the params)
    if cfg.name == "adamw":
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.name == "adam":
        opt = optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif cfg.name == "sgd":
        opt = optax.sgd(lr, momentum=cfg.momentum or None)
    elif cfg.name == "lion":
        opt = optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask)
    else:  # adafactor
        opt = optax.adafactor(lr)
    if cfg.grad_clip > 0:
        opt = optax.chain(clip_by_global_norm(cfg.grad_clip), opt)
    return opt
