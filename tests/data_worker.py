"""A multi-process worker for tests/test_data.py (run through scripts/launch_local.py): reads the
global batches of a token store through BatchLoader + Prefetcher on a mesh over all processes'
devices, each process building only its rows, and process 0 saves the gathered batches."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework import distributed  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    distributed.add_arguments(p)
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--global-batch", type=int, required=True)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--positions", type=int, required=True)
    args = p.parse_args()
    distributed.initialize(distributed.args_from_namespace(args))
    with distributed.fail_fast():
        import jax
        import numpy as np
        from jax.experimental import multihost_utils
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        from framework.config import DataConfig
        from framework.data import BatchLoader, Prefetcher
        from framework.data.tokens import TokenSource

        mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
        sharding = NamedSharding(mesh, P(None, ("data", "fsdp")))  # the trainer's batch layout
        source = TokenSource(DataConfig(source="tokens", path=args.store, seed=args.seed), args.seq_len, 1 << 16)
        loader = BatchLoader(source, args.global_batch, args.grad_accum, sharding)
        prefetch = Prefetcher(loader, args.start, depth=2)
        batches = [multihost_utils.process_allgather(prefetch.next()[1]["tokens"], tiled=True) for _ in range(args.positions)]
        prefetch.close()
        print(f"process {jax.process_index()} built rows {loader.micro_rows.start}:{loader.micro_rows.stop} "
              f"of {loader.global_shape[1]}", flush=True)
        if jax.process_index() == 0:
            np.save(args.out, np.stack(batches))
        distributed.shutdown()


if __name__ == "__main__":
    main()
