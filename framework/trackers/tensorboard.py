"""RUN_DIR/tensorboard: TensorBoard event files (tensorboardX, no TensorFlow): ``train/*`` and ``eval/*`` scalars per
logged step, ``goodput/*`` at the end of the run, ``tryrun/*`` at each decision, the resolved config as text."""
from __future__ import annotations

import yaml

from framework.trackers.base import Tracker, scalars


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def start(self, config: dict) -> None:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        text = yaml.safe_dump(config, sort_keys=False)
        self._tb.add_text("config", "    " + text.replace("\n", "\n    "))  # indented: markdown shows it verbatim

    def log(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self._tb.add_scalar(tag, value, record["step"])

    def log_goodput(self, report: dict, step: int) -> None:
        for key, value in report.items():
            self._tb.add_scalar(f"goodput/{key}", value, step)

    def log_tryrun(self, decision: dict) -> None:
        for tag, value in tryrun_scalars(decision).items():
            self._tb.add_scalar(tag, value, decision["step"])

    def finish(self, failed: bool) -> None:
        self._tb.close()


def tryrun_scalars(decision: dict) -> dict[str, float]:
    """A decision's numbers: the baseline's and the chosen layout's samples/s, whether it was adopted, how many tried."""
    return {"tryrun/baseline_samples_per_s": decision["baseline"]["samples_per_s"],
            "tryrun/chosen_samples_per_s": decision["chosen"]["samples_per_s"],
            "tryrun/adopted": float(decision["adopted"]), "tryrun/candidates": float(len(decision["candidates"]))}
