"""Checkpoint round trips across process counts, for tests/test_distributed_checkpoint.py.

Run through scripts/launch_local.py (any number of processes). ``save`` trains the tiny LM a
few steps and checkpoints it; ``restore`` reads the newest checkpoint into this run's mesh.
Both write the full state, gathered from all processes, to ``--dump`` (an .npz, by process 0).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework import distributed  # noqa: E402


def dump(state, path: str) -> None:
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    arrays = {jax.tree_util.keystr(k): np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in flat}
    if jax.process_index() == 0:
        np.savez(path, **arrays)


def main() -> None:
    p = argparse.ArgumentParser()
    distributed.add_arguments(p)
    p.add_argument("mode", choices=["save", "restore"])
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--dump", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args()
    distributed.initialize(distributed.args_from_namespace(args))
    with distributed.fail_fast():
        from framework.checkpoint import Checkpointer, abstract_target
        from framework.trainer import Trainer
        from tests.helpers import tiny_config

        trainer = Trainer(tiny_config(*args.overrides, steps=args.steps))
        ckpt = Checkpointer(args.ckpt_dir, async_save=False)
        if args.mode == "save":
            trainer.fit()
            ckpt.save(args.steps, trainer.state)
            state = trainer.state
        else:
            state = ckpt.restore("latest", abstract_target(trainer.abstract.shapes, trainer.state_shardings))
        ckpt.close()
        dump(state, args.dump)
        print(f"{args.mode} ok: step {int(state.step)} data_pos {int(state.data_pos)}", flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main()
