"""The tracker interface and the fan-out: what a run reports goes to every tracker through ``Trackers``."""
from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import jax

from framework.config import LoggingConfig

# logging.trackers name -> (module, class); the config's TRACKERS lists the same names
BUILT_IN = {"jsonl": ("framework.trackers.jsonl", "JsonlTracker"),
            "tensorboard": ("framework.trackers.tensorboard", "TensorBoardTracker"),
            "wandb": ("framework.trackers.wandb", "WandbTracker")}
INSTALL_HINT = {"wandb": "pip install -e '.[wandb]'", "tensorboard": "pip install tensorboardX"}


def scalars(record: dict) -> dict[str, float]:
    """A record's finite numbers as tags: ``train/<key>``; an evaluation's ``eval_<key>`` as ``eval/<key>``."""
    out = {}
    for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"] = value
    return out


class Tracker:
    """One destination. Subclass and add an instance with ``trainer.trackers.add`` (before ``fit``) for research."""

    name = "tracker"

    def __init__(self, run_dir: Path, cfg: LoggingConfig):
        self.run_dir, self.cfg = run_dir, cfg

    def start(self, config: dict) -> None:
        """The run begins with the resolved ``config`` (a plain dict); raising here leaves this tracker out."""

    def log(self, record: dict) -> None:
        """A step's record (``step``, ``loss``, timings, memory, ``loss_fn``'s metrics) or an evaluation's
        (``step`` and ``eval_*`` keys): what metrics.jsonl gets."""

    def log_goodput(self, report: dict, step: int) -> None:
        """Where the run's wall time went (framework/goodput.py), at the end of the run, at ``step``."""

    def log_tryrun(self, decision: dict) -> None:
        """A try-run decision, as RUN_DIR/tryrun.jsonl holds it (framework/tryrun)."""

    def finish(self, failed: bool) -> None:
        """The run ended (``failed``: by an error); flush and close."""


class Trackers:
    """The trackers of one run: started on process 0 when the run begins (``Trainer.session``), finished when it ends."""

    def __init__(self, cfg: LoggingConfig, run_dir: str | Path | None):
        self.cfg, self.run_dir = cfg, Path(run_dir) if run_dir is not None else None
        self._wanted: list[str | Tracker] = [n for n in cfg.trackers if n != "tensorboard" or cfg.tensorboard]
        self.active: list[Tracker] = []
        self.started = False

    def add(self, tracker: Tracker) -> None:
        """One more tracker (research: your own destination), started with the others."""
        if self.started:
            raise RuntimeError("add trackers before the run starts (Trainer.fit)")
        self._wanted.append(tracker)

    def start(self, config: dict) -> None:
        """Start every tracker (process 0, with a run dir); one that cannot start is a warning line, left out."""
        if self.started:
            return
        self.started = True
        if self.run_dir is None or jax.process_index() != 0:
            return
        for wanted in self._wanted:
            name = wanted if isinstance(wanted, str) else wanted.name
            try:
                tracker = wanted if isinstance(wanted, Tracker) else _built_in(name)(self.run_dir, self.cfg)
                tracker.start(config)
            except Exception as e:  # noqa: BLE001 (whatever stops it, the run goes on without it)
                text = " ".join(str(e).split())[:300] or type(e).__name__
                hint = f"; install it with {INSTALL_HINT[name]}" if isinstance(e, ImportError) and name in INSTALL_HINT else ""
                print(f"warning: tracker {name} could not start ({type(e).__name__}: {text}{hint}); "
                      "the run goes on without it", file=sys.stderr, flush=True)
                continue
            self.active.append(tracker)

    def log(self, record: dict) -> None:
        for tracker in self.active:
            tracker.log(record)

    def log_goodput(self, report: dict, step: int) -> None:
        for tracker in self.active:
            tracker.log_goodput(report, step)

    def log_tryrun(self, decision: dict) -> None:
        for tracker in self.active:
            tracker.log_tryrun(decision)

    def finish(self, failed: bool = False) -> None:
        """Every tracker finishes, even when one of them fails to (the first error is raised after)."""
        active, self.active, self.started = self.active, [], False
        errors = []
        for tracker in active:
            try:
                tracker.finish(failed)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        if errors:
            raise errors[0]


def _built_in(name: str) -> type[Tracker]:
    module, cls = BUILT_IN[name]
    return getattr(importlib.import_module(module), cls)
