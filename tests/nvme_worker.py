"""A real process for tests/test_nvme.py: what only a process of its own can show.

``rss``: train one step with the optimizer state on nvme, then measure the process's peak
resident memory (VmHWM, reset through /proc/self/clear_refs) during the next update; prints JSON.
``crash``: train with checkpoints and SIGKILL the process in the middle of the update of
``--crash-step`` (after some chunks of it are written): what a crash leaves on disk.
Config overrides follow the flags (key=value).
"""
import argparse
import gc
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def status_kib(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def rss(cfg) -> None:
    import jax
    import numpy as np

    from framework.train import Trainer

    trainer = Trainer(cfg)
    trainer.fit(1)  # compiled, files made, one update done: what every later step starts from
    outputs = trainer.compiled_step(trainer.state, trainer.loader.batch(1))
    jax.block_until_ready(outputs)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current resident set
    before = status_kib("VmRSS")
    state, _ = trainer.nvme.apply(*outputs)
    jax.block_until_ready(state)
    peak = status_kib("VmHWM")
    leaves = jax.tree.leaves(state.params)
    print(json.dumps({"rss_before": before * 1024, "peak": peak * 1024, "state_bytes": trainer.nvme.disk_bytes,
                      "largest_leaf_bytes": max(x.nbytes for x in leaves), "chunk_bytes": cfg.memory.nvme_chunk_bytes,
                      "finite": bool(all(np.isfinite(np.asarray(x)).all() for x in leaves))}))


def crash(cfg, run_dir: str, crash_step: int) -> None:
    from framework import memory
    from framework.train import Trainer

    class Crashing(memory.NvmeOptimizer):
        writes = 0

        def update(self, params, grads, step):
            self.crashing = step == crash_step
            return super().update(params, grads, step)

        def _write(self, item, bufs):
            super()._write(item, bufs)
            if self.crashing:
                self.writes += 1
                if self.writes == 3:
                    os.kill(os.getpid(), signal.SIGKILL)

    memory.NvmeOptimizer = Crashing  # the Trainer builds its NVMe tier from this name
    Trainer(cfg, run_dir=run_dir).fit()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["rss", "crash"])
    p.add_argument("--run-dir")
    p.add_argument("--crash-step", type=int, default=0)
    args, overrides = p.parse_known_args()
    from framework.config import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny_lm.yaml", overrides)
    rss(config) if args.mode == "rss" else crash(config, args.run_dir, args.crash_step)
