#!/usr/bin/env python
"""Benchmark the training step: compile time, first-step latency, step time, throughput, FLOPs, MFU.

python scripts/bench/bench.py --config configs/tiny_lm.yaml [key=value ...] [--steps N] [--json] [--reference]

Model FLOPs per step = 6 * matmul_params * tokens + 12 * n_layers * d_model * seq_len * tokens
(forward + backward; embedding lookups excluded, a tied embedding counted once as the output
projection; attention over the full seq_len^2 scores, remat recompute not counted).
MFU = FLOPs per step / step time / (devices * dense bf16 peak of the device); null on CPU.
Memory: the compiled step's ``memory_analysis()`` (device bytes: arguments less the state placed in
pinned_host, unaliased outputs, temporaries), the planner's optimizer-state bytes per device, and
the process's peak device bytes from ``memory_stats()`` (GPU/TPU; null on CPU), read after the run.

Steps are dispatched asynchronously and each step's metrics are awaited one step late (as
``Trainer.fit`` does), so the host never stalls the device; step times are the intervals
between step completions. Rounds of ``Trainer.fit`` itself are interleaved to measure the real
loop's host overhead against the timed loop. ``--reference`` alternates rounds of the framework's step with a
hand-written plain-``jax.jit`` step of the same model, shardings and math
(scripts/bench/reference_lm.py) and reports framework/reference of the median step times.
"""
from __future__ import annotations

import argparse
import re

import timing  # first: puts scripts/ on sys.path for _cli
import _cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--steps", type=int, default=20, help="timed steps per round (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (alternating with the reference; default 3)")
    p.add_argument("--fit-steps", type=int, default=0,
                   help="Trainer.fit steps per round, for its host overhead (default: --steps; at least 2)")
    p.add_argument("--reference", action="store_true", help="also time a hand-written plain-JAX step")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--cpu-devices", type=int, default=8, help="devices to emulate on the CPU platform (default 8)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. mesh.data=8 mesh.fsdp=1")
    return p.parse_intermixed_args(argv)


def timed_run(step, state, loader, start: int, n: int, depth: int):
    """``n`` steps fed by a Prefetcher, each step's result awaited one step late; returns (state, clock)."""
    from framework.data import Prefetcher
    from framework.metrics import StepClock

    clock = StepClock()
    prefetch = Prefetcher(loader, start, depth)
    previous = None
    try:
        clock.start()
        for _ in range(n):
            _, batch = prefetch.next()
            clock.data_ready()
            state, metrics = step(state, batch)
            clock.dispatched()
            if previous is not None:
                clock.previous_done(previous)
            previous = metrics
        clock.previous_done(previous)
    finally:
        prefetch.close()
    return state, clock


def losses(step, state, loader, n: int):
    """Run ``n`` steps on batches 0..n-1, blocking; returns (state, [loss per step])."""
    import jax

    out = []
    for pos in range(n):
        state, metrics = step(state, loader.batch(pos))
        out.append(float(jax.device_get(metrics["loss"])))
    return state, out


def hlo_instructions(text: str) -> list[str]:
    """A compiled module's instructions, with names, metadata and stack frames removed.

    Two steps with equal lists compile to the same program, whatever Python produced them.
    Computations keep their instruction order, except parameter and constant declarations,
    which are sorted (their textual order does not change the program).
    """
    out, decls = [], []
    for line in text.splitlines():
        if " = " not in line or "file_name_id" in line:
            continue
        line = re.sub(r", metadata=\{[^}]*\}", "", line)
        line = re.sub(r", stack_frame_id=\d+", "", line)
        line = re.sub(r"%[\w.\-]+", "%_", line.strip())
        (decls if re.search(r" (parameter|constant)\(", line) else out).append(line)
    return out + sorted(decls)


def merged(clocks) -> dict:
    reports = [c.report() for c in clocks]
    times = [t for c in clocks for t in c.step_times()]
    out = {k: sum(r[k] for r in reports) / len(reports) for k in reports[0] if k != "step_s"}
    out["step_s"] = timing.spread(times)
    return out


def bench(cfg, args) -> dict:
    import jax

    from framework.config import ConfigError
    from framework.metrics import model_flops, mfu, peak_flops
    from framework.train import Trainer

    trainer = Trainer(cfg)
    trainer.compile()
    device_kind = trainer.devices[0].device_kind
    n_dev = len(trainer.devices)

    state = trainer.init_state()
    jax.block_until_ready(state)
    with timing.timed() as first_step:
        state, metrics = trainer.step(state, trainer.loader.batch(0))
        jax.block_until_ready((state, metrics))
    del state

    ref = None
    if args.reference:
        from reference_lm import ReferenceStep

        try:
            ref = ReferenceStep(cfg, trainer.mesh, trainer.state_shardings, trainer.batch_sharding)
        except ValueError as e:
            raise ConfigError(f"--reference: {e}") from None
        with timing.timed() as ref_compile:
            shapes = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  trainer.abstract.shapes, trainer.state_shardings)
            batch = {"tokens": jax.ShapeDtypeStruct(trainer.loader.global_shape, jax.numpy.int32,
                                                    sharding=trainer.batch_sharding)}
            ref_step = ref.step.lower(shapes, batch).compile()
        fw_hlo, ref_hlo = hlo_instructions(trainer.compiled_step.as_text()), hlo_instructions(ref_step.as_text())

    # Warm-up from a fresh state on batches 0..W-1; with --reference the same for the reference
    # step from the same initial state, which also checks that the two compute the same losses.
    warm = args.warmup
    fw_state, fw_losses = losses(trainer.step, trainer.init_state(), trainer.loader, warm)
    if ref is not None:
        ref_state, ref_losses = losses(ref_step, trainer.init_state(), trainer.loader, warm)

    # Timed rounds, interleaved so that load changes on the machine hit all of them alike:
    # the framework's step, the reference step, and Trainer.fit itself continuing the same state
    # (the real loop: prefetch, metrics fetched one step late, records; its first step per call
    # includes the loop's start-up and is dropped).
    fit_steps = args.fit_steps or args.steps
    fw_clocks, ref_clocks, fit_times = [], [], []
    pos = warm
    for r in range(args.rounds):
        if ref is not None and r % 2:  # A B B A ...: neither step always runs first
            ref_state, clock = timed_run(ref_step, ref_state, trainer.loader, pos, args.steps, cfg.data.prefetch)
            ref_clocks.append(clock)
        fw_state, clock = timed_run(trainer.step, fw_state, trainer.loader, pos, args.steps, cfg.data.prefetch)
        fw_clocks.append(clock)
        if ref is not None and not r % 2:
            ref_state, clock = timed_run(ref_step, ref_state, trainer.loader, pos, args.steps, cfg.data.prefetch)
            ref_clocks.append(clock)
        pos += args.steps
        trainer.state = fw_state
        records = trainer.fit(int(jax.device_get(fw_state.step)) + fit_steps)
        fit_times += [r["step_time_s"] for r in records[1:]]
        fw_state = trainer.state
    trainer.state = None
    del fw_state
    if ref is not None:
        del ref_state
    fit_step = timing.spread(fit_times)["median"]

    t, host = cfg.train, merged(fw_clocks)
    step_s = host.pop("step_s")
    flops = model_flops(cfg, trainer.abstract.param_count)
    cost = trainer.compiled_step.cost_analysis() or {}
    xla_flops = cost.get("flops", 0.0) * n_dev  # XLA's count per device (all ops, remat included), summed
    achieved = flops.total / step_s["median"]
    report = {
        "config": args.config,
        "overrides": args.overrides,
        "device_kind": device_kind,
        "platform": trainer.devices[0].platform,
        "n_devices": n_dev,
        "mesh": trainer.axis_sizes,
        "param_count": trainer.abstract.param_count,
        "global_batch": t.global_batch,
        "seq_len": t.seq_len,
        "dtype": t.dtype,
        "compile_s": trainer.compile_seconds,
        "first_step_s": first_step.seconds,
        "steps_timed": args.steps * args.rounds,
        "step_s": step_s,
        "tokens_per_s": t.global_batch * t.seq_len / step_s["median"],
        "samples_per_s": t.global_batch / step_s["median"],
        "flops_formula": flops.FORMULA,
        "flops_per_step": flops.total,
        "flops_dense": flops.dense,
        "flops_attention": flops.attention,
        "matmul_params": flops.matmul_params,
        "xla_flops_per_step": xla_flops or None,
        "achieved_flops_per_s": achieved,
        "achieved_flops_per_s_per_device": achieved / n_dev,
        "peak_flops_per_device": peak_flops(device_kind),
        "mfu": mfu(flops.total, step_s["median"], n_dev, device_kind),
        "host": host,
        "fit": {"steps": fit_steps * args.rounds, "step_s_median": fit_step, "host_overhead_s": fit_step - step_s["median"]},
    }
    report["memory"] = memory_report(trainer)
    if ref is not None:
        ref_host = merged(ref_clocks)
        ref_step_s = ref_host.pop("step_s")
        report["reference"] = {
            "compile_s": ref_compile.seconds,
            "step_s": ref_step_s,
            "host": ref_host,
            "ratio": step_s["median"] / ref_step_s["median"],
            "ratio_mean": step_s["mean"] / ref_step_s["mean"],
            "cpu_ratio": host["cpu_s_per_step"] / ref_host["cpu_s_per_step"],
            "round_ratios": [
                timing.spread(f.step_times())["median"] / timing.spread(r.step_times())["median"]
                for f, r in zip(fw_clocks, ref_clocks)
            ],
            "losses": {"framework": fw_losses, "reference": ref_losses},
            "max_loss_diff": max(abs(a - b) for a, b in zip(fw_losses, ref_losses)),
            "hlo_instructions": {"framework": len(fw_hlo), "reference": len(ref_hlo)},
            "hlo_identical": fw_hlo == ref_hlo,
            "hlo_same_instructions": sorted(fw_hlo) == sorted(ref_hlo),  # equal up to schedule order
        }
    return report


def memory_report(trainer) -> dict:
    """Device bytes of the compiled step and the process's peak so far (``memory_stats``; None on CPU)."""
    from framework import memory, sharding

    ma = trainer.compiled_step.memory_analysis()
    host_state = memory.host_state_bytes(trainer.abstract, trainer.placement, trainer.axis_sizes)
    a = trainer.abstract
    stats = trainer.devices[0].memory_stats()
    return {
        "placement": {**trainer.placement.kinds(), "activations": trainer.placement.activations},
        "opt_state_bytes_per_device": sharding.bytes_per_device(a.shapes.opt_state, a.specs.opt_state, trainer.axis_sizes),
        "host_state_bytes_per_device": host_state,
        "compiled_device_bytes": memory.compiled_device_bytes(ma, host_state),
        "memory_analysis": {k: getattr(ma, k) for k in dir(ma) if k.endswith("_in_bytes")},
        "peak_bytes_in_use": stats.get("peak_bytes_in_use") if stats else None,
        "bytes_limit": stats.get("bytes_limit") if stats else None,
    }


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms"


def print_text(r: dict) -> None:
    s, h = r["step_s"], r["host"]
    print(f"bench {r['config']} {' '.join(r['overrides'])}".rstrip())
    print(f"  {r['n_devices']} x {r['device_kind']} ({r['platform']}), mesh {r['mesh']}, "
          f"{r['param_count']:,} params, batch {r['global_batch']} x {r['seq_len']} tokens, {r['dtype']}")
    print(f"  compile {r['compile_s']:.2f} s, first step {_ms(r['first_step_s'])}")
    print(f"  step time over {r['steps_timed']} steps: median {_ms(s['median'])}, min {_ms(s['min'])}, max {_ms(s['max'])}")
    print(f"  throughput: {r['tokens_per_s']:,.0f} tokens/s, {r['samples_per_s']:,.1f} samples/s")
    print(f"  model FLOPs/step: {r['flops_per_step']:.4g} = {r['flops_formula']}")
    print(f"    (matmul_params {r['matmul_params']:,}: embedding lookups excluded; dense {r['flops_dense']:.4g}, "
          f"attention {r['flops_attention']:.4g}; XLA's own count {r['xla_flops_per_step'] or 0:.4g})")
    mfu = "n/a (no peak for this device)" if r["mfu"] is None else f"{100 * r['mfu']:.1f}% of {r['peak_flops_per_device']:.4g} FLOP/s per device (bf16 dense)"
    print(f"  achieved {r['achieved_flops_per_s']:.4g} FLOP/s ({r['achieved_flops_per_s_per_device']:.4g} per device); MFU {mfu}")
    print(f"  host per step: data {_ms(h['host_data_s'])}, dispatch {_ms(h['host_dispatch_s'])}, "
          f"then waits {_ms(h['host_wait_s'])} for the device; next step already queued in "
          f"{100 * h['gap_free_fraction']:.0f}% of steps; {h['cpu_s_per_step']:.3f} CPU s/step")
    m, mib = r["memory"], lambda b: "n/a" if b is None else f"{b / 2**20:,.1f} MiB"
    print(f"  device memory: compiled step {mib(m['compiled_device_bytes'])} (memory_analysis), "
          f"process peak {mib(m['peak_bytes_in_use'])} of {mib(m['bytes_limit'])} (memory_stats); "
          f"optimizer state {mib(m['opt_state_bytes_per_device'])} per device in {m['placement']['opt_state']}")
    f = r["fit"]
    print(f"  Trainer.fit: median {_ms(f['step_s_median'])}/step over {f['steps']} steps "
          f"(host overhead {f['host_overhead_s'] * 1e3:+.2f} ms/step vs the timed loop)")
    if "reference" in r:
        ref = r["reference"]
        print(f"  reference (plain jax.jit): median {_ms(ref['step_s']['median'])}, compile {ref['compile_s']:.2f} s; "
              f"framework/reference = {ref['ratio']:.3f} (rounds {', '.join(f'{x:.3f}' for x in ref['round_ratios'])}); "
              f"losses max |diff| {ref['max_loss_diff']:.2e}")
        print(f"    mean step times ratio {ref['ratio_mean']:.3f}; CPU seconds per step (all threads) "
              f"{h['cpu_s_per_step']:.3f} vs {ref['host']['cpu_s_per_step']:.3f}, ratio {ref['cpu_ratio']:.3f}")
        same = ("identical" if ref["hlo_identical"] else
                "the same instructions in another schedule order" if ref["hlo_same_instructions"] else "DIFFERENT")
        print(f"    compiled programs {same}: {ref['hlo_instructions']['framework']} vs "
              f"{ref['hlo_instructions']['reference']} HLO instructions (names and metadata ignored)")


def main(argv=None) -> None:
    args = parse_args(argv)
    _cli.emulate_cpu_devices(args.cpu_devices)
    with _cli.user_errors():
        from framework.config import ConfigError, load_config

        for name, least in (("steps", 2), ("rounds", 1), ("warmup", 1)):
            if getattr(args, name) < least:
                raise ConfigError(f"--{name}={getattr(args, name)}: expected at least {least}")
        if args.fit_steps < 0 or args.fit_steps == 1:
            raise ConfigError(f"--fit-steps={args.fit_steps}: expected 0 (same as --steps) or at least 2")
        cfg = load_config(args.config, [*args.overrides, "logging.progress=false", "logging.tensorboard=false"])
        report = bench(cfg, args)
    _cli.print_report(report, args.json, print_text)


if __name__ == "__main__":
    main()
