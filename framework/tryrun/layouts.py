"""The layouts a try-run decision may choose among, and the gates each one must pass.

A layout is a mesh over the first ``n_devices`` devices plus the gradient accumulation that keeps the
global batch fixed. *Horizontal* candidates are more data-parallel replicas of the minimal split (only
when the device count is an integer multiple of it); *vertical* ones split the model over more devices
(over fsdp x tensor, and, kind ``pipeline``, its stacked layers cut into more stages). A layout that
cannot run (a tensor size that does not divide the heads, a batch that does not split) is left out
with its reason, which the decision log records under ``dropped``. When no layout over all the devices
fits (16 rows over 6 devices), the layouts over the most devices that one does fit are the candidates,
fewer data-parallel replicas with the rest of the devices left idle.

``replica_axes`` says which mesh axes hold the batch's replicas (the data-parallel size a layout's batch
must split over); a fork that replicates over other axes replaces it.
"""
from __future__ import annotations

import dataclasses
import math

import jax

from framework import sharding
from framework.config import Config, ConfigError
from framework.mesh import CONTEXT, STAGE


@dataclasses.dataclass
class Layout:
    """One way to run: a mesh over the first ``n_devices`` devices and the accumulation that keeps the batch."""

    kind: str  # "horizontal", "vertical", "pipeline" (vertical: more pipeline stages), "baseline" (current, possibly shrunk)
    n_devices: int
    mesh: dict[str, int]  # axis name -> size
    grad_accum: int

    @property
    def key(self) -> tuple:
        return self.n_devices, tuple(self.mesh.items()), self.grad_accum


def replica_axes(cfg: Config, mesh: dict[str, int]) -> tuple[str, ...]:
    """The axes of ``mesh`` the batch is split over (its data-parallel replicas): ``sharding.batch_axes``."""
    return tuple(sharding.batch_axes(cfg.sharding.activation_rules, mesh))


def grad_accum_for(global_batch: int, data_parallel: int, preferred: int) -> int | None:
    """Micro-batches per step so that each micro-batch splits evenly over ``data_parallel`` devices.

    The global batch never changes; of the accumulations that work, the one nearest the configured
    one is taken (ties: more micro-batches, i.e. less activation memory). None when no split works
    (e.g. 16 samples over 6 data-parallel devices).
    """
    working = [a for a in range(1, global_batch + 1) if global_batch % a == 0 and (global_batch // a) % data_parallel == 0]
    return min(working, key=lambda a: (abs(a - preferred), -a), default=None)


def tensor_misfit(cfg: Config, tensor: int) -> str | None:
    """Why the model's tensor-split dimensions (heads, KV heads, MLP width) do not divide by ``tensor``; None when they do."""
    if tensor == 1 or cfg.model.name != "transformer":
        return None
    m = cfg.model
    dims = {"model.n_heads": m.n_heads, "model.n_kv_heads": m.n_kv_heads or m.n_heads, "model.d_mlp": m.d_mlp}
    bad = [f"{key}={value}" for key, value in dims.items() if value % tensor]
    return f"tensor={tensor} does not divide {', '.join(bad)}" if bad else None


def expert_split(cfg: Config, devices: int) -> int:
    """The ``expert`` axis size of a split over ``devices``: the largest divisor of both and of ``model.moe.n_experts``
    (1 for a dense model), so a mixture of experts spreads its experts as far as the split allows."""
    n = cfg.model.moe.n_experts
    return max((e for e in range(1, devices + 1) if devices % e == 0 and n % e == 0), default=1) if n else 1


def plan_layout(cfg: Config, kind: str, n_devices: int, replicas: int, split: int, prefer_tensor: int = 1) -> Layout | str:
    """``replicas`` data-parallel copies of the model split over ``split`` devices (fsdp x expert x tensor), or why
    none fits.

    ``prefer_tensor`` (the current tensor size) is kept when it divides the split; otherwise as much
    fsdp as the global batch allows (fsdp also splits the batch). A tensor size must divide the heads,
    KV heads and MLP width; the data-parallel size must split the global batch. A mixture of experts
    takes the ``expert`` axis out of the fsdp share (``expert_split``).
    """
    data_axis, fsdp_axis, tensor_axis = cfg.mesh.axis_names
    t = cfg.train
    tensors = sorted((d for d in range(1, split + 1) if split % d == 0), key=lambda d: (d != prefer_tensor, d))
    reasons = []
    for tensor in tensors:
        misfit = tensor_misfit(cfg, tensor)
        if misfit is not None:
            reasons.append(misfit)
            continue
        expert = expert_split(cfg, split // tensor)
        mesh = {data_axis: replicas, fsdp_axis: split // tensor // expert, **({"expert": expert} if expert > 1 else {}),
                tensor_axis: tensor}
        dp = math.prod(mesh[a] for a in replica_axes(cfg, mesh))
        accum = grad_accum_for(t.global_batch, dp, t.grad_accum)
        if accum is not None:
            return Layout(kind, n_devices, mesh, accum)
        reasons.append(f"train.global_batch={t.global_batch} does not split over data-parallel size {dp} "
                       f"(tensor={tensor})")
    return "; ".join(reasons)


def plan_pipeline_layout(cfg: Config, n_devices: int, replicas: int, split: int, stages: int,
                         prefer_tensor: int = 1) -> Layout | str:
    """``replicas`` copies of the model cut into ``stages`` pipeline stages over ``split`` devices (each stage's
    share split over fsdp x tensor as ``plan_layout`` does), or why none fits."""
    m, t = cfg.model, cfg.train
    if m.n_layers % stages:
        return f"model.n_layers={m.n_layers} is not divisible by {stages} stages"
    found = plan_layout(cfg, "pipeline", n_devices, replicas, split // stages, prefer_tensor)
    if isinstance(found, str):
        return found
    dp = math.prod(found.mesh[a] for a in replica_axes(cfg, found.mesh))
    accum = grad_accum_for(t.global_batch, dp * t.pipeline_microbatches, t.grad_accum)  # pieces split like the batch
    if accum is None:
        return (f"train.global_batch={t.global_batch} does not split into train.pipeline_microbatches="
                f"{t.pipeline_microbatches} pieces over data-parallel size {dp}")
    return Layout("pipeline", n_devices, {STAGE: stages, **found.mesh}, accum)


def plan_context_layout(cfg: Config, n_devices: int, replicas: int, split: int) -> Layout | str:
    """``replicas`` copies of the model over ``split`` devices each, kind ``context``: the replica's rows split over
    fsdp as far as they go, its sequence over ``context`` (the rest of the split; the zig-zag split needs
    train.seq_len divisible by 2 * context), or why none fits."""
    data_axis, fsdp_axis, tensor_axis = cfg.mesh.axis_names
    t = cfg.train
    rows = t.global_batch // replicas
    fsdp = math.gcd(rows, split)
    context = split // fsdp
    if t.seq_len % (2 * context):
        return f"train.seq_len={t.seq_len} is not divisible by 2 * context = {2 * context}"
    mesh = {data_axis: replicas, fsdp_axis: fsdp, CONTEXT: context, tensor_axis: 1}
    accum = grad_accum_for(t.global_batch, replicas * fsdp, t.grad_accum)
    if accum is None:
        return f"train.global_batch={t.global_batch} does not split over data-parallel size {replicas * fsdp}"
    return Layout("context", n_devices, mesh, accum)


def with_layout(cfg: Config, layout: Layout) -> Config:
    """``cfg`` running on ``layout``: its mesh sizes and accumulation (a fixed micro-batch gives way; ``auto`` re-sizes)."""
    data, fsdp, tensor = (layout.mesh[a] for a in cfg.mesh.axis_names)
    stage, expert, context = layout.mesh.get(STAGE, 1), layout.mesh.get("expert", 1), layout.mesh.get(CONTEXT, 1)
    return dataclasses.replace(
        cfg,
        mesh=dataclasses.replace(cfg.mesh, data=data, fsdp=fsdp, tensor=tensor, stage=stage, expert=expert,
                                 context=context, dcn_data=1),
        train=dataclasses.replace(cfg.train, grad_accum=layout.grad_accum,
                                  micro_batch="auto" if cfg.train.micro_batch == "auto" else None),
    )


@dataclasses.dataclass
class Gates:
    """Builds a decision's layouts from the live mesh (``current``: its axis sizes), each through its gates;
    a layout that fails them goes into ``dropped`` ({kind, n_devices, split, reason}, as the log writes it)."""

    cfg: Config
    current: dict[str, int]
    dropped: list[dict]

    def candidates(self, n_devices: int, min_devices: int) -> list[Layout]:
        """The layouts over ``n_devices`` (``over``); when none fits, those over the most devices one does fit
        (the rest left idle), every count tried noted in ``dropped``."""
        for n in self.counts(n_devices, min_devices):
            out = self.over(n, min_devices)
            if out:
                return out
        return []

    @staticmethod
    def counts(n_devices: int, min_devices: int) -> range:
        """Device counts a decision may plan over, most first: never fewer than one model replica needs, nor than one
        device per process (each process drives part of the mesh)."""
        return range(n_devices, max(min_devices, jax.process_count(), 1) - 1, -1)

    def over(self, n_devices: int, min_devices: int) -> list[Layout]:
        """Horizontal (n / min replicas of the minimal split) only when n is a multiple of min; vertical always."""
        out = []
        if n_devices % min_devices == 0:
            out.append(self.layout("horizontal", n_devices, n_devices // min_devices, min_devices))
        else:
            self.drop("horizontal", n_devices, min_devices, f"{n_devices} devices are not a multiple of {min_devices}")
        for split in range(min_devices + 1, n_devices + 1):
            if n_devices % split == 0:
                out.append(self.layout("vertical", n_devices, n_devices // split, split))
        out += self.pipeline_candidates(n_devices, min_devices)
        out += self.context_candidates(n_devices, min_devices)
        return [c for c in out if c is not None]

    def context_candidates(self, n_devices: int, min_devices: int) -> list[Layout | None]:
        """Vertical by context parallelism (transformers): for each split of the model over more devices whose replica
        has fewer rows per step than devices, so that no data or fsdp split gives each device less than a whole
        sequence's activations, the sequence split over the devices the rows leave (``plan_context_layout``)."""
        if self.cfg.model.name != "transformer" or self.refused("context", n_devices, "split the sequence"):
            return []
        out = []
        for split in range(min_devices + 1, n_devices + 1):
            if n_devices % split or self.cfg.train.global_batch // (n_devices // split) >= split:
                continue
            found = plan_context_layout(self.cfg, n_devices, n_devices // split, split)
            if isinstance(found, str):
                self.drop("context", n_devices, split, found)
                found = None
            out.append(found)
        return out

    def pipeline_candidates(self, n_devices: int, min_devices: int) -> list[Layout | None]:
        """Vertical by pipeline: for each split of the model over more devices, its stacked layers (``model.scan_layers``)
        cut into the next stage count above the current one that divides the split and the layer count."""
        m = self.cfg.model
        if m.name != "transformer" or not m.scan_layers or self.refused("pipeline", n_devices, "run inside stages"):
            return []
        now = self.current.get(STAGE, 1)
        out = []
        for split in range(min_devices + 1, n_devices + 1):
            if n_devices % split:
                continue
            stacked = m.n_layers // m.moe.every if m.moe.n_experts else m.n_layers  # models/moe.py: groups of `every` layers
            stages = next((s for s in range(now + 1, split + 1) if split % s == 0 and stacked % s == 0), None)
            if stages is None:
                self.drop("pipeline", n_devices, split, f"no stage count above {now} divides the split {split} "
                          f"and model.n_layers={m.n_layers}")
                continue
            found = plan_pipeline_layout(self.cfg, n_devices, n_devices // split, split, stages, self.prefer_tensor)
            if isinstance(found, str):
                self.drop("pipeline", n_devices, split, found)
                found = None
            out.append(found)
        return out

    def shrunk(self, n_devices: int, min_devices: int) -> Layout:
        """The current layout on fewer devices: same model split, fewer replicas; else the nearest split that fits
        (over fewer devices still when none over ``n_devices`` does)."""
        _, fsdp_axis, tensor_axis = self.cfg.mesh.axis_names
        split = self.current.get(STAGE, 1) * self.current.get("expert", 1) * self.current[fsdp_axis] * self.current[tensor_axis]
        for n in self.counts(n_devices, min_devices):  # fewer devices (the rest idle) when none over all fits
            splits = sorted((s for s in range(min_devices, n + 1) if n % s == 0), key=lambda s: abs(s - split))
            for s in splits:
                found = self.layout("baseline", n, n // s, s)
                if found is not None:
                    return found
        raise ConfigError(f"elastic: no mesh over {n_devices} devices or fewer fits train.global_batch="
                          f"{self.cfg.train.global_batch}")

    @property
    def prefer_tensor(self) -> int:
        """The live tensor size: a layout keeps it where it can (see ``plan_layout``)."""
        return self.current[self.cfg.mesh.axis_names[2]]

    def layout(self, kind: str, n_devices: int, replicas: int, split: int) -> Layout | None:
        found = plan_layout(self.cfg, kind, n_devices, replicas, split, self.prefer_tensor)
        if isinstance(found, Layout):
            return found
        self.drop(kind, n_devices, split, found)
        return None

    def refused(self, kind: str, n_devices: int, what: str) -> bool:
        """An explicit per-layer broadcast mode takes no ``kind`` layouts (framework.broadcast.unplannable): noted."""
        mode = self.cfg.broadcast.mode
        if mode in ("kernel", "map"):
            self.drop(kind, n_devices, 0, f"broadcast.mode={mode}: per-layer broadcast modes do not {what}")
        return mode in ("kernel", "map")

    def drop(self, kind: str, n_devices: int, split: int, reason: str) -> None:
        self.dropped.append({"kind": kind, "n_devices": n_devices, "split": split, "reason": reason})


def start_layout(cfg: Config, n_devices: int, min_devices: int, dropped: list[dict]) -> Layout | None:
    """The layout an elastic run whose configured mesh does not fit ``n_devices`` starts with: of the candidates
    (``Gates.candidates``: over the most devices that any fits), the one keeping most of the configured mesh's fixed
    sizes, then the configured accumulation (the start-up decision then tries the others); None when none fits."""
    m = cfg.mesh
    fixed = {axis: size for axis, size in zip(m.axis_names, (m.data, m.fsdp, m.tensor)) if size > 0}
    fixed[STAGE] = m.stage if m.stage > 0 else 1
    current = {axis: max(size, 1) for axis, size in zip(m.axis_names, (m.data, m.fsdp, m.tensor))}
    if m.stage > 1:
        current[STAGE] = m.stage
    layouts = Gates(cfg, current, dropped).candidates(n_devices, min_devices)

    def kept(layout: Layout) -> tuple[int, int]:
        same = sum(layout.mesh.get(axis, 1) == size for axis, size in fixed.items())
        return same, -abs(layout.grad_accum - cfg.train.grad_accum)

    return max(layouts, key=kept, default=None)
