"""A try-run decision as it is recorded: one line of RUN_DIR/tryrun.jsonl and the table printed during training.

Also the rule that learns from past decisions how many devices are worth using (``max_useful_devices``):
devices measured to add less than ``elastic.threshold`` are left idle.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax

from framework.mesh import STAGE
from framework.tryrun.trial import Trial


@dataclasses.dataclass
class Seconds:
    """Where a decision's time went."""

    checkpoint: float  # saving the state the try-runs start from
    tryrun_compile: float  # the baseline's compile plus the candidates' side-by-side compile
    tryrun_restore: float  # every try-run's start state
    checkpoint_restore: float  # of the restores above and ``restore``: orbax reads
    tryrun_measured: float  # warm-up plus measured steps of every try-run
    restore: float  # the chosen layout's state
    total: float


@dataclasses.dataclass
class Decision:
    """What a decision saw, tried, dropped and chose; ``record`` is its tryrun.jsonl line."""

    trigger: str
    step: int
    available_devices: int
    max_devices: int | None
    min_devices: int
    n_devices: int  # the devices the layouts were planned over (usable, less those left idle)
    baseline: Trial
    candidates: list[Trial]
    dropped: list[dict]  # {kind, n_devices, split, reason}: layouts left out (see layouts.Gates)
    chosen: Trial
    adopted: bool
    threshold: float
    max_useful_devices: int | None
    idle_devices: int  # of ``available_devices`` (at most ``max_devices``), those the chosen layout leaves idle
    idle_reason: str | None  # why (see TryRunController.idle_reason)
    config_misfit: str | None  # trigger "misfit": why the configured mesh did not fit the devices at start
    state_from: str  # "live" (resharded in memory) or "checkpoint"
    seconds: Seconds

    def record(self) -> dict:
        return {
            "trigger": self.trigger, "step": self.step, "checkpoint_step": self.step,
            "available_devices": self.available_devices, "max_devices": self.max_devices,
            "min_devices": self.min_devices, "integer_multiple": self.n_devices % self.min_devices == 0,
            "baseline": self.baseline.record(), "candidates": [tr.record() for tr in self.candidates],
            "dropped": self.dropped, "chosen": self.chosen.record(), "adopted": self.adopted,
            "threshold": self.threshold, "max_useful_devices": self.max_useful_devices,
            "idle_devices": self.idle_devices, "idle_reason": self.idle_reason, "config_misfit": self.config_misfit,
            "state_from": self.state_from,
            "seconds": dataclasses.asdict(self.seconds),
        }


def log_decision(record: dict, path: Path | None) -> None:
    """Process 0 appends ``record`` to ``path`` (RUN_DIR/tryrun.jsonl; None: no run dir) and prints its table."""
    if jax.process_index() != 0:
        return
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    print(format_decision(record), flush=True)


def max_useful_devices(best_by_count: dict[int, float], threshold: float) -> int | None:
    """The device count past which more devices stop raising samples/s by more than ``threshold``."""
    useful = None
    for n in sorted(best_by_count):
        if useful is None or best_by_count[n] > best_by_count[useful] * (1 + threshold):
            useful = n
    return useful


def devices_to_use(best_by_count: dict[int, float], threshold: float, n_usable: int) -> int:
    """``n_usable``, or fewer when ``n_usable`` devices were measured and the max useful count is below it.

    A count never measured is always tried (otherwise a run that grew could never learn what it gains).
    """
    useful = max_useful_devices({n: v for n, v in best_by_count.items() if n <= n_usable}, threshold)
    return useful if n_usable in best_by_count and useful is not None and useful < n_usable else n_usable


def mesh_text(mesh: dict) -> str:
    """data x fsdp x tensor, with the stage count in front for a pipelined mesh (``s2:1x2x2``)."""
    sizes = "x".join(str(v) for k, v in mesh.items() if k != STAGE)
    return f"s{mesh[STAGE]}:{sizes}" if STAGE in mesh else sizes


def format_decision(d: dict) -> str:
    """A decision (its record) as the table printed during training."""
    s = d["seconds"]
    lines = [
        f"try-run at step {d['step']} ({d['trigger']}): {d['available_devices']} devices available, "
        f"{d['min_devices']} per model replica, integer multiple: {'yes' if d['integer_multiple'] else 'no'}",
        f"  {'kind':<11}{'mesh':<11}{'devices':>8}{'accum':>6}{'samples/s':>11}{'vs base':>9}{'compile s':>10}"
        f"{'peak MiB':>10}  source",
    ]
    for row in (d["baseline"], *d["candidates"]):
        mesh = mesh_text(row["mesh"])
        vs = "" if row is d["baseline"] else f"{row['improvement']:+.1%}"
        peak = row.get("peak_bytes_per_device")  # per device, the compiled step's (absent in older records)
        lines.append(
            f"  {row['kind']:<11}{mesh:<11}{row['n_devices']:>8}{row['grad_accum']:>6}{row['samples_per_s']:>11.1f}"
            f"{vs:>9}{row['compile_s']:>10.2f}{'-' if peak is None else f'{peak / 2**20:.1f}':>10}  {row['source']}"
        )
    for row in d.get("dropped", []):
        lines.append(f"  {row['kind']:<11}{'-':<11}{row['n_devices']:>8}{'':>6}{'dropped':>11}  {row['reason']}")
    chosen = d["chosen"]
    mesh = mesh_text(chosen["mesh"])
    verdict = (f"adopted {chosen['kind']} {mesh} on {chosen['n_devices']} devices ({chosen['improvement']:+.1%} > {d['threshold']:.0%})"
               if d["adopted"] else f"kept baseline {mesh} on {chosen['n_devices']} devices (best candidate not > {d['threshold']:.0%})")
    if d.get("config_misfit"):
        lines.insert(1, f"  the configured mesh does not fit: {d['config_misfit']}")
    idle = d.get("idle_reason") or f"they added less than {d['threshold']:.0%}"  # (older records: no idle_reason)
    lines.append(f"  -> {verdict}; max useful devices so far: {d['max_useful_devices']}"
                 + (f"; {d['idle_devices']} devices left idle: {idle}" if d.get("idle_devices") else ""))
    lines.append(
        f"  seconds: checkpoint {s['checkpoint']:.2f}, try-runs compile {s['tryrun_compile']:.2f} + restore "
        f"{s['tryrun_restore']:.2f} + measured {s['tryrun_measured']:.2f}, restore {s['restore']:.2f}, total {s['total']:.2f}"
    )
    return "\n".join(lines)
