#!/usr/bin/env python
"""Time the NVMe tier's streamed optimizer update against the disk's own bandwidth; prints one JSON object.

python scripts/bench/bench_nvme.py [--mb 256] [--chunk-mb 4] [--repeats 3] [--cpu-devices 8] [--dir DIR] [--master]

An AdamW state of --mb MB (float32 matrices 1024x1024 sharded fsdp over the devices, mu and nu
in files under --dir, default a fresh temporary dir) goes through ``NvmeOptimizer.update``. With
--master the float32 master parameters are a third file (memory.params=nvme: 12 bytes per
parameter) and the device holds bfloat16 parameters.
Before each timed update the files are flushed (fsync) and dropped from the page cache
(posix_fadvise DONTNEED), and the time includes an fsync after it, so each byte is read from and
written to the disk. The disk is measured in the same run the same way: a file of the same size
written sequentially in chunks of --chunk-mb, then overwritten (timed, with fsync: the update
overwrites its files), dropped from the cache and read back.
  update_s                 median seconds per update (cold reads, writes flushed)
  update_s_per_gb          update_s per GB (1e9 B) of state in the files
  disk_read_gb_s, disk_write_gb_s   sequential bandwidth measured here
  disk_bound_s             state/read + state/write: the update if it did nothing but its I/O
  ratio                    update_s / disk_bound_s (1.0: as fast as the disk allows)
  cached_update_s          median update with the files in the page cache and no fsync: arithmetic
                           and memory copies, what the I/O overlaps with
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import timing  # first: puts scripts/ on sys.path for _cli
import _cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=256.0, help="optimizer state size in MB (default 256)")
    p.add_argument("--chunk-mb", type=float, default=4.0, help="memory.nvme_chunk_bytes in MiB (default 4, as the config)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported (default 3)")
    p.add_argument("--cpu-devices", type=int, default=8, help="devices to emulate on the CPU platform (default 8)")
    p.add_argument("--dir", default=None, help="directory on the disk to measure (default: a fresh temporary dir)")
    p.add_argument("--master", action="store_true", help="memory.params=nvme: the float32 master copy in a third file")
    return p.parse_intermixed_args(argv)


def flush(paths, drop: bool) -> None:
    """fsync each file; with ``drop`` also evict its pages from the page cache (no root needed for clean pages)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            if drop:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_bandwidth(directory: Path, nbytes: int, chunk: int) -> tuple[float, float]:
    """(read, write) sequential bandwidth in bytes/s of a file of ``nbytes`` written and read in ``chunk`` pieces."""
    import numpy as np

    path = directory / "bandwidth.bin"
    block = np.random.default_rng(0).integers(0, 255, chunk, dtype=np.uint8).tobytes()
    for mode in ("wb", "r+b"):  # timed: the second pass, overwriting allocated blocks as the update does
        with timing.timed() as write, open(path, mode, buffering=0) as f:
            for _ in range(nbytes // chunk):
                f.write(block)
            os.fsync(f.fileno())
    flush([path], drop=True)
    buf = bytearray(chunk)
    with timing.timed() as read, open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    path.unlink()
    return nbytes / read.seconds, nbytes / write.seconds


def main(argv=None) -> None:
    args = parse_args(argv)
    _cli.emulate_cpu_devices(args.cpu_devices)
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from framework import memory, sharding
    from framework.config import load_config
    from framework.optimizer import build_optimizer
    from framework.state import TrainState

    side = 1024
    files = 3 if args.master else 2  # (master,) mu, nu: float32
    n = max(round(args.mb * 1e6 / (side * side * 4 * files)), 1)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        chunk = int(args.chunk_mb * 2**20)
        cfg = load_config(None, ["memory.opt_state=nvme", f"memory.nvme_dir={directory}",
                                 f"memory.nvme_chunk_bytes={chunk}", "train.steps=100"]
                          + (["memory.params=nvme", "train.dtype=bfloat16"] if args.master else []))
        mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
        specs = {f"w{i}": P("fsdp", None) for i in range(n)}
        shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
        shapes = {k: jax.ShapeDtypeStruct((side, side), jax.numpy.float32) for k in specs}
        tx = build_optimizer(cfg.optimizer, cfg.train.steps)
        opt_shapes = jax.eval_shape(tx.init, shapes)
        store = memory.NvmeOptimizer(cfg, mesh, shapes, shardings, opt_shapes,
                                     sharding.opt_state_specs(tx, opt_shapes, specs, shapes))
        make = jax.jit(lambda seed: {k: jax.random.normal(jax.random.key(seed + i), (side, side))
                                     for i, k in enumerate(specs)}, out_shardings=shardings)
        params, step = make(0), 0
        if args.master:  # the master file holds the float32 params, the device their bfloat16 rounding
            params = store.init(TrainState(jax.numpy.zeros(()), params, None, None, None)).params
        else:
            store.init()

        def update(cold: bool) -> float:
            nonlocal params, step
            grads = jax.block_until_ready(make(step + 1000))
            if cold:
                flush(store.files.values(), drop=True)
            with timing.timed() as t:
                params = jax.block_until_ready(store.update(params, grads, step))
                if cold:
                    flush(store.files.values(), drop=False)
            step += 1
            return t.seconds

        update(cold=True)  # every chunk written once: the files are real blocks on disk, not sparse holes
        cold = timing.spread([update(cold=True) for _ in range(args.repeats)])["median"]
        cached = timing.spread([update(cold=False) for _ in range(args.repeats)])["median"]
        read_bw, write_bw = disk_bandwidth(directory, store.disk_bytes, chunk)
        store.close()
    state = store.disk_bytes
    bound = state / read_bw + state / write_bw
    timing.print_json({
        "state_bytes": state, "chunk_bytes": chunk, "devices": len(jax.devices()), "repeats": args.repeats,
        "update_s": round(cold, 3), "update_s_per_gb": round(cold / (state / 1e9), 3),
        "disk_read_gb_s": round(read_bw / 1e9, 3), "disk_write_gb_s": round(write_bw / 1e9, 3),
        "disk_bound_s": round(bound, 3), "ratio": round(cold / bound, 2), "cached_update_s": round(cached, 3),
    })


if __name__ == "__main__":
    with _cli.user_errors():
        main()
