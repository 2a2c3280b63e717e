#!/usr/bin/env python
"""Train from a config file: python scripts/train.py --config configs/tiny_lm.yaml [key=value ...]"""
from __future__ import annotations

import argparse
import sys

import _cli
from framework import distributed  # importing jax is fine here: XLA_FLAGS is read when a backend starts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--run-dir", default=None, help="where metrics.jsonl, config.yaml and checkpoints go (default runs/<config name>)")
    p.add_argument("--cpu-devices", type=int, default=8, help="devices to emulate on the CPU platform (default 8)")
    p.add_argument("--profile", metavar="START:STOP", default=None,
                   help="jax.profiler trace of steps START..STOP (as metrics.jsonl numbers them) in RUN_DIR/profile "
                        "(sets logging.profile_steps)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=50 mesh.fsdp=-1")
    distributed.add_arguments(p)
    return p.parse_intermixed_args(argv)


def profile_override(text: str | None) -> list[str]:
    """``--profile 5:8`` as the override ``logging.profile_steps=[5, 8]`` (checked against the run like the key)."""
    if text is None:
        return []
    from framework.config import ConfigError

    start, sep, stop = text.partition(":")
    if not (sep and start.strip().isdigit() and stop.strip().isdigit()):
        raise ConfigError(f"--profile {text!r}: expected START:STOP, two step numbers as metrics.jsonl numbers them "
                          "(e.g. --profile 5:8)")
    return [f"logging.profile_steps=[{int(start)}, {int(stop)}]"]


def main(argv=None) -> None:
    args = parse_args(argv)
    _cli.emulate_cpu_devices(args.cpu_devices)
    # fail_fast outermost: in a multi-process run any error (user errors too) ends this process at once.
    with distributed.fail_fast(), _cli.user_errors():
        from pathlib import Path

        import jax

        from framework import rundir
        from framework.config import load_config, warnings
        from framework.goodput import GoodputClock, process_start_time
        from framework.preemption import Preempted
        from framework.state import check_run
        from framework.train import Trainer

        distributed.initialize(distributed.args_from_namespace(args))  # before anything touches a backend
        cfg = load_config(args.config, [*args.overrides, *profile_override(args.profile)])
        check_run(cfg)  # before the run dir is touched, and before an elastic start could try other layouts instead
        run_dir = args.run_dir or str(Path("runs") / Path(args.config).stem)
        primary = jax.process_index() == 0
        for line in warnings(cfg) if primary else ():
            print(f"warning: {line}", file=sys.stderr, flush=True)
        with rundir.hold(run_dir):  # the run dir's lock: taken before anything is written there
            if cfg.elastic.enabled:  # elastic remeshing (framework/tryrun/): start on the devices there are
                from framework.tryrun import TryRunController, elastic_trainer

                trainer = elastic_trainer(Trainer, cfg, run_dir)
            else:
                trainer = Trainer(cfg, run_dir=run_dir)
            trainer.goodput = GoodputClock(origin=process_start_time())  # wall time counts from the process start
            try:  # the try-run controller owns an elastic run's loop and calls trainer.fit per segment
                records = TryRunController(trainer).fit() if cfg.elastic.enabled else trainer.fit()
            except Preempted as e:  # SIGTERM/SIGINT: the checkpoint is saved and the metrics are written
                distributed.shutdown()  # every process stopped at the same step: leave together
                if primary:
                    print(trainer.goodput_line, flush=True)
                    print(e, file=sys.stderr, flush=True)
                sys.exit(e.exit_code)
        distributed.shutdown()
        if primary and trainer.goodput_line:
            print(trainer.goodput_line, flush=True)
        if records and primary:
            last = records[-1]
            print(f"done: step {last['step']} loss {last['loss']:.4f} on mesh {last['mesh']} "
                  f"(compile {trainer.compile_seconds:.1f}s); metrics in {run_dir}/metrics.jsonl")


if __name__ == "__main__":
    main()
