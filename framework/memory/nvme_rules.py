"""Memory tiers, the NVMe tier's rules (memory/nvme.py streams the update): which optimizers it can stream and
the files a process keeps for them, what it refuses (one line each, called by ``framework.state.check_run``),
and optax's update formulas applied to one chunk of numpy arrays, step for step as optax computes them."""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from framework.config import Config, ConfigError, OptimizerConfig
from framework.memory.policy import NVME

MASTER = "params"  # the file of the float32 master parameters (memory.params=nvme)


def moment_names(cfg: OptimizerConfig) -> tuple[str, ...]:
    """The optax state fields that are per-parameter arrays, by optimizer (the files a process keeps)."""
    if cfg.name in ("adam", "adamw"):
        return ("mu", "nu")
    if cfg.name == "lion":
        return ("mu",)
    if cfg.name == "sgd":
        return ("trace",) if cfg.momentum else ()
    raise ConfigError(f"memory.opt_state=nvme supports the elementwise optimizers adamw, adam, sgd, lion; "
                      f"optimizer.name={cfg.name!r} is not one")


def file_names(cfg: Config) -> tuple[str, ...]:
    """The files each process keeps: the master parameters (memory.params=nvme), then the optimizer's moments."""
    return ((MASTER,) if cfg.memory.params == NVME else ()) + moment_names(cfg.optimizer)


def check_config(cfg: Config) -> None:
    """One-line errors for what the NVMe tier cannot do (called by ``framework.state.check_run``)."""
    m, t = cfg.memory, cfg.train
    if m.params == NVME and m.opt_state != NVME:
        raise ConfigError(f"memory.params=nvme keeps the float32 master parameters beside the optimizer state: "
                          f"it needs memory.opt_state=nvme, not {m.opt_state!r}")
    if m.params == NVME and jnp.dtype(t.dtype).itemsize >= jnp.dtype(t.param_dtype).itemsize:
        raise ConfigError(f"memory.params=nvme keeps a master copy for lower-precision compute: train.dtype={t.dtype!r} "
                          f"must be lower precision than train.param_dtype={t.param_dtype!r} (e.g. train.dtype=bfloat16)")
    if not m.nvme_dir:
        raise ConfigError("memory.opt_state=nvme needs memory.nvme_dir: a directory on local disk for the optimizer state")
    moment_names(cfg.optimizer)
    if cfg.train.param_dtype != "float32":
        raise ConfigError(f"memory.opt_state=nvme keeps a float32 state: train.param_dtype={cfg.train.param_dtype!r} "
                          "must be float32 (bfloat16 compute: train.dtype=bfloat16)")
    if cfg.elastic.enabled:
        raise ConfigError("memory.opt_state=nvme does not support elastic.enabled=true (try-runs would share its files)")


# ------------------------------------------------------------------ optax's update, on a chunk


@dataclass(frozen=True)
class Rule:
    """The numbers of one update: optimizer constants and this step's learning rate and bias corrections."""

    name: str
    b1: float
    b2: float
    eps: float
    weight_decay: float
    momentum: float
    step_size: np.float32  # -lr(step), as optax's scale_by_learning_rate
    bc1: np.float32  # Adam's bias corrections 1 - b**(step + 1), in float32 as optax computes them
    bc2: np.float32


def make_rule(cfg: OptimizerConfig, schedule, step: int) -> Rule:
    count = np.float32(step + 1)
    bc = lambda b: np.float32(1) - np.float32(b) ** count  # noqa: E731
    step_size = np.float32(jax.device_get(-1 * schedule(jnp.asarray(step, jnp.int32))))
    return Rule(cfg.name, cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay, cfg.momentum, step_size, bc(cfg.b1), bc(cfg.b2))


def update_chunk(r: Rule, p: np.ndarray, g: np.ndarray, moments: list[np.ndarray], decays: bool) -> np.ndarray:
    """New parameters of one chunk; ``moments`` are updated in place. The formulas and their order are optax's
    (scale_by_adam / scale_by_lion / trace, add_decayed_weights, scale_by_learning_rate, apply_updates)."""
    if r.name in ("adam", "adamw"):
        mu, nu = moments
        mu[...] = (1 - r.b1) * g + r.b1 * mu
        nu[...] = (1 - r.b2) * (g ** 2) + r.b2 * nu
        u = (mu / r.bc1) / (np.sqrt(nu / r.bc2) + np.float32(r.eps))
    elif r.name == "lion":
        (mu,) = moments
        u = np.sign((1.0 - r.b1) * g + r.b1 * mu)
        mu[...] = (1 - r.b2) * g + r.b2 * mu
    elif moments:  # sgd with momentum
        (trace,) = moments
        trace[...] = g + r.momentum * trace
        u = trace.copy()
    else:
        u = g.copy()
    if decays and r.name in ("adamw", "lion") and r.weight_decay:
        u = u + r.weight_decay * p
    return p + r.step_size * u
