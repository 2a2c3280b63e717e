#!/usr/bin/env python
"""Step time and measured collective bytes of broadcast plans: auto vs all-kernel vs all-map (vs none).

python scripts/bench/bench_broadcast.py --config configs/cnn_small.yaml [--steps 20] [--modes auto kernel map none]
    [--compress none int8] [--losses] [key=value ...]
Prints one JSON line per (mode, compress): seconds to compile the step, median step time after the first step, the bytes per
device per micro-batch that the compiled step's collectives move (measured) and the plan
predicts, and the final loss (``--losses``: every step's loss, for the int8 loss bound).
"""
from __future__ import annotations

import argparse

import timing  # first: puts scripts/ on sys.path for _cli
import _cli


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--modes", nargs="+", default=["auto", "kernel", "map", "none"], choices=["auto", "kernel", "map", "none"],
                   help="put key=value overrides before this flag (or after --): it takes every word that follows")
    p.add_argument("--compress", nargs="+", default=["none"], choices=["none", "bf16", "int8"])
    p.add_argument("--losses", action="store_true", help="print every step's loss")
    p.add_argument("--cpu-devices", type=int, default=8)
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    _cli.emulate_cpu_devices(args.cpu_devices)
    with _cli.user_errors():
        import jax

        from framework.collectives import count_compiled
        from framework.config import load_config
        from framework.train import Trainer

        for compress in args.compress:
            for mode in args.modes:
                if mode == "none" and compress != "none":
                    continue  # no plan: nothing travels compressed
                cfg = load_config(args.config, [*args.overrides, f"broadcast.mode={mode}", f"broadcast.compress={compress}",
                                                f"train.steps={args.steps}", "logging.progress=false",
                                                "logging.tensorboard=false"])
                trainer = Trainer(cfg)
                with timing.timed() as compile_time:
                    trainer.compile()
                report = count_compiled(trainer.compiled_step, jax.device_count())
                records = trainer.fit()
                plan = trainer.abstract.broadcast_plan
                out = {
                    "config": args.config, "overrides": args.overrides, "devices": jax.device_count(),
                    "platform": jax.devices()[0].platform, "mode": mode, "compress": compress, "steps": len(records),
                    "compile_s": round(compile_time.seconds, 2),
                    "step_time_s": timing.spread([r["step_time_s"] for r in records[1:]])["median"] if len(records) > 1 else None,
                    "measured_bytes": report.total // cfg.train.grad_accum,
                    "predicted_bytes": None if plan is None else plan.total_bytes,
                    "modes": None if plan is None else plan.modes(),
                    "final_loss": records[-1]["loss"],
                }
                if args.losses:
                    out["losses"] = [r["loss"] for r in records]
                timing.print_json(out)


if __name__ == "__main__":
    main()
