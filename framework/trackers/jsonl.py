"""RUN_DIR/metrics.jsonl: one JSON object per logged step, evaluation records among them (``eval_*`` keys, no
``loss``). Resume drops the steps after its checkpoint from it; scripts/plot.py and scripts/report.py draw it."""
from __future__ import annotations

import json

from framework.metrics import METRICS_FILE
from framework.trackers.base import Tracker


class JsonlTracker(Tracker):
    name = "jsonl"

    def start(self, config: dict) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / METRICS_FILE, "a", buffering=1)  # a line at a time: a killed run keeps its lines

    def log(self, record: dict) -> None:
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: say which file (a failed write names none)
            raise OSError(e.errno, e.strerror, self._file.name) from None

    def finish(self, failed: bool) -> None:
        self._file.close()
