"""Loading a config: the YAML file, then dotted ``key=value`` overrides, each value checked against its field's type.

Errors are one line naming the key and what was expected (scripts exit 2 on them). Checks that
need more than one field are ``validation.py``'s; those that need a concern's knowledge (the NVMe
tier, pipeline stages) live with the concern and run when the run is assembled (``framework.state.check_run``).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from framework.config.schema import TOKEN_METADATA, VOCAB_MULTIPLE, Config, ConfigError
from framework.config.validation import validate


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _fields_by_key(cls) -> dict[str, dataclasses.Field]:
    return {_key(f): f for f in dataclasses.fields(cls)}


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str) -> Any:
    """Check ``value`` against the type hint ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                pass
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list):
            (arm,) = typing.get_args(tp) or (Any,)
            return [_coerce(v, arm, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            _, arm = typing.get_args(tp) or (Any, Any)
            return {k: _coerce(v, arm, f"{key}.{k}") for k, v in value.items()}
    else:
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")


def _unknown(key: str, known) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(known), n=1)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(known)}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    by_key = _fields_by_key(cls)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in by_key:
            raise _unknown(prefix + key, by_key)
        f = by_key[key]
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, value or {}, f"{prefix}{key}.")
        else:
            kwargs[f.name] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def config_to_dict(cfg) -> dict:
    """The config as plain YAML-able data, with the YAML key names."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[_key(f)] = config_to_dict(v) if dataclasses.is_dataclass(v) else v
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value parsed as YAML: numbers, booleans, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value, e.g. train.steps=50")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"override '{text}': value is not valid YAML") from None
    return key.strip(), value


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load YAML (or the defaults when ``path`` is None), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark else ""
            raise ConfigError(f"config file '{path}' is not valid YAML{where}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}': expected a mapping of sections at top level")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    cfg = _build(Config, data, "")
    resolve_vocab_size(cfg)
    validate(cfg)
    return cfg


def resolve_vocab_size(cfg: Config) -> None:
    """With ``data.source: tokens`` the store fixes the vocabulary: ``auto`` becomes its vocab size
    padded up to a multiple of 128 (GPT-2's 50257 -> 50304: whole tiles for the embedding and
    logits matmuls); an integer must hold every token id. Resolved here, once, so every later
    stage (models, planner, plan.py, the saved config.yaml) sees an integer."""
    m, d = cfg.model, cfg.data
    if d.source != "tokens":
        if m.vocab_size == "auto":
            raise ConfigError(f"model.vocab_size=auto needs data.source=tokens (the vocabulary comes from the "
                              f"token store); data.source={d.source!r} needs an integer")
        return
    if not d.path:
        raise ConfigError("data.path is empty: data.source=tokens needs a token store (scripts/prepare_data.py --out DIR)")
    meta_file = Path(d.path) / TOKEN_METADATA
    try:
        store_vocab = json.loads(meta_file.read_text())["vocab_size"]
    except FileNotFoundError:
        raise ConfigError(f"data.path={d.path}: no {TOKEN_METADATA} (write a token store with scripts/prepare_data.py)") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"data.path={d.path}: {TOKEN_METADATA} is unreadable or has no vocab_size") from None
    if m.vocab_size == "auto":
        m.vocab_size = -(-store_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    elif m.vocab_size < store_vocab:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the token store's vocab {store_vocab} "
                          f"(data.path={d.path}); use at least {store_vocab}, or auto")

