"""Memory tiers, the policy: which memory kind (``device`` or ``pinned_host``) each category of training data lives in.

Every byte a step touches belongs to a category: ``params``, ``grads``, ``opt_state``,
``activations`` (values saved for the backward pass) and ``batch``. A ``PlacementPolicy`` maps
categories to memory kinds, and the remat policy builder turns the activation choice into a
``jax.checkpoint`` policy. ``auto`` offloads first what costs least to move per byte saved:
optimizer state (touched once per step), then activation checkpoints (once forward, once
backward), then parameters (every micro-batch, forward and backward). The transfer counters
check, in the program lowered for a GPU, that a placement really reached it.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.extend
import jax.numpy as jnp

from framework.config import HOST_OPTIMIZERS, Config, ConfigError, MemoryConfig
from framework.data.batch import batch_fields

CATEGORIES = ("params", "grads", "opt_state", "activations", "batch")

DEVICE, HOST = "device", "pinned_host"

NVME = "nvme"  # files on local disk (memory/nvme.py): the optimizer state, and the float32 master parameters

KINDS = (DEVICE, HOST)

ACTIVATION_MODES = ("save", "remat", "offload")

OFFLOAD_ORDER = ("opt_state", "activations", "params")


def has_auto(cfg: MemoryConfig) -> bool:
    return "auto" in (cfg.params, cfg.opt_state, cfg.activations)


# ------------------------------------------------------------------ placement


@dataclasses.dataclass
class Placement:
    """Memory kind of ``params``, ``opt_state`` and ``grads``, activation mode, and why each was chosen."""

    params: str = DEVICE
    opt_state: str = DEVICE
    activations: str = "save"
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)
    grads: str = DEVICE

    def kinds(self) -> dict[str, str]:
        """The state's categories (what the TrainState holds between steps) and their kinds. Parameters whose
        float32 master copy is on nvme are held on the device in the compute dtype."""
        return {"params": DEVICE if self.params == NVME else self.params, "opt_state": self.opt_state}

    def key(self) -> tuple[str, str, str, str]:
        return self.params, self.opt_state, self.activations, self.grads


class PlacementPolicy:
    """Decides the memory kind per category; subclass and override ``place`` (or ``offload_order``) for research.

    Explicit choices in the config are kept. ``auto`` categories start on device (activations
    saved) and are offloaded in ``offload_order``, one at a time, until the step fits the
    budget. ``measure`` gives a candidate's bytes per category on the device: the Trainer
    compiles the step for it; ``scripts/plan.py`` on an abstract mesh estimates.
    """

    offload_order: tuple[str, ...] = OFFLOAD_ORDER

    def place(self, cfg: MemoryConfig, measure: Callable[[Placement], dict[str, int]] | None,
              budget: int | None) -> Placement:
        """``measure`` and ``budget`` may be None when nothing is ``auto``; a ConfigError when nothing fits."""
        requested = {"params": cfg.params, "opt_state": cfg.opt_state, "activations": cfg.activations}
        on_device = {"params": DEVICE, "opt_state": DEVICE, "activations": "save"}
        offloaded = {"params": HOST, "opt_state": HOST, "activations": "offload"}
        placement = Placement(reasons={"grads": "set in config"} if cfg.grads != DEVICE else {}, grads=cfg.grads)
        for category, choice in requested.items():
            setattr(placement, category, on_device[category] if choice == "auto" else choice)
            if choice != "auto":
                placement.reasons[category] = "set in config"
        auto = [c for c in self.offload_order if requested[c] == "auto"]
        if not auto:
            return placement
        for i in range(len(auto) + 1):
            if i:
                setattr(placement, auto[i - 1], offloaded[auto[i - 1]])
            per_category = measure(placement)
            share = sum(per_category.values())
            if share <= budget:
                for j, category in enumerate(auto):
                    placement.reasons[category] = (
                        f"auto: offloaded to pinned_host, device bytes exceeded the budget {budget:,} B with it on device"
                        if j < i else f"auto: kept on device, device bytes {share:,} B fit the budget {budget:,} B")
                return placement
        figures = ", ".join(f"{c} {b:,}" for c, b in per_category.items())
        raise ConfigError(
            f"memory: nothing fits the device budget of {budget:,} B (memory.device_budget_bytes or the device's "
            f"capacity): with {', '.join(auto)} offloaded the step needs {share:,} B per device ({figures} B)"
        )


def check_auto_offload(cfg: Config, placement: Placement, budget: int | None) -> None:
    """One line, not a failed compile, when ``auto`` would offload the optimizer state of an optimizer whose
    update cannot run on the host (adafactor: its update makes arrays in device memory)."""
    if placement.opt_state == HOST and cfg.memory.opt_state == "auto" and cfg.optimizer.name not in HOST_OPTIMIZERS:
        raise ConfigError(
            f"memory.opt_state=auto: the step does not fit the device budget of {budget:,} B with the optimizer state on "
            f"the device, and optimizer.name={cfg.optimizer.name} cannot update it on the host (pinned_host); use "
            f"{', '.join(HOST_OPTIMIZERS)}, a larger memory.device_budget_bytes, or memory.opt_state=device with "
            "activations or params offloaded")


def with_memory_kinds(shardings, placement: Placement):
    """The state's shardings with ``params``/``opt_state`` in the memory kinds of ``placement``."""
    return dataclasses.replace(
        shardings,
        **{c: jax.tree.map(lambda s: s.with_memory_kind(kind), getattr(shardings, c)) for c, kind in placement.kinds().items()},
    )


# ------------------------------------------------------------------ activation (remat / offload) policies


def tagged_names(fn: Callable, *args) -> list[str]:
    """The ``checkpoint_name`` tags ``fn`` applies, in order of first use (found in its jaxpr)."""
    names: list[str] = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "name" and eqn.params["name"] not in names:
                names.append(eqn.params["name"])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


def activation_choices(mode: str, per_name: Mapping[str, str], tagged: Sequence[str]) -> dict[str, str]:
    """Tag -> ``save``/``remat``/``offload``: ``per_name`` where given, else ``mode``."""
    unknown = sorted(set(per_name) - set(tagged))
    if unknown:
        raise ConfigError(
            f"memory.activation_names: {', '.join(unknown)} not tagged by the model; tags: {', '.join(tagged)}"
        )
    return {name: per_name.get(name, mode) for name in tagged}


def activation_policy(mode: str, per_name: Mapping[str, str], tagged: Sequence[str]) -> Callable | None:
    """A ``jax.checkpoint`` policy for the layers, or None for no checkpointing (``save`` everything).

    With ``remat`` all is recomputed. With ``offload`` or a per-name map, tagged values
    follow their choice and untagged intermediates are recomputed (MaxText's custom
    policy). A name is never listed as both savable and offloadable: each tag has one choice.
    """
    if mode not in ACTIVATION_MODES:
        raise ValueError(f"activation mode {mode!r} must be resolved to one of {ACTIVATION_MODES} first")
    if not per_name:
        if mode == "save":
            return None
        if mode == "remat":
            return jax.checkpoint_policies.nothing_saveable
    choices = activation_choices(mode, per_name, tagged)
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[n for n, c in choices.items() if c == "save"],
        names_which_can_be_offloaded=[n for n, c in choices.items() if c == "offload"],
        offload_src=DEVICE,
        offload_dst=HOST,
    )


def model_tags(cfg: Config, loss: Callable, params, micro_batch: int = 1) -> list[str]:
    """The ``checkpoint_name`` tags ``loss(params, batch)`` applies (the run's own objective: ``Trainer.loss_for``)."""
    field = jax.ShapeDtypeStruct((micro_batch, cfg.train.seq_len + 1), jnp.int32)
    return tagged_names(loss, params, {k: field for k in batch_fields(cfg.data)})


def model_options(remat_policy: Callable | None, stream_params: bool) -> dict:
    """Model constructor options that apply the placement: the layers' checkpoint policy, parameter streaming."""
    return {"remat_policy": remat_policy, "stream_params": stream_params}


def layer_policy(cfg: Config, mode: str, loss: Callable, params) -> Callable | None:
    """The checkpoint policy for the model's layers under activation ``mode`` (None: no checkpointing).

    ``loss(params, batch)`` is the run's objective on the model as configured; its tags are what a per-name
    choice or ``offload`` can name.
    """
    per_name = cfg.memory.activation_names
    tags = model_tags(cfg, loss, params) if (mode == "offload" or per_name) else []
    return activation_policy(mode, per_name, tags)


# ------------------------------------------------------------------ transfers in the lowered program


@dataclasses.dataclass
class OffloadCheck:
    """Host-transfer annotations found in the program lowered for ``platform``."""

    platform: str
    to_host: int  # annotate_device_placement ops that place a value in pinned_host
    to_device: int  # ... and those that bring one (back) to device memory


_PLACEMENT = re.compile(r"annotate_device_placement.*?_xla_buffer_placement\s*=\s*\"(\w+)\"")


def verify_offload(fn: Callable, *args, platform: str = "cuda") -> OffloadCheck:
    """Lower ``fn`` for ``platform`` and count its transfers between memory kinds.

    Lowering for CPU drops the activation-offload transfers (CPU has one memory), so a CPU
    machine checks the program a GPU would run; ``args`` may be ``ShapeDtypeStruct``s.
    """
    jitted = fn if hasattr(fn, "trace") else jax.jit(fn)
    return count_transfers(jitted.trace(*args).lower(lowering_platforms=(platform,)).as_text(), platform)


def count_transfers(hlo_text: str, platform: str) -> OffloadCheck:
    kinds = _PLACEMENT.findall(hlo_text)
    return OffloadCheck(platform, kinds.count(HOST), kinds.count(DEVICE))


_FUNC = re.compile(r"^(\s*)func\.func\b[^@]*@([\w.$-]+)\(")
_CALL = re.compile(r"\bcall @([\w.$-]+)\(")


def loop_body_transfers(hlo_text: str, platform: str) -> list[OffloadCheck]:
    """Transfers inside each ``stablehlo.while`` body of a lowered module, one entry per loop, in program order.

    A body's count includes the functions it calls (transitively): in a scanned model the
    forward and backward passes over the layers are such loops, so a parameter fetched per
    layer shows up here and one fetched once for the whole step does not.
    """
    lines = hlo_text.splitlines()
    functions: dict[str, list[str]] = {}
    name, indent = None, ""
    for line in lines:  # function bodies, by their closing brace at the function's own indent
        m = _FUNC.match(line)
        if m:
            name, indent = m.group(2), m.group(1)
            functions[name] = []
        elif name is not None:
            if line == indent + "}":
                name = None
            else:
                functions[name].append(line)

    def reachable(body: list[str]) -> list[str]:
        out, todo, seen = list(body), list(body), set()
        while todo:
            for callee in _CALL.findall(todo.pop()):
                if callee not in seen and callee in functions:
                    seen.add(callee)
                    out += functions[callee]
                    todo += functions[callee]
        return out

    checks = []
    for i, line in enumerate(lines):
        if line.strip() != "} do {":
            continue
        close = line[: len(line) - len(line.lstrip())] + "}"
        end = next(j for j in range(i + 1, len(lines)) if lines[j] == close)
        checks.append(count_transfers("\n".join(reachable(lines[i + 1:end])), platform))
    return checks
