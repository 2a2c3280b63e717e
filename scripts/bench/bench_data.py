#!/usr/bin/env python
"""Token store at scale: write a >= 2 GB store, open it, read training windows; prints one JSON object.

python scripts/bench/bench_data.py [--gb 2.2] [--dir /tmp] [--batches 300] [--keep] [key=value ...]

The store (random ids below GPT-2's vocab 50257, uint16, an EOS every ~1000 tokens, 512 MiB
shards) goes to a fresh directory under --dir and is deleted afterwards unless --keep. The
read side runs in a fresh process (``--read DIR``), so its memory is the reader's alone:
  open_s           TokenSource for the train split: metadata, tokenizer hash, shard stats
  rss_kb           VmRSS / RssAnon / RssFile from /proc/self/status (kB): before and after open, after
                   the two rows passes (2 x --batches batches of windows spread over the whole store),
                   and after the loader pass (which adds jax's device buffers)
  rows_tokens_per_s       source.rows() for the whole global batch, one thread (cold: the
                   shards' pages evicted from the page cache with posix_fadvise first; warm: again)
  loader_tokens_per_s     Prefetcher.next() on one device: grain prefetch threads + the host->device copy,
                   over the warm pass's positions
Rates are per wall second and per CPU second of the reading process (all its threads): on a
shared machine (see load_average) the CPU-second rate is what the loader costs.
Tokens are counted as the training step counts them, global_batch * seq_len per batch, at
``configs/gpt2_124m.yaml``'s batch (32 x 1024) unless overridden. ``step_tokens_per_s_bound``
is what that step could consume on one H100 at 100% MFU (model FLOPs per token from
framework/metrics.py, 989 TFLOP/s bf16 dense): an upper bound no real run reaches, so
``loader_over_step_bound`` understates the real margin.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timing  # first: puts scripts/ on sys.path for _cli
import _cli

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "gpt2_124m.yaml")
VOCAB, DOC_TOKENS = 50257, 1000
CHUNK = 1 << 26  # tokens generated and written per piece


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=2.2, help="store size in GB (default 2.2)")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the store is written (default the temp dir)")
    p.add_argument("--batches", type=int, default=300, help="batches read per measurement (default 300)")
    p.add_argument("--keep", action="store_true", help="keep the store")
    p.add_argument("--read", default=None, metavar="STORE", help=argparse.SUPPRESS)  # the read side, in its own process
    p.add_argument("overrides", nargs="*", help="key=value overrides of configs/gpt2_124m.yaml (train.global_batch=...)")
    return p.parse_intermixed_args(argv)


def proc_status() -> dict:
    fields = ("VmRSS", "RssAnon", "RssFile")
    lines = Path("/proc/self/status").read_text().splitlines()
    return {k: int(line.split()[1]) for line in lines for k in fields if line.startswith(k + ":")}


def write_store(out: Path, gb: float) -> dict:
    import numpy as np
    from tokenizers import Tokenizer, models

    from framework.data.store import StoreWriter

    words = {f"w{i}": i for i in range(VOCAB - 1)}
    tokenizer = Tokenizer(models.WordLevel({**words, "<|endoftext|>": VOCAB - 1}, unk_token="w0"))
    writer = StoreWriter(out, tokenizer.to_str(), VOCAB, VOCAB - 1)
    total = int(gb * 1e9) // 2
    rng = np.random.default_rng(0)
    with timing.timed() as written:
        for start in range(0, total, CHUNK):
            tokens = rng.integers(0, VOCAB - 1, size=min(CHUNK, total - start), dtype=np.uint16)
            tokens[DOC_TOKENS - 1::DOC_TOKENS] = VOCAB - 1
            writer.write("train", tokens, documents=len(tokens) // DOC_TOKENS)
        writer.write("eval", rng.integers(0, VOCAB - 1, size=1 << 20, dtype=np.uint16))
        meta = writer.finish()
    seconds = written.seconds
    size = sum(f.stat().st_size for f in out.glob("*.bin"))
    return {"store_bytes": size, "train_tokens": meta["tokens"]["train"], "shards": len(meta["shards"]["train"]),
            "write_s": round(seconds, 2), "write_mb_per_s": round(size / seconds / 1e6, 1)}


def read_side(store: str, overrides: list[str], batches: int) -> dict:
    """Runs in a fresh process: open, RSS, rows and loader throughput."""
    _cli.emulate_cpu_devices(1)
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from framework import metrics
    from framework.config import load_config
    from framework.data import BatchLoader, Prefetcher, make_source
    from framework.state import abstract_state

    cfg = load_config(CONFIG, ["data.source=tokens", f"data.path={store}", *overrides])
    t, before = cfg.train, proc_status()
    with timing.timed() as opened:
        source = make_source(cfg.data, t, cfg.model.vocab_size)
    after_open = proc_status()
    rows = np.arange(t.global_batch)
    windows = len(source.windows)

    def evict() -> None:
        for fd in source.store.fds:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    tokens = batches * t.global_batch * t.seq_len

    def rates(run) -> dict:
        """Tokens per wall second, and per CPU second of this process (all threads): the machine is shared."""
        cpu = time.process_time()
        with timing.timed() as wall:
            run()
        return {"wall": round(tokens / wall.seconds), "cpu": round(tokens / (time.process_time() - cpu))}

    def read_rows(first: int) -> None:
        for p in range(first, first + batches):
            source.rows(p, rows, t.global_batch)

    evict()
    cold = rates(lambda: read_rows(0))
    warm = rates(lambda: read_rows(0))
    after_rows = proc_status()
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    loader = BatchLoader(source, t.global_batch, t.grad_accum, NamedSharding(mesh, P(None, ("data", "fsdp"))))
    prefetch = Prefetcher(loader, 0, cfg.data.prefetch)  # the warm pass's positions: its pages are cached
    jax.block_until_ready(prefetch.next()[1])  # the pool's start is no batch's time
    loader_rate = rates(lambda: [jax.block_until_ready(prefetch.next()[1]) for _ in range(batches)])
    prefetch.close()
    after_read = proc_status()

    param_count = abstract_state(cfg, {"data": 1, "fsdp": 1, "tensor": 1}).param_count
    flops = metrics.model_flops(cfg, param_count)
    bound = metrics.peak_flops("H100") / (flops.total / flops.tokens)
    return {
        "config": "configs/gpt2_124m.yaml", "global_batch": t.global_batch, "seq_len": t.seq_len,
        "prefetch": cfg.data.prefetch, "windows": windows, "open_s": round(opened.seconds, 4),
        "rss_kb": {"before_open": before, "after_open": after_open, "after_rows": after_rows, "after_loader": after_read},
        "windows_read": 3 * batches * t.global_batch,
        "rows_tokens_per_s": {"cold": cold, "warm": warm}, "loader_tokens_per_s": loader_rate,
        "step_tokens_per_s_bound": round(bound), "step_bound_basis": "GPT-2 124M on one H100 SXM at 100% MFU "
        f"({flops.total / flops.tokens / 1e6:.0f} MFLOP/token, 989 TFLOP/s bf16 dense)",
        "loader_over_step_bound": {k: round(v / bound, 1) for k, v in loader_rate.items()},
        "load_average": os.getloadavg(),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    with _cli.user_errors():
        from framework.config import ConfigError

        if args.read:
            timing.print_json(read_side(args.read, args.overrides, args.batches))
            return
        free = shutil.disk_usage(args.dir).free
        if free < args.gb * 1e9 * 1.5:
            raise ConfigError(f"--dir {args.dir}: {free / 1e9:.1f} GB free, the benchmark needs {args.gb * 1.5:.1f} GB")
        out = Path(tempfile.mkdtemp(prefix="bench_data_", dir=args.dir)) / "store"
        try:
            report = {"dir": str(out.parent), **write_store(out, args.gb)}
            r = subprocess.run([sys.executable, __file__, "--read", str(out), "--batches", str(args.batches),
                                *args.overrides], capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"read side failed:\n{r.stderr[-3000:]}")
            report.update(json.loads(r.stdout.splitlines()[-1]))
        finally:
            if not args.keep:
                shutil.rmtree(out.parent)
    timing.print_json(report, indent=1)


if __name__ == "__main__":
    main()
