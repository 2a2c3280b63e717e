"""A small multi-process worker for tests/test_distributed.py (run through scripts/launch_local.py).

Joins the others with framework.distributed, builds a mesh over all global devices, feeds
process-local rows into one global array and prints the result of collectives on it.
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework import distributed  # noqa: E402
from framework.config import ConfigError  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    distributed.add_arguments(p)
    p.add_argument("--fail-process", type=int, default=None, help="this process exits with --fail-code after the collective")
    p.add_argument("--fail-code", type=int, default=3)
    p.add_argument("--raise-process", type=int, default=None, help="this process raises after the collective")
    p.add_argument("--then-sleep", type=float, default=0.0, help="seconds to stay alive after the collective")
    p.add_argument("--user-error", default=None, help="every process prints 'error: TEXT' after the collective; "
                   "process 0 then exits with code 2 (as scripts/_cli.py's user errors do), the others stay")
    args = p.parse_args()
    try:
        joined = distributed.initialize(distributed.args_from_namespace(args))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    with distributed.fail_fast():
        collectives(args, joined)


def collectives(args, joined: bool) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    pid, n = jax.process_index(), jax.process_count()
    print(f"joined={joined} process {pid} of {n} pid {os.getpid()} devices {jax.device_count()} "
          f"local {jax.local_device_count()}", flush=True)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows_per_device, d = 2, jax.device_count()
    global_shape = (rows_per_device * d, 3)
    # Row r holds r * 10 + column: each process builds only the rows its devices hold.
    local_rows = rows_per_device * jax.local_device_count()
    first = pid * local_rows
    local = (np.arange(first, first + local_rows)[:, None] * 10 + np.arange(3)[None, :]).astype(np.float32)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local, global_shape)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    per_device = jax.jit(jax.shard_map(lambda b: jax.lax.psum(jnp.sum(b), "data"),
                                       mesh=mesh, in_specs=P("data"), out_specs=P()))(x)
    print(f"sum {float(total):.1f} psum {float(per_device):.1f}", flush=True)
    if pid == args.fail_process:
        sys.exit(args.fail_code)
    if pid == args.raise_process:
        raise RuntimeError("deliberate failure")
    if args.user_error is not None:
        print(f"error: {args.user_error}", file=sys.stderr, flush=True)
        if pid == 0:
            os._exit(2)
    time.sleep(args.then_sleep)
    distributed.shutdown()
    print("shutdown ok", flush=True)


if __name__ == "__main__":
    main()
