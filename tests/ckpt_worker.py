"""Checkpoint round trips across process counts, for tests/test_distributed_checkpoint.py.

Run through scripts/launch_local.py (any number of processes). ``save`` trains the tiny LM a
few steps and checkpoints it; ``restore`` reads the newest checkpoint into this run's mesh.
Both write the full state, gathered from all processes, to ``--dump`` (an .npz, by process 0).
``rotate`` saves ``--steps`` small checkpoints keeping two, damages the newest and resumes,
with every process but the first arriving late at each pruning and at the resume: the
processes must still agree on what is deleted and set aside.
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


def rotate(ckpt_dir: str, steps: int) -> None:
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from framework.checkpoint import MANIFEST, Checkpointer, barrier

    class LatePeers(Checkpointer):
        def _prune(self):
            if jax.process_index() != 0:
                time.sleep(1.0)  # the primary has long listed (and deleted) by now
            super()._prune()

    sharding = jax.sharding.NamedSharding(jax.make_mesh((jax.device_count(),), ("x",)), jax.P("x"))
    target = {"w": jax.ShapeDtypeStruct((jax.device_count() * 2,), jnp.float32, sharding=sharding)}
    ckpt = LatePeers(ckpt_dir, keep=2, async_save=True)
    for step in range(1, steps + 1):
        values = np.arange(target["w"].shape[0], dtype=np.float32) * step
        ckpt.save(step, {"w": jax.make_array_from_callback(values.shape, sharding, lambda i: values[i])})
    ckpt.close()

    newest = Path(ckpt_dir) / str(steps)
    if jax.process_index() == 0:
        victim = max((f for f in newest.rglob("*") if f.is_file() and f.name != MANIFEST), key=lambda f: f.stat().st_size)
        victim.write_bytes(victim.read_bytes()[:-1])
    barrier("damaged")
    reader = Checkpointer(ckpt_dir, keep=2)
    if jax.process_index() != 0:
        time.sleep(1.0)  # the primary has set the damaged step aside by now
    restored = reader.restore("latest", target)
    values = np.arange(target["w"].shape[0], dtype=np.float32) * (steps - 1)
    local = np.concatenate([np.asarray(s.data) for s in restored["w"].addressable_shards])
    expected = np.concatenate([values[s.index] for s in restored["w"].addressable_shards])
    assert np.array_equal(local, expected), (local, expected)
    reader.close()
    print(f"rotate ok: resumed from step {reader.latest_good_step()}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    distributed.add_arguments(p)
    p.add_argument("mode", choices=["save", "restore", "rotate"])
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--dump")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args()
    distributed.initialize(distributed.args_from_namespace(args))
    with distributed.fail_fast():
        if args.mode == "rotate":
            rotate(args.ckpt_dir, args.steps)
            distributed.shutdown()
            return
        from framework.checkpoint import Checkpointer, abstract_target
        from framework.train import Trainer
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
