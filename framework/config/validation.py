"""Checks of a loaded config that need more than one field and nothing but the config.

Device-dependent checks live in mesh.py; those that need a concern's knowledge (the NVMe tier's
rules, stage divisibility) live with that concern and are called by ``framework.state.check_run``.
"""
from __future__ import annotations

from framework.config.schema import (DTYPES, HOST_OPTIMIZERS, TRACKERS, Config, ConfigError, ElasticConfig, LoggingConfig,
                                     ModelConfig, OptimizerConfig)


def validate(cfg: Config) -> None:
    """Checks that need more than one field (``load_config`` runs them); device-dependent checks live in mesh.py."""
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
    validate_attention(m)
    validate_packing(cfg)
    kv = m.n_kv_heads or m.n_heads
    if m.n_heads % kv:
        raise ConfigError(f"model.n_kv_heads={kv} must divide model.n_heads={m.n_heads}")
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if cfg.mesh.context > 1 and t.seq_len % (2 * cfg.mesh.context):
        raise ConfigError(f"train.seq_len={t.seq_len} is not divisible by 2 * mesh.context = {2 * cfg.mesh.context} "
                          "(context parallelism's zig-zag split: two chunks per device)")
    if t.global_batch % t.grad_accum:
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not divisible by train.grad_accum={t.grad_accum}"
        )
    if isinstance(t.micro_batch, int):
        if t.micro_batch < 1 or t.global_batch % t.micro_batch:
            raise ConfigError(f"train.micro_batch={t.micro_batch}: expected a positive divisor of train.global_batch={t.global_batch}")
        if t.grad_accum not in (1, t.global_batch // t.micro_batch):
            raise ConfigError(f"train.micro_batch={t.micro_batch} and train.grad_accum={t.grad_accum} disagree; set one of them")
    validate_memory(cfg)
    validate_moe(cfg)
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
    validate_logging(cfg.logging, t.steps)


def validate_attention(m: ModelConfig) -> None:
    """The head width, and the llama-style attention options (gpt style already has every bias and no q/k norm)."""
    if m.head_dim < 0:
        raise ConfigError(f"model.head_dim={m.head_dim}: expected a positive integer or 0 (d_model // n_heads)")
    if not m.head_dim and m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads} "
                          "(or set model.head_dim)")
    if m.style == "llama" and m.resolved_head_dim % 2:
        raise ConfigError(f"model.head_dim={m.resolved_head_dim}: RoPE rotates pairs; expected an even head width")
    for key in ("qkv_bias", "qk_norm"):
        if getattr(m, key) and m.style != "llama":
            raise ConfigError(f"model.{key}=true needs model.style=llama (got model.style={m.style})")


def validate_logging(log: LoggingConfig, steps: int) -> None:
    """Tracker names, and profile steps inside the run."""
    for i, name in enumerate(log.trackers):
        if name not in TRACKERS:
            raise ConfigError(f"logging.trackers: unknown tracker {name!r}; expected a list of {', '.join(TRACKERS)}")
        if name in log.trackers[:i]:
            raise ConfigError(f"logging.trackers: {name!r} is listed twice")
    p = log.profile_steps
    if p and not (len(p) == 2 and 1 <= p[0] <= p[1] <= steps):
        raise ConfigError(f"logging.profile_steps={p}: expected [start, stop] with 1 <= start <= stop <= train.steps={steps} "
                          "(steps numbered as in metrics.jsonl; [] for no trace)")


def validate_memory(cfg: Config) -> None:
    """The memory section's numbers, and the optimizers a host update can run."""
    mem = cfg.memory
    if mem.device_budget_bytes is not None and mem.device_budget_bytes < 1:
        raise ConfigError(f"memory.device_budget_bytes={mem.device_budget_bytes}: expected a positive integer or null")
    if mem.headroom_bytes is not None and mem.headroom_bytes < 0:
        raise ConfigError(f"memory.headroom_bytes={mem.headroom_bytes}: expected a non-negative integer or null")
    if mem.opt_state == "pinned_host" and cfg.optimizer.name not in HOST_OPTIMIZERS:
        raise ConfigError(f"memory.opt_state=pinned_host: optimizer.name={cfg.optimizer.name} cannot update on the host (its "
                          f"update makes arrays in device memory); use {', '.join(HOST_OPTIMIZERS)} or memory.opt_state=device")
    if mem.regrow_after_steps < 0:
        raise ConfigError(f"memory.regrow_after_steps={mem.regrow_after_steps}: expected a non-negative integer")
    if mem.nvme_chunk_bytes < 4:
        raise ConfigError(f"memory.nvme_chunk_bytes={mem.nvme_chunk_bytes}: expected bytes >= 4 (one float32)")


def validate_moe(cfg: Config) -> None:
    """``model.moe``: the expert count, top-k and layer pattern, and an expert axis that splits the experts evenly."""
    m, e, expert = cfg.model, cfg.model.moe, cfg.mesh.expert
    if e.n_experts < 0:
        raise ConfigError(f"model.moe.n_experts={e.n_experts}: expected an integer >= 0 (0: dense MLPs only)")
    if e.n_experts == 0:
        if expert not in (1, -1):
            raise ConfigError(f"mesh.expert={expert} needs a mixture-of-experts model (model.moe.n_experts > 0)")
        return
    if not 1 <= e.top_k <= e.n_experts:
        raise ConfigError(f"model.moe.top_k={e.top_k}: expected 1 <= top_k <= model.moe.n_experts={e.n_experts}")
    if not 1 <= e.every <= m.n_layers:
        raise ConfigError(f"model.moe.every={e.every} leaves no MoE layer in model.n_layers={m.n_layers} "
                          "(layer i is MoE when (i + 1) % every == 0)")
    if m.scan_layers and m.n_layers % e.every:
        raise ConfigError(f"model.moe.every={e.every} does not divide model.n_layers={m.n_layers} "
                          "(model.scan_layers stacks groups of `every` layers)")
    for key in ("d_expert_mlp", "n_shared_experts", "capacity_factor", "aux_loss_weight", "router_z_loss_weight"):
        if getattr(e, key) < 0:
            raise ConfigError(f"model.moe.{key}={getattr(e, key)}: expected a value >= 0")
    if m.name != "transformer":
        raise ConfigError(f"model.moe.n_experts={e.n_experts} needs model.name=transformer, got {m.name}")
    if expert == 0 or expert < -1 or (expert > 1 and e.n_experts % expert):
        raise ConfigError(f"mesh.expert={expert} does not divide model.moe.n_experts={e.n_experts}")


def check_expert_axis(cfg: Config, axis_sizes) -> None:
    """The ``expert`` axis of a built mesh (``mesh.expert=-1`` is filled from the device count) divides the experts."""
    size = axis_sizes.get("expert", 1)
    if size > 1 and cfg.model.moe.n_experts % size:
        raise ConfigError(f"mesh.expert={cfg.mesh.expert} (filled to {size}) does not divide model.moe.n_experts="
                          f"{cfg.model.moe.n_experts}" if cfg.mesh.expert == -1 else
                          f"mesh.expert={size} does not divide model.moe.n_experts={cfg.model.moe.n_experts}")


def validate_pipeline(cfg: Config) -> None:
    """``mesh.stage`` and ``train.pipeline_microbatches`` as numbers; what stages need of the model, the mesh and
    the broadcast modes is ``framework.pipeline.check_config``'s."""
    stage, t = cfg.mesh.stage, cfg.train
    if stage == 0 or stage < -1:
        raise ConfigError(f"mesh.stage={stage}: expected a positive number of pipeline stages or -1")
    micro = t.global_batch // t.grad_accum
    if isinstance(t.micro_batch, int):
        micro = t.micro_batch
    if t.micro_batch != "auto" and micro % t.pipeline_microbatches:
        raise ConfigError(f"train.pipeline_microbatches={t.pipeline_microbatches} does not divide the micro-batch {micro} "
                          f"(train.global_batch={t.global_batch} / train.grad_accum={t.grad_accum})")


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


def validate_packing(cfg: Config) -> None:
    """``data.packing: eos`` needs documents (a token store)."""
    d = cfg.data
    if d.packing == "eos" and d.source != "tokens":
        raise ConfigError(f"data.packing=eos: data.source={d.source} has no documents (only data.source=tokens); "
                          "use data.packing=none")
