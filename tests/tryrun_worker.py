"""An elastic run in several processes whose try-run scores differ by process, for tests/test_tryrun.py.

Run through scripts/launch_local.py. Scores are fixed, not timed: process 0 scores horizontal
layouts 3x the rest, the others vertical ones, so each would adopt a different mesh on its own;
the run only finishes if every process follows process 0's decisions. Each process prints the
meshes it chose and its losses.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework import distributed  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    distributed.add_arguments(p)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args()
    distributed.initialize(distributed.args_from_namespace(args))
    with distributed.fail_fast():
        import jax

        from framework.train import Trainer
        from framework.tryrun import TryRunController
        from tests.helpers import tiny_config

        favoured = "horizontal" if jax.process_index() == 0 else "vertical"

        class ScoreByProcess(TryRunController):
            def score(self, trial):
                return 300.0 if trial.layout.kind == favoured else 100.0

        trainer = Trainer(tiny_config(*args.overrides, steps=args.steps), run_dir=args.run_dir)
        controller = ScoreByProcess(trainer)
        records = controller.fit(args.steps)
        print("result " + json.dumps({"losses": [r["loss"] for r in records], "meshes": [r["mesh"] for r in records],
                                      "chosen": [d["chosen"]["mesh"] for d in controller.decisions]}), flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main()
