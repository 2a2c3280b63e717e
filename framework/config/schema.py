"""The run configuration's schema: one dataclass per section, one typed field with a default per knob.

A section gains a knob by gaining a field: loading (``loading.py``) and overriding are generic over
the fields and their type hints, so nothing else needs to learn the new key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union


class ConfigError(Exception):
    """A bad config value or file; the message is one line meant for the user."""


DTYPES = ("float32", "bfloat16", "float16")
HOST_OPTIMIZERS = ("adamw", "adam", "sgd", "lion")  # their updates run on the host (memory.opt_state=pinned_host)
TOKEN_METADATA = "metadata.json"  # a token store's description (framework/data/prepare.py writes it)
VOCAB_MULTIPLE = 128  # model.vocab_size: auto pads the store's vocabulary up to a multiple of this
TRACKERS = ("jsonl", "tensorboard", "wandb")  # logging.trackers: where metrics leave the loop (framework/trackers/)


@dataclass
class MoEConfig:
    """Mixture-of-experts MLPs (models/moe.py): ``n_experts`` 0 keeps every layer a dense MLP.

    Layer i (0-based) is an MoE layer when (i + 1) % ``every`` == 0 (Qwen3-MoE's ``decoder_sparse_step``);
    with ``model.scan_layers`` the stack is of groups of ``every`` layers. ``router: softmax_topk``: softmax over
    all experts, the top ``top_k`` kept, renormalised to sum 1 when ``norm_topk_prob`` (Mixtral, Qwen3-MoE).
    ``capacity_factor`` 0: dropless (grouped matmuls); > 0: each sequence gives an expert at most
    ceil(capacity_factor * seq_len * top_k / n_experts) tokens, the rest are dropped (counted, logged).
    """

    n_experts: int = 0  # 0: no MoE layer
    top_k: int = 2
    d_expert_mlp: int = 0  # each expert's hidden width; 0: model.d_mlp
    n_shared_experts: int = 0  # a dense MLP of n_shared_experts * d_expert_mlp every token goes through, beside the routed experts
    every: int = 1
    router: Literal["softmax_topk"] = "softmax_topk"
    norm_topk_prob: bool = True
    aux_loss_weight: float = 0.01  # Switch load-balancing loss (1.0 at a perfect balance), per sequence
    router_z_loss_weight: float = 0.0  # ST-MoE z-loss: mean logsumexp(router logits)^2
    capacity_factor: float = 0.0


@dataclass
class ModelConfig:
    name: str = "transformer"
    style: Literal["gpt", "llama"] = "gpt"
    vocab_size: Union[int, Literal["auto"]] = 256  # auto: data.source=tokens, the store's vocab padded up to a multiple of 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 0  # 0: same as n_heads (no grouped-query attention)
    head_dim: int = 0  # width of one attention head; 0: d_model // n_heads (Qwen3 sets its own)
    qkv_bias: bool = False  # llama style: biases on the q, k, v projections, none on the output (Qwen2)
    qk_norm: bool = False  # llama style: RMSNorm over each head's q and k before RoPE (Qwen3)
    d_mlp: int = 512
    max_seq_len: int = 128
    tie_embeddings: Optional[bool] = None  # None: tied for gpt, untied for llama
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    scan_layers: bool = False
    remat: bool = False
    attention: Literal["xla", "cudnn", "auto"] = "xla"
    context_attention: Literal["ring", "allgather", "auto"] = "auto"  # mesh.context > 1: models/context.py (auto: its cost model)
    gelu: Literal["tanh", "exact"] = "tanh"  # gpt style: tanh approximation (GPT-2, HF gelu_new) or exact erf (HF gelu)
    moe: MoEConfig = field(default_factory=MoEConfig)
    init_from: str = ""  # a Hugging Face model dir (framework/hf/): fresh runs start from its params
    # CNN classifier (models/cnn.py, name: cnn): square images, 3x3 convs, one 2x2 max-pool, dense layers
    image_size: int = 8
    image_channels: int = 1
    conv_channels: list[int] = field(default_factory=lambda: [16, 32])
    dense_features: list[int] = field(default_factory=lambda: [256])
    num_classes: int = 10

    @property
    def resolved_head_dim(self) -> int:
        """One attention head's width: ``head_dim``, or ``d_model // n_heads`` when it is 0."""
        return self.head_dim or self.d_model // self.n_heads


@dataclass
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 and is filled from the device count."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1  # data-parallel replicas across slices (multi-slice / DCN)
    stage: int = 1  # pipeline stages (framework/pipeline.py): the layer stack cut into this many pieces on disjoint devices
    expert: int = 1  # expert parallelism: a mixture-of-experts layer's experts split over this axis, tokens sent to them
    context: int = 1  # context parallelism: the sequence split over this axis (ring or all-gather attention)
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
    # tokens: ``eos`` gives batches segment ids and positions from the EOS after every document (attention stays
    # inside a document, positions restart, the target after an EOS is not trained); ``auto``: eos for tokens
    packing: Literal["auto", "none", "eos"] = "auto"


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
    """What a run reports and where (framework/trackers/), and what it lets you see inside it.

    ``trackers``: ``jsonl`` (RUN_DIR/metrics.jsonl), ``tensorboard`` (RUN_DIR/tensorboard), ``wandb`` (the
    optional extra: ``pip install -e '.[wandb]'``; WANDB_MODE=offline writes RUN_DIR/wandb only).
    ``tensorboard: false`` leaves tensorboard out of ``trackers`` (the switch tests and benchmarks use).
    ``profile_steps: [start, stop]``: a jax.profiler trace of steps start..stop (numbered as in metrics.jsonl)
    in RUN_DIR/profile, by process 0 unless ``profile_all_processes``. ``dump_hlo``: every compiled train step's
    optimized HLO, memory_analysis() and cost_analysis() in RUN_DIR/compiled/<layout>/.
    """

    progress: bool = True
    trackers: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    tensorboard: bool = True
    wandb_project: str = "meshpilot"
    wandb_entity: str = ""  # empty: the account's default entity
    profile_steps: list[int] = field(default_factory=list)  # [] or [start, stop], 1 <= start <= stop <= train.steps
    profile_all_processes: bool = False
    dump_hlo: bool = False


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
            ["expert", "expert"],  # a mixture-of-experts layer's experts (models/moe.py)
            ["layers", "stage"],  # stacked layers: contiguous pieces per pipeline stage (no axis when mesh.stage=1)
        ]
    )
    activation_rules: list[list[Any]] = field(
        default_factory=lambda: [
            ["batch", ["data", "fsdp", "expert"]],  # expert: tokens start split over it and travel to their experts
            ["length", "context"],  # context parallelism: the sequence split (no axis when mesh.context=1)
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
    """Per-layer broadcast modes (framework.broadcast).

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

