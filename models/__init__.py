"""Model registry: config ``model.name`` -> an ``nnx.Module`` class built from the model config."""
from __future__ import annotations

from typing import Callable

from framework.config import ConfigError, ModelConfig

_REGISTRY: dict[str, Callable] = {}


def register(name: str):
    """Class decorator (or call) adding a model constructor ``cls(cfg, *, rngs, dtype, param_dtype, ...)``."""

    def add(cls):
        _REGISTRY[name] = cls
        return cls

    return add


def build_model(cfg: ModelConfig, **kwargs):
    """Instantiate the registered model ``cfg.name``; kwargs go to its constructor (rngs, dtypes...)."""
    if cfg.name not in _REGISTRY:
        raise ConfigError(f"model.name={cfg.name!r}: expected one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[cfg.name](cfg, **kwargs)


def _register_builtin() -> None:
    from models.cnn import CNN
    from models.transformer import Transformer

    register("transformer")(Transformer)
    register("cnn")(CNN)


_register_builtin()
