#!/usr/bin/env python
"""Time checkpoint save and restore of a ~100 MB sharded train state; prints one JSON object.

python scripts/bench/bench_checkpoint.py [--mb 100] [--repeats 5] [--cpu-devices 8] [--dir DIR]

The state is AdamW over float32 matrices (params + two moments, random values so that
compression cannot flatter the numbers), sharded over all devices on an fsdp axis.
Reported times are medians over the repeats:
  save_return_s   save() returning (arrays copied off the devices; training may go on)
  save_total_s    until the step is written by orbax and sealed with its CRC manifest
  seal_s          writing the manifest alone (size + CRC32 of every file)
  verify_s        checking a step against its manifest (done once before each restore)
  restore_s       fresh Checkpointer -> verify -> restore onto the same mesh and shardings
  restore_other_mesh_s   the same onto data=2,tensor=2 over half of the devices
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import timing  # first: puts scripts/ on sys.path for _cli
import _cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=100.0, help="state size in MB (default 100)")
    p.add_argument("--repeats", type=int, default=5, help="runs per measurement; the median is reported (default 5)")
    p.add_argument("--cpu-devices", type=int, default=8, help="devices to emulate on the CPU platform (default 8)")
    p.add_argument("--dir", default=None, help="where to write checkpoints (default: a fresh temporary dir)")
    return p.parse_intermixed_args(argv)


def build_state(mb: float, mesh):
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    side = 1024
    n_matrices = max(round(mb * 1e6 / (side * side * 4 * 3)), 1)  # params + mu + nu, float32
    sharded = NamedSharding(mesh, P("fsdp", None))
    keys = jax.random.split(jax.random.key(0), n_matrices)
    params = {f"w{i}": jax.device_put(jax.random.normal(k, (side, side)), sharded) for i, k in enumerate(keys)}
    tx = optax.adamw(1e-3)
    opt_state = jax.jit(tx.init)(params)
    grads = jax.tree.map(lambda x: x * 0.5 + 0.1, params)
    _, opt_state = jax.jit(tx.update)(grads, opt_state, params)
    state = {"step": jnp.asarray(1, jnp.int32), "params": params, "opt_state": opt_state}
    return jax.block_until_ready(state)


def main(argv=None) -> None:
    args = parse_args(argv)
    _cli.emulate_cpu_devices(args.cpu_devices)
    import jax
    import numpy as np
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

    from framework.checkpoint import Checkpointer, abstract_target, check_step_dir, write_manifest

    devices = jax.devices()
    mesh = Mesh(np.asarray(devices), ("fsdp",), axis_types=(AxisType.Auto,))
    half = devices[: max(len(devices) // 2, 1)]
    other = Mesh(np.asarray(half).reshape(-1, 2 if len(half) % 2 == 0 else 1), ("data", "tensor"),
                 axis_types=(AxisType.Auto,) * 2)
    state = build_state(args.mb, mesh)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    same_target = abstract_target(state, jax.tree.map(lambda x: x.sharding, state))
    other_target = abstract_target(
        state, jax.tree.map(lambda x: NamedSharding(other, P("tensor", "data") if x.ndim == 2 else P()), state)
    )

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    times: dict[str, list[float]] = {k: [] for k in
                                     ("save_return_s", "save_total_s", "seal_s", "verify_s", "restore_s", "restore_other_mesh_s")}
    try:
        for i in range(args.repeats):
            directory = root / f"run{i}"
            ck = Checkpointer(directory, keep=2, async_save=True)
            with timing.timed() as total:
                with timing.timed() as returned:
                    ck.save(1, state)
                ck.wait()
            times["save_return_s"].append(returned.seconds)
            times["save_total_s"].append(total.seconds)
            ck.close()

            with timing.timed() as seal:
                write_manifest(directory / "1")
            with timing.timed() as verify:
                problem = check_step_dir(directory / "1")
            assert problem is None, problem
            times["seal_s"].append(seal.seconds)
            times["verify_s"].append(verify.seconds)

            for key, target in (("restore_s", same_target), ("restore_other_mesh_s", other_target)):
                with timing.timed() as restore:
                    reader = Checkpointer(directory)
                    restored = jax.block_until_ready(reader.restore("latest", target))
                times[key].append(restore.seconds)
                reader.close()
                np.testing.assert_array_equal(np.asarray(restored["params"]["w0"]), np.asarray(state["params"]["w0"]))
            shutil.rmtree(directory)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    report = {
        "state_mb": round(nbytes / 1e6, 1),
        "devices": len(devices),
        "platform": devices[0].platform,
        "repeats": args.repeats,
        **{k: timing.spread(v, 3)["median"] for k, v in times.items()},
        "all_runs_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
    }
    timing.print_json(report)


if __name__ == "__main__":
    main()
