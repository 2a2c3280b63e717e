"""Step metrics out of the loop: metrics.jsonl, TensorBoard event files, a progress bar.

Only process 0 writes; other processes get writers that do nothing, so the training loop
never branches on the process index.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import jax


class MetricsWriter:
    """Appends one JSON object per logged step to RUN_DIR/metrics.jsonl (and TensorBoard scalars)."""

    def __init__(self, run_dir: str | Path | None, tensorboard: bool = True):
        self.enabled = run_dir is not None and jax.process_index() == 0
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb:
            self._tb.close()


def drop_records_after(run_dir: str | Path | None, step: int) -> None:
    """On resume from ``step``: forget logged steps after it, which are about to be trained again."""
    path = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None
    if path is None or not path.is_file() or jax.process_index() != 0:
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):  # a line cut short by a killed process
            continue
    path.write_text("".join(kept))


class ProgressBar:
    """tqdm bar with loss and throughput; silent on processes other than 0 or when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self._bar = None
        if enabled and jax.process_index() == 0:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, record: dict) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
