"""What a run writes to be looked inside beyond its metrics (scripts/report.py reads both):

- ``logging.dump_hlo``: each compiled train step in RUN_DIR/compiled/<layout>/: ``train_step.hlo.txt`` (the
  optimized HLO, what ``plan.py --measure`` counts collectives in), ``memory_analysis.json``, ``cost_analysis.json``
  and ``layout.json`` (mesh, micro-batches, placement, the device bytes the planner derives). Written where the
  step is compiled (``CompiledSteps``), so every layout gets it once: live meshes, ``auto`` placement's
  measurements, the micro-batch a memory signal switched to, try-run candidates.
- RUN_DIR/plans.json: the memory plan (bytes per device per category and kind) and the broadcast job list of
  each layout the run trained on, appended when a segment starts on a layout the file does not end with.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax

from framework import memory
from framework.fileio import atomic_write

COMPILED_DIR = "compiled"
PLANS_FILE = "plans.json"


def layout_name(axis_sizes: dict[str, int], grad_accum: int, placement: memory.Placement) -> str:
    """``fsdp8_accum1_params-device_opt-device_grads-device_act-save``: one directory per compiled layout."""
    mesh = "-".join(f"{axis}{size}" for axis, size in axis_sizes.items()) or "one-device"
    return (f"{mesh}_accum{grad_accum}_params-{placement.params}_opt-{placement.opt_state}_grads-{placement.grads}"
            f"_act-{placement.activations}")


def analysis_dict(memory_analysis) -> dict[str, int]:
    """``CompiledMemoryStats`` as JSON: every ``*_in_bytes`` figure (per device)."""
    return {k: int(getattr(memory_analysis, k)) for k in dir(memory_analysis) if k.endswith("_in_bytes")}


def dump_compiled(directory: Path, compiled: jax.stages.Compiled, about: dict, host_argument_bytes: int) -> None:
    """The compiled step's optimized HLO, memory and cost analyses, and what it was compiled for, in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    analysis = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # one dict per device program in older jax
    atomic_write(directory / "train_step.hlo.txt", compiled.as_text())
    atomic_write(directory / "memory_analysis.json", json.dumps(analysis_dict(analysis), indent=1))
    atomic_write(directory / "cost_analysis.json", json.dumps({k: float(v) for k, v in (cost or {}).items()}, indent=1))
    derived = {"argument_device_bytes": memory.compiled_argument_bytes(analysis, host_argument_bytes),
               "device_bytes": memory.compiled_device_bytes(analysis, host_argument_bytes),
               "host_argument_bytes": host_argument_bytes}
    atomic_write(directory / "layout.json", json.dumps({**about, **derived}, indent=1))


def append_plan(run_dir: Path, entry: dict) -> bool:
    """Add ``entry`` (a layout's plans) to RUN_DIR/plans.json unless the file ends with that layout already."""
    path = run_dir / PLANS_FILE
    layouts = []
    if path.is_file():
        try:
            layouts = json.loads(path.read_text())["layouts"]
        except (ValueError, KeyError, TypeError):  # cut short by a killed process: start the list again
            layouts = []
    key = lambda e: (e["mesh"], e["grad_accum"], e["memory"]["placement"])  # noqa: E731
    if layouts and key(layouts[-1]) == key(entry):
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"layouts": [*layouts, entry]}, indent=1))
    return True
