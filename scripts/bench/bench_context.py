#!/usr/bin/env python
"""Context parallelism: peak bytes per device and step time by sequence length and context size.

python scripts/bench/bench_context.py [--seqs 8192,16384,32768] [--contexts 1,2,4,8] [--run-below-gib 4] [key=value ...]

A small Llama-style model (GQA) on 8 emulated devices: mesh.context=c and mesh.data=8/c replicas, each
training one sequence per step (train.global_batch=8/c): at context 1 every device holds a whole sequence's
activations, at context c a 1/c piece of one. For each (seq, context) the train step is
compiled and its ``memory_analysis()`` read: peak = arguments + unaliased outputs + temporaries, per
device. The step is also run and timed when the 8 devices' peaks together stay under
``--run-below-gib`` (the machine's memory is shared); otherwise the row is compile-only and says so.
Prints a markdown table; ``--json`` the rows as JSON.
"""
from __future__ import annotations

import argparse

import timing  # first: puts scripts/ on sys.path for _cli
import _cli

MODEL = ["model.style=llama", "model.n_layers=2", "model.d_model=256", "model.n_heads=8", "model.n_kv_heads=2",
         "model.d_mlp=512", "model.vocab_size=256", "mesh.fsdp=1", "data.source=synthetic",
         "logging.progress=false", "logging.tensorboard=false", "broadcast.mode=none", "checkpoint.every_minutes=0"]


def measure(seq: int, size: int, overrides: list[str], steps: int, run_below: float) -> dict:
    import jax

    from framework import memory
    from framework.config import load_config
    from framework.train import Trainer
    from models import context

    n = jax.device_count()
    cfg = load_config(None, [*MODEL, f"train.seq_len={seq}", f"model.max_seq_len={seq}", f"mesh.context={size}",
                             f"mesh.data={n // size}", f"train.global_batch={n // size}", f"train.steps={steps + 1}", *overrides])
    tr = Trainer(cfg)
    with timing.timed() as compile_time:
        tr.compile()
    ma = tr.compiled_step.memory_analysis()
    peak = memory.compiled_device_bytes(ma, 0)
    mode = context.mode_for(cfg.model, seq, size, jax.numpy.dtype(cfg.train.dtype).itemsize)[0] if size > 1 else "dense"
    row = {"seq": seq, "context": size, "mode": mode, "peak_bytes": peak,
           "temp_bytes": ma.temp_size_in_bytes, "compile_s": round(compile_time.seconds, 1), "step_s": None,
           "tokens_per_s": None}
    if peak * n < run_below:
        state = tr.init_state()
        batches = iter([tr.loader.batch(pos) for pos in range(steps + 1)])

        def step() -> None:
            nonlocal state
            state, metrics = tr.step(state, next(batches))
            jax.block_until_ready((state, metrics))

        row["step_s"] = timing.spread(timing.repeat(step, steps, warmup=1), 3)["median"]
        row["tokens_per_s"] = round(cfg.train.global_batch * seq / row["step_s"])
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default="8192,16384,32768")
    p.add_argument("--contexts", default="1,2,4,8")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--run-below-gib", type=float, default=4.0, help="run the step only when 8 x peak is under this")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    _cli.emulate_cpu_devices(8)
    with _cli.user_errors():
        import jax

        rows = []
        for seq in (int(s) for s in args.seqs.split(",")):
            for size in (int(c) for c in args.contexts.split(",")):
                rows.append(measure(seq, size, args.overrides, args.steps, args.run_below_gib * 2**30))
                if args.json:
                    timing.print_json(rows[-1])
    if args.json:
        return
    print(f"{jax.device_count()} {jax.devices()[0].platform} devices; {' '.join(MODEL[:6])} {' '.join(args.overrides)}")
    print("| seq | context | attention | peak GiB / device | temporaries GiB | vs context 1 | compile s | step s | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    base = {r["seq"]: r["peak_bytes"] for r in rows if r["context"] == 1}
    for r in rows:
        ratio = f"{r['peak_bytes'] / base[r['seq']]:.3f}" if r["seq"] in base else ""
        step = "compile only" if r["step_s"] is None else f"{r['step_s']:.2f} | {r['tokens_per_s']}"
        print(f"| {r['seq']} | {r['context']} | {r['mode']} | {r['peak_bytes'] / 2**30:.3f} | "
              f"{r['temp_bytes'] / 2**30:.3f} | {ratio} | {r['compile_s']} | {step} |"
              + (" |" if r["step_s"] is None else ""))


if __name__ == "__main__":
    main()
