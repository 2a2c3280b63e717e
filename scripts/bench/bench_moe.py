#!/usr/bin/env python
"""Mixture-of-experts step time: moe_tiny against a dense model of the same active parameters on the same
devices, dropless against capacity 1.25, experts split over the expert axis or not; prints JSON.

python scripts/bench/bench_moe.py [--config configs/moe_tiny.yaml] [--steps 10] [key=value ...]

The dense twin has no experts and an MLP as wide as the top_k experts a token goes through
(d_mlp = top_k * d_expert_mlp, SwiGLU as the experts), so its matmul FLOPs per token equal the MoE's but
for the router. Every variant runs the framework's compiled step on all 8 devices with the same global
batch. All-to-all: the padded all_to_all is what runs (``jax.lax.ragged_all_to_all`` is UNIMPLEMENTED
on XLA:CPU), so there is one variant to time here.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
from pathlib import Path

import timing  # first: puts scripts/ on sys.path for _cli
import _cli

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "moe_tiny.yaml"))
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 2 warm-up steps)")
    p.add_argument("overrides", nargs="*")
    return p.parse_intermixed_args(argv)


def variants(cfg) -> dict[str, list[str]]:
    e = cfg.model.moe
    dense_mlp = e.top_k * (e.d_expert_mlp or cfg.model.d_mlp)
    return {
        "moe dropless, expert=4": ["mesh.expert=4", "mesh.fsdp=-1"],
        "moe dropless, expert=1": ["mesh.expert=1", "mesh.fsdp=-1"],
        "moe capacity 1.25, expert=4": ["mesh.expert=4", "mesh.fsdp=-1", "model.moe.capacity_factor=1.25"],
        f"dense d_mlp={dense_mlp} (same active params)": ["mesh.expert=1", "mesh.fsdp=-1", "model.moe.n_experts=0",
                                                        f"model.d_mlp={dense_mlp}"],
    }


def step_time(cfg, steps: int) -> dict:
    """Median and fastest step seconds, compile seconds and parameter counts of the framework's step, one fixed batch."""
    from framework.metrics import active_param_count

    tr, times, compile_s = timing.trainer_step_times(cfg, steps)
    total = tr.base_abstract.param_count
    return {"median_s": round(times["median"], 4), "min_s": round(times["min"], 4), "compile_s": round(compile_s, 1),
            "params": total, "active_params": active_param_count(cfg, total), "mesh": dict(tr.axis_sizes)}


def main(argv=None) -> None:
    args = parse_args(argv)
    _cli.emulate_cpu_devices(8)
    with _cli.user_errors():
        from framework.config import load_config

        base = ["logging.progress=false", "logging.tensorboard=false", "checkpoint.every_minutes=0", *args.overrides]
        cfg = load_config(args.config, base)
        out = {name: step_time(load_config(args.config, [*base, *extra]), args.steps) for name, extra in variants(cfg).items()}
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                                check=False).stdout.strip()
        timing.print_json({"config": args.config, "steps": args.steps, "machine": f"{platform.machine()}, "
                           f"{os.cpu_count()} CPUs, 8 emulated devices", "commit": commit,
                           "all_to_all": "padded all_to_all (ragged_all_to_all unimplemented on XLA:CPU)",
                           "variants": out}, indent=1)


if __name__ == "__main__":
    main()
