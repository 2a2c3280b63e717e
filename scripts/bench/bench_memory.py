#!/usr/bin/env python
"""Device bytes per device and step time: no offload vs opt_state offload vs opt_state + activation offload.

python scripts/bench/bench_memory.py --config configs/gpt2_124m.yaml [--steps 3] [key=value ...]
Prints a markdown table: planner device/host bytes (estimate), memory_analysis() device bytes of
the compiled step, and the median step time relative to no offload.
With --categories: one table of bytes per device per category for the config as given, the
planner's estimate next to the compiled figure (and how each figure was obtained).
"""
from __future__ import annotations

import argparse

import timing  # first: puts scripts/ on sys.path for _cli
import _cli

VARIANTS = {
    "no offload": [],
    "opt_state offload": ["memory.opt_state=pinned_host"],
    "opt_state + activation offload": ["memory.opt_state=pinned_host", "memory.activations=offload"],
}


def measure(cfg, steps: int) -> dict:
    import jax

    from framework import memory
    from framework.train import Trainer

    tr = Trainer(cfg)
    planned = tr.memory_plan(compiled_activations=False)
    tr.compile()
    ma = tr.compiled_step.memory_analysis()
    host_state = memory.host_state_bytes(tr.abstract, tr.placement, tr.axis_sizes)
    batches = iter([tr.loader.batch(pos) for pos in range(steps + 1)])
    state, metrics = tr.init_state(), None

    def step() -> None:
        nonlocal state, metrics
        state, metrics = tr.step(state, next(batches))
        jax.block_until_ready((state, metrics))

    times = timing.repeat(step, steps, warmup=1)  # the first step is a warm-up
    return {
        "planner_device": planned.totals[memory.DEVICE],
        "planner_host": planned.totals[memory.HOST],
        "compiled_device": memory.compiled_device_bytes(ma, host_state),
        "compiled_host_temp": ma.host_temp_size_in_bytes,
        "step_s": timing.spread(times)["median"],
        "loss": float(metrics["loss"]),
    }


def categories(cfg) -> str:
    from framework import memory
    from framework.train import Trainer

    tr = Trainer(cfg)
    est, comp = tr.memory_plan(compiled_activations=False), tr.memory_plan()
    mib = lambda b: f"{b / 2**20:.1f}"
    rows = ["| category | planner device MiB | compiled device MiB | planner pinned_host MiB | compiled pinned_host MiB "
            "| figure (planner / compiled) |", "| --- | --- | --- | --- | --- | --- |"]
    for c in memory.CATEGORIES:
        e, k = est.bytes[c], comp.bytes[c]
        rows.append(f"| {c} | {mib(e[memory.DEVICE])} | {mib(k[memory.DEVICE])} | {mib(e[memory.HOST])} | "
                    f"{mib(k[memory.HOST])} | {est.figures[c]} / {comp.figures[c]} |")
    rows.append(f"| total | {mib(est.totals[memory.DEVICE])} | {mib(comp.totals[memory.DEVICE])} | "
                f"{mib(est.totals[memory.HOST])} | {mib(comp.totals[memory.HOST])} | |")
    return "\n".join(rows + [f"activations and grads, compiled figure: {comp.activation_source}"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--categories", action="store_true", help="planner vs compiled bytes per category, no timing")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    _cli.emulate_cpu_devices(8)
    with _cli.user_errors():
        import jax

        from framework.config import load_config

        base = [*args.overrides, "logging.progress=false", "logging.tensorboard=false"]
        if args.categories:
            print(f"{jax.device_count()} {jax.devices()[0].platform} devices; {args.config} {' '.join(args.overrides)}")
            print(categories(load_config(args.config, base)))
            return
        rows = {name: measure(load_config(args.config, [*base, *extra]), args.steps) for name, extra in VARIANTS.items()}
    mib = lambda b: f"{b / 2**20:.1f}"
    ref = rows["no offload"]["step_s"]
    print(f"{jax.device_count()} {jax.devices()[0].platform} devices; {args.config} {' '.join(args.overrides)}")
    print("| placement | planner device MiB | planner pinned_host MiB | memory_analysis device MiB | host temp MiB | step s | vs no offload | loss |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {mib(r['planner_device'])} | {mib(r['planner_host'])} | {mib(r['compiled_device'])} | "
              f"{mib(r['compiled_host_temp'])} | {r['step_s']:.2f} | {r['step_s'] / ref:.2f}x | {r['loss']:.4f} |")


if __name__ == "__main__":
    main()
