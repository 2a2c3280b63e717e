#!/usr/bin/env python
"""Step time and measured collective bytes of broadcast plans: auto vs all-kernel vs all-map (vs none).

python scripts/bench_broadcast.py --config configs/cnn_small.yaml [--steps 20] [--modes auto kernel map none] [key=value ...]
Prints one markdown row per mode: median step time after the first step, and the bytes per
device per micro-batch that the compiled step's collectives move (measured) and the plan predicts.
"""
from __future__ import annotations

import argparse
import statistics

import _cli


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--modes", nargs="+", default=["auto", "kernel", "map", "none"])
    p.add_argument("--cpu-devices", type=int, default=8)
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    _cli.emulate_cpu_devices(args.cpu_devices)
    with _cli.user_errors():
        import jax

        from framework.collectives import count_compiled
        from framework.config import load_config
        from framework.trainer import Trainer

        print(f"{args.config} on {jax.device_count()} {jax.devices()[0].platform} devices, {args.steps} steps")
        print("| mode | step time (median) | measured bytes/device | predicted bytes/device | final loss |")
        print("|---|---|---|---|---|")
        for mode in args.modes:
            cfg = load_config(args.config, [*args.overrides, f"broadcast.mode={mode}", f"train.steps={args.steps}",
                                            "logging.progress=false", "logging.tensorboard=false"])
            trainer = Trainer(cfg)
            trainer.compile()
            measured = count_compiled(trainer._compiled, jax.device_count()).total
            records = trainer.fit()
            step = statistics.median(r["step_time_s"] for r in records[1:])
            plan = trainer.abstract.broadcast_plan
            predicted = "-" if plan is None else f"{plan.total_bytes:,}"
            print(f"| {mode} | {step * 1e3:.1f} ms | {measured:,} | {predicted} | {records[-1]['loss']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
