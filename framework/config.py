"""Typed run configuration: YAML file, then dotted ``key=value`` overrides, validated at start.

Every knob lives in one dataclass field with a type hint and a default; loading and
overriding are generic over those fields, so a section gains a knob by gaining a field.
Errors are one line naming the key and what was expected (scripts exit 2 on them).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(Exception):
    """A bad config value or file; the message is one line meant for the user."""


DTYPES = ("float32", "bfloat16", "float16")
HOST_OPTIMIZERS = ("adamw", "adam", "sgd", "lion")  # their updates run on the host (memory.opt_state=pinned_host)
TOKEN_METADATA = "metadata.json"  # a token store's description (framework/data/prepare.py writes it)
VOCAB_MULTIPLE = 128  # model.vocab_size: auto pads the store's vocabulary up to a multiple of this


@dataclass
class ModelConfig:
    name: str = "transformer"
    style: Literal["gpt", "llama"] = "gpt"
    vocab_size: Union[int, Literal["auto"]] = 256  # auto: data.source=tokens, the store's vocab padded up to a multiple of 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 0  # 0: same as n_heads (no grouped-query attention)
    d_mlp: int = 512
    max_seq_len: int = 128
    tie_embeddings: Optional[bool] = None  # None: tied for gpt, untied for llama
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    scan_layers: bool = False
    remat: bool = False
    attention: Literal["xla", "cudnn", "auto"] = "xla"
    gelu: Literal["tanh", "exact"] = "tanh"  # gpt style: tanh approximation (GPT-2, HF gelu_new) or exact erf (HF gelu)
    init_from: str = ""  # a Hugging Face model dir (framework/hf.py): fresh runs start from its params
    # CNN classifier (models/cnn.py, name: cnn): square images, 3x3 convs, one 2x2 max-pool, dense layers
    image_size: int = 8
    image_channels: int = 1
    conv_channels: list[int] = field(default_factory=lambda: [16, 32])
    dense_features: list[int] = field(default_factory=lambda: [256])
    num_classes: int = 10


@dataclass
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 and is filled from the device count."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1  # data-parallel replicas across slices (multi-slice / DCN)
    stage: int = 1  # pipeline stages (framework/pipeline.py): the layer stack cut into this many pieces on disjoint devices
    axis_names: list[str] = field(default_factory=lambda: ["data", "fsdp", "tensor"])


@dataclass
class TrainConfig:
    steps: int = 200
    global_batch: int = 16
    seq_len: int = 128
    seed: int = 0
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    grad_accum: int = 1  # micro-batches per step; global batch stays fixed
    micro_batch: Union[int, Literal["auto"], None] = None  # rows per micro-batch (sets grad_accum); auto: largest that fits memory.device_budget_bytes
    log_every: int = 1
    compilation_cache_dir: str = ""  # persistent XLA compilation cache (jax_compilation_cache_dir); empty: off
    eval_every: int = 0  # steps between evaluations on held-out data (and after the last step); 0: off
    eval_batches: int = 4  # global batches per evaluation: always eval positions 0..eval_batches-1
    pipeline_microbatches: int = 1  # mesh.stage > 1: pipeline micro-batches per grad_accum micro-batch (GPipe)


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "adam", "sgd", "lion", "adafactor"] = "adamw"
    lr: float = 3e-3
    warmup_steps: int = 10
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.01  # adamw/lion; on matrices only, never on biases or norm gains
    decay_embeddings: bool = True  # decay the token/position embeddings too (nanoGPT, Hugging Face Trainer)
    momentum: float = 0.9  # sgd only
    grad_clip: float = 1.0  # global-norm clip; 0 disables


@dataclass
class DataConfig:
    source: Literal["text", "synthetic", "images", "tokens"] = "text"
    paths: list[str] = field(default_factory=list)  # text files or directories; empty: Python stdlib
    path: str = ""  # tokens: a token store directory written by scripts/prepare_data.py
    seed: int = 0
    prefetch: int = 2
    eval_fraction: float = 0.05  # text: the corpus tail held out for evaluation; training never reads it


@dataclass
class CheckpointConfig:
    dir: str = ""  # empty: RUN_DIR/checkpoints
    every_steps: int = 0  # 0: only at the end
    every_minutes: float = 10.0  # also save when this long has passed since the last save (as Levanter); 0: off
    keep: int = 3
    async_: bool = field(default=True, metadata={"key": "async"})
    resume: Union[bool, Literal["auto"]] = "auto"


@dataclass
class LoggingConfig:
    progress: bool = True
    tensorboard: bool = True


@dataclass
class ShardingConfig:
    """Logical axis -> mesh axes, kept separate for parameters and activations (as Levanter does).

    A rule is ``[logical_name, mesh_axis_or_list_or_null]``.
    """

    param_rules: list[list[Any]] = field(
        default_factory=lambda: [
            ["embed", "fsdp"],
            ["mlp", "tensor"],
            ["heads", "tensor"],
            ["kv_heads", "tensor"],
            ["vocab", "tensor"],
            ["head_dim", None],
            ["length", None],
            ["layers", "stage"],  # stacked layers: contiguous pieces per pipeline stage (no axis when mesh.stage=1)
        ]
    )
    activation_rules: list[list[Any]] = field(
        default_factory=lambda: [
            ["batch", ["data", "fsdp"]],
            ["length", None],
            ["embed", None],
            ["mlp", "tensor"],
            ["heads", "tensor"],
            ["kv_heads", "tensor"],
            ["vocab", "tensor"],
            ["head_dim", None],
            ["stage", "stage"],  # the pipeline's per-stage buffers
        ]
    )


@dataclass
class MemoryConfig:
    """Memory tier per data category (framework/memory/): ``device``, ``pinned_host`` or ``auto``
    (``opt_state`` also ``nvme``: files in ``nvme_dir``, streamed through a host update; memory/nvme.py;
    ``params: nvme`` with it keeps the float32 master parameters in those files too, the device holding
    the parameters in ``train.dtype`` only, which must be lower precision than ``train.param_dtype``).

    ``activations``: ``save`` (keep all), ``remat`` (recompute), ``offload`` (tagged values to
    pinned_host) or ``auto``; ``activation_names`` overrides the choice per ``checkpoint_name`` tag
    (like MaxText's custom remat policy). ``device_budget_bytes``: per-device budget for ``auto``
    and ``train.micro_batch=auto`` (null: free memory, or capacity, as jax reports it; required on CPU).
    ``headroom_bytes``: when free device memory (``Trainer.memory_monitor``) falls under it before a
    step, the step runs with a smaller micro-batch (null: no check; an out-of-memory step is retried
    smaller either way); ``regrow_after_steps``: steps with room before growing back (0: never).
    ``opt_state: pinned_host`` also runs the optimizer update on the host, where the state lives;
    ``grads: pinned_host`` sends each micro-batch's gradients to host memory and accumulates them there.
    """

    params: Literal["device", "pinned_host", "auto", "nvme"] = "device"  # nvme: float32 master copy in nvme_dir
    opt_state: Literal["device", "pinned_host", "auto", "nvme"] = "device"  # nvme: files in nvme_dir (memory/nvme.py)
    grads: Literal["device", "pinned_host"] = "device"
    activations: Literal["save", "remat", "offload", "auto"] = "save"
    activation_names: dict[str, Literal["save", "remat", "offload"]] = field(default_factory=dict)
    device_budget_bytes: Optional[int] = None
    headroom_bytes: Optional[int] = None
    regrow_after_steps: int = 0
    nvme_dir: str = ""  # opt_state=nvme: a local-disk directory; each process keeps its shards in process_<i>/
    nvme_chunk_bytes: int = 4 << 20  # opt_state=nvme: bytes of each file (moment, master copy) per chunk of the update


@dataclass
class BroadcastConfig:
    """Per-layer broadcast modes (framework/broadcast.py).

    ``mode``: ``none`` leaves every layer to XLA's sharding propagation; ``auto`` lets the cost
    model choose kernel- or map-broadcast per layer; ``kernel``/``map`` force one mode.
    ``overrides`` pins layers by name: ``{glob or "re:regex": auto|kernel|map}``, first match wins.
    ``compress``: how kernels travel in kernel mode (int8 carries one scale per output channel).
    With ``model.scan_layers`` each layer kind of the scanned block is planned once; with
    ``memory.device_budget_bytes`` set, a mode whose buffers do not fit is excluded.
    """

    mode: Literal["none", "auto", "kernel", "map"] = "none"
    overrides: dict[str, Literal["auto", "kernel", "map"]] = field(default_factory=dict)
    compress: Literal["none", "bf16", "int8"] = "none"


@dataclass
class ElasticConfig:
    """Try-run controller: when devices change (or on request), try meshes from a checkpoint, adopt the best."""

    enabled: bool = False
    trigger: Literal["device_change", "every_n_steps", "startup"] = "device_change"
    every_n_steps: int = 0  # trigger=every_n_steps: steps between decisions
    tryrun_steps: int = 3  # measured steps per try-run (after compile and warm-up)
    warmup_steps: int = 1  # unmeasured steps first, where the layout's compiled step has not run yet (try-run or live)
    threshold: float = 0.05  # adopt only if samples/s beats the baseline by more than this fraction
    min_devices: Union[int, Literal["auto"]] = "auto"  # devices one model replica needs; auto: from memory
    max_devices: int = 0  # never use more devices than this; 0: no limit
    device_schedule: list[list[int]] = field(default_factory=list)  # [[step, n_devices], ...]: first n available from step
    objective: Literal["throughput", "efficiency"] = "throughput"  # score: samples/s, or samples/s per device
    wait_timeout_s: float = 60.0  # fewer devices than one replica needs: wait this long for more, then exit 2


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    broadcast: BroadcastConfig = field(default_factory=BroadcastConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)


# ---------------------------------------------------------------- key <-> field mapping


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


def validate(cfg: Config) -> None:
    """Checks that need more than one field; device-dependent checks live in mesh.py."""
    t, m = cfg.train, cfg.model
    for key, value in (("train.dtype", t.dtype), ("train.param_dtype", t.param_dtype)):
        if value not in DTYPES:
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(DTYPES)}")
    positive = {
        "train.steps": t.steps, "train.global_batch": t.global_batch, "train.seq_len": t.seq_len,
        "train.grad_accum": t.grad_accum, "train.log_every": t.log_every, "train.pipeline_microbatches": t.pipeline_microbatches,
        "model.n_layers": m.n_layers, "model.d_model": m.d_model, "model.n_heads": m.n_heads,
        "model.vocab_size": m.vocab_size, "checkpoint.keep": cfg.checkpoint.keep, "train.eval_batches": t.eval_batches,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value}: expected a positive integer")
    if t.eval_every < 0:
        raise ConfigError(f"train.eval_every={t.eval_every}: expected an integer >= 0 (0: no evaluation)")
    if cfg.data.prefetch < 0:
        raise ConfigError(f"data.prefetch={cfg.data.prefetch}: expected an integer >= 0 (0: no prefetch)")
    if not 0 <= cfg.data.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction={cfg.data.eval_fraction}: expected a fraction in [0, 1)")
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    kv = m.n_kv_heads or m.n_heads
    if m.n_heads % kv:
        raise ConfigError(f"model.n_kv_heads={kv} must divide model.n_heads={m.n_heads}")
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if t.global_batch % t.grad_accum:
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not divisible by train.grad_accum={t.grad_accum}"
        )
    if isinstance(t.micro_batch, int):
        if t.micro_batch < 1 or t.global_batch % t.micro_batch:
            raise ConfigError(f"train.micro_batch={t.micro_batch}: expected a positive divisor of train.global_batch={t.global_batch}")
        if t.grad_accum not in (1, t.global_batch // t.micro_batch):
            raise ConfigError(f"train.micro_batch={t.micro_batch} and train.grad_accum={t.grad_accum} disagree; set one of them")
    if cfg.memory.device_budget_bytes is not None and cfg.memory.device_budget_bytes < 1:
        raise ConfigError(f"memory.device_budget_bytes={cfg.memory.device_budget_bytes}: expected a positive integer or null")
    if cfg.memory.headroom_bytes is not None and cfg.memory.headroom_bytes < 0:
        raise ConfigError(f"memory.headroom_bytes={cfg.memory.headroom_bytes}: expected a non-negative integer or null")
    if cfg.memory.opt_state == "pinned_host" and cfg.optimizer.name not in HOST_OPTIMIZERS:
        raise ConfigError(f"memory.opt_state=pinned_host: optimizer.name={cfg.optimizer.name} cannot update on the host (its "
                          f"update makes arrays in device memory); use {', '.join(HOST_OPTIMIZERS)} or memory.opt_state=device")
    if cfg.memory.regrow_after_steps < 0:
        raise ConfigError(f"memory.regrow_after_steps={cfg.memory.regrow_after_steps}: expected a non-negative integer")
    if cfg.memory.nvme_chunk_bytes < 4:
        raise ConfigError(f"memory.nvme_chunk_bytes={cfg.memory.nvme_chunk_bytes}: expected bytes >= 4 (one float32)")
    if "nvme" in (cfg.memory.opt_state, cfg.memory.params):
        from framework.memory.nvme import check_config

        check_config(cfg)
    names = cfg.mesh.axis_names
    if len(names) != 3 or len(set(names)) != 3:
        raise ConfigError(f"mesh.axis_names={names}: expected three distinct names")
    validate_pipeline(cfg)
    validate_optimizer(cfg.optimizer, t.steps)
    if cfg.checkpoint.every_steps < 0:
        raise ConfigError(f"checkpoint.every_steps={cfg.checkpoint.every_steps}: expected 0 (only at the end) or a positive integer")
    if cfg.checkpoint.every_minutes < 0:
        raise ConfigError(f"checkpoint.every_minutes={cfg.checkpoint.every_minutes}: expected a number >= 0 (0: off)")
    validate_elastic(cfg.elastic)


def validate_pipeline(cfg: Config) -> None:
    """``mesh.stage`` and ``train.pipeline_microbatches``; a stage count of -1 is checked again once filled (state.py)."""
    stage, t = cfg.mesh.stage, cfg.train
    if stage == 0 or stage < -1:
        raise ConfigError(f"mesh.stage={stage}: expected a positive number of pipeline stages or -1")
    micro = t.global_batch // t.grad_accum
    if isinstance(t.micro_batch, int):
        micro = t.micro_batch
    if t.micro_batch != "auto" and micro % t.pipeline_microbatches:
        raise ConfigError(f"train.pipeline_microbatches={t.pipeline_microbatches} does not divide the micro-batch {micro} "
                          f"(train.global_batch={t.global_batch} / train.grad_accum={t.grad_accum})")
    if stage == 1:
        return
    check_stages(cfg, stage)
    if cfg.mesh.dcn_data != 1:
        raise ConfigError(f"mesh.stage={stage} with mesh.dcn_data={cfg.mesh.dcn_data}: pipeline stages are not supported "
                          "across slices; use mesh.dcn_data=1")
    if cfg.broadcast.mode in ("kernel", "map"):  # auto falls back to XLA's propagation (framework.broadcast.unplannable)
        raise ConfigError(f"mesh.stage={stage} with broadcast.mode={cfg.broadcast.mode}: per-layer broadcast modes do not "
                          "run inside pipeline stages; use broadcast.mode=none or auto")


def check_stages(cfg: Config, stages: int) -> None:
    """The model can be cut into ``stages`` contiguous pieces of stacked layers."""
    m = cfg.model
    if stages == -1 or stages == 1:
        return
    if m.name != "transformer" or not m.scan_layers:
        raise ConfigError(f"mesh.stage={stages} needs model.name=transformer with model.scan_layers=true "
                          f"(the stages cut the stacked layers), got model.name={m.name} model.scan_layers={m.scan_layers}")
    if m.n_layers % stages:
        raise ConfigError(f"model.n_layers={m.n_layers} is not divisible by mesh.stage={stages}")


def validate_optimizer(o: OptimizerConfig, steps: int) -> None:
    if not o.lr > 0:
        raise ConfigError(f"optimizer.lr={o.lr}: expected a learning rate > 0")
    for key, value in (("b1", o.b1), ("b2", o.b2), ("momentum", o.momentum)):
        if not 0 <= value < 1:
            raise ConfigError(f"optimizer.{key}={value}: expected a value in [0, 1)")
    if not o.eps > 0:
        raise ConfigError(f"optimizer.eps={o.eps}: expected a value > 0")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optimizer.min_lr_ratio={o.min_lr_ratio}: expected a fraction in [0, 1]")
    for key, value in (("weight_decay", o.weight_decay), ("grad_clip", o.grad_clip)):
        if value < 0:
            raise ConfigError(f"optimizer.{key}={value}: expected a value >= 0 (0: off)")
    if o.warmup_steps < 0:
        raise ConfigError(f"optimizer.warmup_steps={o.warmup_steps}: expected an integer >= 0")


def warnings(cfg: Config) -> list[str]:
    """Legal but probably unintended settings, one line each (the script prints them; training goes on).

    A warm-up as long as the run stays a warning, not an error: short smoke runs of a real
    config (``train.steps=10`` on gpt2_124m's 100 warm-up steps) are common and harmless.
    """
    o, steps = cfg.optimizer, cfg.train.steps
    out = []
    if o.warmup_steps >= steps > 1:
        out.append(f"optimizer.warmup_steps={o.warmup_steps} >= train.steps={steps}: warm-up cut to {steps - 1} steps, "
                   "the learning rate reaches optimizer.lr only at the last step")
    return out


def validate_elastic(e: ElasticConfig) -> None:
    if e.trigger == "every_n_steps" and e.every_n_steps < 1:
        raise ConfigError(f"elastic.every_n_steps={e.every_n_steps}: expected a positive integer with elastic.trigger=every_n_steps")
    for key, value, low in (("tryrun_steps", e.tryrun_steps, 1), ("warmup_steps", e.warmup_steps, 0),
                            ("max_devices", e.max_devices, 0)):
        if value < low:
            raise ConfigError(f"elastic.{key}={value}: expected an integer >= {low}")
    if e.min_devices != "auto" and e.min_devices < 1:
        raise ConfigError(f"elastic.min_devices={e.min_devices}: expected 'auto' or a positive integer")
    if e.threshold < 0:
        raise ConfigError(f"elastic.threshold={e.threshold}: expected a fraction >= 0")
    if e.wait_timeout_s < 0:
        raise ConfigError(f"elastic.wait_timeout_s={e.wait_timeout_s}: expected seconds >= 0")
    for i, entry in enumerate(e.device_schedule):
        if len(entry) != 2 or entry[0] < 0 or entry[1] < 1:
            raise ConfigError(f"elastic.device_schedule[{i}]={entry}: expected [step >= 0, n_devices >= 1]")
    steps = [entry[0] for entry in e.device_schedule]
    if steps != sorted(set(steps)):
        raise ConfigError(f"elastic.device_schedule: steps {steps} must be strictly increasing")
