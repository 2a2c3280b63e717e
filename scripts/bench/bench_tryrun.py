#!/usr/bin/env python
"""Cost and quality of the try-run controller on an 8 -> 4 -> 8 device schedule.

1. One elastic run: per trigger, seconds in checkpoint, try-runs (compile / restore /
   measured) and the final restore, as a share of the whole run's wall time.
2. Decision cost against the bound "checkpoint + 3 steps per candidate" (each candidate's steps
   at its try-run's median step time), for triggers whose layouts were all seen before, and the
   median over those decisions (a longer ``elastic.device_schedule`` gives several).
3. Exhaustive check (``--long-steps`` > 0): every layout a trigger considered (baseline and
   candidates) is run separately for ``--long-steps`` steps; the pick of those longer
   measurements (with the same threshold rule) is compared with what the controller adopted.

python scripts/bench/bench_tryrun.py --config configs/tiny_lm.yaml --run-dir runs/bench_tryrun [key=value ...]
"""
from __future__ import annotations

import argparse
import json

import timing  # first: puts scripts/ on sys.path for _cli
import _cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--cpu-devices", type=int, default=8)
    p.add_argument("--steps", type=int, default=90)
    p.add_argument("--long-steps", type=int, default=20, help="measured steps per layout in the exhaustive check (0: none)")
    p.add_argument("overrides", nargs="*")
    return p.parse_intermixed_args(argv)


def exhaustive_pick(rows: list[dict], threshold: float) -> dict:
    """The layout longer measurements would adopt: the best candidate if it beats the baseline by the threshold."""
    baseline, candidates = rows[0], rows[1:]
    best = max(candidates, key=lambda r: r["long_samples_per_s"], default=None)
    if best is not None and best["long_samples_per_s"] > baseline["long_samples_per_s"] * (1 + threshold):
        return best
    return baseline


def main(argv=None) -> None:
    args = parse_args(argv)
    _cli.emulate_cpu_devices(args.cpu_devices)
    with _cli.user_errors():
        import shutil
        from pathlib import Path

        import jax

        from framework.config import load_config
        from framework.train import Trainer
        from framework.tryrun import Layout, TryRunController, with_layout

        third = args.steps // 3
        cfg = load_config(args.config, [
            f"train.steps={args.steps}", "logging.progress=false", "logging.tensorboard=false", "elastic.enabled=true",
            f"elastic.device_schedule=[[0,8],[{third},4],[{2 * third},8]]", *args.overrides,
        ])
        run_dir = Path(args.run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)

        with timing.timed() as run:
            TryRunController(Trainer(cfg, run_dir=run_dir)).fit()  # the controller owns an elastic run's loop
        whole = run.seconds
        decisions = [json.loads(line) for line in (run_dir / "tryrun.jsonl").read_text().splitlines()]

        report = {"whole_run_s": whole, "steps": args.steps, "triggers": []}
        first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
        seen = {(tuple(first["mesh"].items()), cfg.train.grad_accum)}  # the run's first layout
        for d in decisions:
            s = d["seconds"]
            tried = [r for r in (d["baseline"], *d["candidates"]) if r["source"] == "tryrun"]
            keys = {(tuple(r["mesh"].items()), r["grad_accum"]) for r in tried}
            all_seen = keys <= seen
            seen |= keys
            # the bound: the checkpoint plus 3 steps per candidate, each at its try-run's median step time
            bound = s["checkpoint"] + sum(3 * cfg.train.global_batch / r["measured_samples_per_s"] for r in tried)
            rows = []
            for row in (d["baseline"], *d["candidates"]):
                if not args.long_steps:
                    rows.append({**row, "long_samples_per_s": None})
                    continue
                layout = Layout(row["kind"], row["n_devices"], row["mesh"], row["grad_accum"])
                long = Trainer(with_layout(cfg, layout), devices=jax.devices()[: layout.n_devices])
                long.state = long.init_state()
                long.compile()
                batches = [long.loader.batch(i) for i in range(args.long_steps + 2)]
                for b in batches[:2]:
                    long.state, _ = long.step(long.state, b)
                jax.block_until_ready(long.state)
                with timing.timed() as measured:  # dispatched back to back, awaited once at the end
                    for b in batches[2:]:
                        long.state, m = long.step(long.state, b)
                    jax.block_until_ready((long.state, m))
                rows.append({**row, "long_samples_per_s": cfg.train.global_batch * args.long_steps / measured.seconds})
            pick = exhaustive_pick(rows, d["threshold"]) if args.long_steps else d["chosen"]
            same = pick["mesh"] == d["chosen"]["mesh"] and pick["n_devices"] == d["chosen"]["n_devices"]
            report["triggers"].append({
                "step": d["step"], "available_devices": d["available_devices"], "seconds": s,
                "share": {k: v / whole for k, v in s.items()}, "rows": rows, "state_from": d.get("state_from"),
                "layouts_tried": len(tried), "all_seen_before": all_seen, "bound_s": bound,
                "steps_per_layout": [(r.get("warmup_steps"), r.get("measured_steps")) for r in tried],
                "within_bound": s["total"] <= bound,
                "adopted": d["chosen"]["mesh"], "adopted_devices": d["chosen"]["n_devices"],
                "exhaustive_pick": pick["mesh"], "exhaustive_devices": pick["n_devices"], "agree": same,
            })
        (run_dir / "bench_tryrun.json").write_text(json.dumps(report, indent=1))
        print(f"whole run {whole:.1f} s for {args.steps} steps")
        print("| trigger | devices | checkpoint s | try-run compile s | try-run restore s | try-run measured s | restore s | total s (share of run) | adopted | exhaustive pick |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for tr in report["triggers"]:
            s, sh = tr["seconds"], tr["share"]
            cell = lambda k: f"{s[k]:.2f} ({sh[k]:.1%})"
            mesh = lambda m, n: "x".join(str(v) for v in m.values()) + f" on {n}"
            print(f"| step {tr['step']} | {tr['available_devices']} | {cell('checkpoint')} | {cell('tryrun_compile')} | "
                  f"{cell('tryrun_restore')} | {cell('tryrun_measured')} | {cell('restore')} | {cell('total')} | "
                  f"{mesh(tr['adopted'], tr['adopted_devices'])} | "
                  f"{mesh(tr['exhaustive_pick'], tr['exhaustive_devices']) if args.long_steps else '-'} |")
        for tr in report["triggers"]:
            steps = ", ".join(f"{w}+{m}" for w, m in tr["steps_per_layout"])
            print(f"step {tr['step']}: {tr['layouts_tried']} layouts tried (warm-up + measured steps: {steps}), all seen "
                  f"before: {tr['all_seen_before']}, state from {tr['state_from']}; decision {tr['seconds']['total']:.2f} s vs bound (checkpoint + 3 steps "
                  f"per candidate) {tr['bound_s']:.2f} s: {'met' if tr['within_bound'] else 'not met'}")
        seen = [tr for tr in report["triggers"] if tr["all_seen_before"] and tr["layouts_tried"]]
        if seen:
            decision = timing.spread([tr["seconds"]["total"] for tr in seen])["median"]
            bound = timing.spread([tr["bound_s"] for tr in seen])["median"]
            print(f"decisions among layouts seen before: {len(seen)}, median {decision:.2f} s "
                  f"vs median bound {bound:.2f} s; bound met at {sum(tr['within_bound'] for tr in seen)}")
        if not args.long_steps:
            return
        for tr in report["triggers"]:
            print(f"step {tr['step']}: " + "; ".join(
                f"{r['kind']} {'x'.join(str(v) for v in r['mesh'].values())}/{r['n_devices']}: try-run {r['measured_samples_per_s']:.0f}, "
                f"long {r['long_samples_per_s']:.0f} samples/s" for r in tr["rows"]))
        agree = sum(tr["agree"] for tr in report["triggers"])
        print(f"adopted == exhaustive pick at {agree} of {len(report['triggers'])} triggers")


if __name__ == "__main__":
    main()
