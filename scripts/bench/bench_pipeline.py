#!/usr/bin/env python
"""Pipeline step time against the GPipe bubble, for several stage and micro-batch counts; prints JSON.

python scripts/bench/bench_pipeline.py --config configs/tiny_lm.yaml [--stages 2 4] [--microbatches 1 2 4 8] [key=value ...]

Each layout runs the framework's compiled step on all devices (``mesh.stage=S``, the rest fsdp)
with the same global batch; the unpipelined step (S=1) is the reference. The bubble fraction is
(S-1)/(M+S-1); the schedule runs M+S-1 ticks of every stage, so a stage's critical path is
(M+S-1)/M times its share of the unpipelined work (``ideal_ratio``, what a machine with one
processor per stage would show). Where the stages share processors (emulated CPU devices on
a few cores) the bubble ticks still compute (on zeros), so total work, and the step time, grow
by the same (M+S-1)/M over the unpipelined step split S ways: ``work_ratio``.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
from pathlib import Path

import timing  # first: puts scripts/ on sys.path for _cli
import _cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    p.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--steps", type=int, default=5, help="timed steps per layout (after 2 warm-up steps)")
    p.add_argument("overrides", nargs="*")
    return p.parse_intermixed_args(argv)


def step_time(cfg, steps: int) -> tuple[float, float, float]:
    """(median and fastest step seconds, compile seconds) of the framework's step on all devices, one fixed batch."""
    tr, times, compile_s = timing.trainer_step_times(cfg, steps)
    return times["median"], times["min"], compile_s


def main(argv=None) -> None:
    args = parse_args(argv)
    _cli.emulate_cpu_devices(8)
    with _cli.user_errors():
        import jax

        from framework.config import ConfigError, load_config
        from framework.pipeline import bubble_fraction

        n = jax.device_count()
        base = ["logging.progress=false", "logging.tensorboard=false", "model.scan_layers=true", *args.overrides]
        ref_s, ref_min, ref_compile = step_time(load_config(args.config, [*base, "mesh.data=1", f"mesh.fsdp={n}"]), args.steps)
        rows = [{"stages": 1, "microbatches": 1, "step_time_s": ref_s, "min_step_time_s": ref_min, "compile_s": ref_compile}]
        for s in args.stages:
            for m in args.microbatches:
                try:
                    cfg = load_config(args.config, [*base, f"mesh.stage={s}", "mesh.data=1", f"mesh.fsdp={n // s}",
                                                     f"train.pipeline_microbatches={m}"])
                    t, fastest, c = step_time(cfg, args.steps)
                except ConfigError as e:  # e.g. pieces of 2 rows over fsdp 4
                    rows.append({"stages": s, "microbatches": m, "skipped": str(e)})
                    continue
                rows.append({"stages": s, "microbatches": m, "step_time_s": t, "min_step_time_s": fastest, "compile_s": c,
                             "bubble_fraction": bubble_fraction(s, m), "work_ratio": (m + s - 1) / m,
                             "ideal_ratio": (m + s - 1) / (m * s), "measured_ratio": t / ref_s,
                             "measured_min_ratio": fastest / ref_min})
        cfg = load_config(args.config, base)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    report = {"config": args.config, "overrides": args.overrides, "devices": n, "platform": jax.devices()[0].platform,
              "host": platform.node(), "commit": commit, "model": {"n_layers": cfg.model.n_layers, "d_model": cfg.model.d_model},
              "global_batch": cfg.train.global_batch, "seq_len": cfg.train.seq_len, "rows": rows}
    timing.print_json(report, indent=1)


if __name__ == "__main__":
    main()
