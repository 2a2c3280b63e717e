"""Goodput: where a run's wall time went, and the share spent on steps that count.

Each part is timed where it happens (the loop's steps, compiles, checkpoint saves and restores,
evaluations, try-run decisions, waiting for devices); start-up is everything before the first
training loop begins that no other part took (imports, building the model, initialising the state). Steps trained again after a crash (their numbers
were logged by an earlier run and dropped on resume) are *replayed*, not productive. What no
part covers is reported as ``unaccounted_s``: it stays small when the timers cover the run.

``RUN_DIR/goodput.json`` holds every run of the directory (a restart appends one) and their sum.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import jax

from framework.fileio import atomic_write

PARTS = ("startup", "productive_steps", "compile", "checkpoint_save", "checkpoint_restore", "evaluation",
         "tryruns", "replayed_steps", "waiting_for_devices")


def process_start_time() -> float:
    """Wall-clock time (``time.time()``) when this process started, from /proc; now where there is none."""
    try:
        ticks = int(Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


class GoodputClock:
    """Seconds per part since ``origin`` (a ``time.time()``; default now)."""

    def __init__(self, origin: float | None = None):
        self.origin = time.time() if origin is None else origin
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.replay_until = 0  # steps up to this one were trained by an earlier run that crashed after them
        self.replayed_steps = 0  # how many of this run's steps were such steps
        self._started = False
        self._in_span = False

    def add(self, part: str, seconds: float) -> None:
        self.seconds[part] += seconds

    @contextmanager
    def span(self, part: str) -> Iterator[None]:
        """Time the block as ``part``; spans inside it count as the outer one (a try-run's compile is try-run time)."""
        if self._in_span:
            yield
            return
        self._in_span = True
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._in_span = False
            self.add(part, time.perf_counter() - t0)

    def step(self, step: int, seconds: float) -> None:
        """One training step (1-based number) that took ``seconds``."""
        replayed = step <= self.replay_until
        self.replayed_steps += replayed
        self.add("replayed_steps" if replayed else "productive_steps", seconds)

    def resumed(self, step: int, newest_logged: int) -> None:
        """Resumed from the checkpoint at ``step`` where an earlier run had logged up to ``newest_logged``: the steps
        between are trained again, counted as replayed (and said so in one line)."""
        self.replay_until = max(self.replay_until, newest_logged)
        if newest_logged > step:
            print(f"checkpoint: steps {step + 1}..{newest_logged} were trained before the restart: training them "
                  "again (goodput: replayed)", file=sys.stderr, flush=True)

    def loop_started(self) -> None:
        """The first training loop begins: what came before and no part took is start-up."""
        if not self._started:
            self._started = True
            self.add("startup", max(time.time() - self.origin - sum(self.seconds.values()), 0.0))

    @property
    def started(self) -> bool:
        """Whether a training loop ran (a run with nothing left to train writes no goodput)."""
        return self._started

    def report(self) -> dict:
        wall = time.time() - self.origin
        parts = {f"{p}_s": s for p, s in self.seconds.items()}
        return {"wall_s": wall, **parts, "unaccounted_s": wall - sum(self.seconds.values()),
                "goodput": self.seconds["productive_steps"] / wall if wall > 0 else 0.0,
                "replayed_steps": self.replayed_steps}


def write(run_dir: str | Path | None, report: dict) -> dict:
    """Append ``report`` to RUN_DIR/goodput.json (process 0); returns what the file holds: ``runs`` and their ``total``."""
    runs = [report]
    path = Path(run_dir) / "goodput.json" if run_dir is not None else None
    if path is not None and path.is_file():
        try:
            runs = json.loads(path.read_text())["runs"] + runs
        except (ValueError, KeyError, TypeError):  # cut short by a killed process: start the history again
            pass
    keys = [k for k in report if k.endswith("_s")]
    total = {k: sum(r.get(k, 0.0) for r in runs) for k in keys}
    total["goodput"] = total["productive_steps_s"] / total["wall_s"] if total["wall_s"] > 0 else 0.0
    total["replayed_steps"] = sum(r.get("replayed_steps", 0) for r in runs)
    if path is not None and jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({"runs": runs, "total": total}, indent=1))
    return {"runs": runs, "total": total}


def summary_line(report: dict, runs: int = 1) -> str:
    """``goodput: 81.2% of 40.3 s wall: steps 32.7 s, compile 3.1 s, ...`` (parts under 0.05 s left out)."""
    names = {"productive_steps": "steps", "checkpoint_save": "checkpoint save", "checkpoint_restore": "restore",
             "waiting_for_devices": "waiting for devices", "replayed_steps": "replayed steps", "tryruns": "try-runs"}
    parts = [f"{names.get(p, p)} {report[f'{p}_s']:.1f} s" for p in PARTS if report[f"{p}_s"] >= 0.05]
    over = f" over {runs} runs" if runs > 1 else ""
    return f"goodput: {report['goodput']:.1%} of {report['wall_s']:.1f} s wall{over}: " + ", ".join(parts)
