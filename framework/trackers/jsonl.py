"""RUN_DIR/metrics.jsonl: one JSON object per logged step, evaluation records among them (``eval_*`` keys, no
``loss``). Resume drops the steps after its checkpoint from it (replacing the file: a run restarted in its process,
after a step ran out of memory, reopens it); scripts/plot.py and scripts/report.py draw it."""
from __future__ import annotations

import json
import os

from framework.metrics import METRICS_FILE
from framework.trackers.base import Tracker


class JsonlTracker(Tracker):
    name = "jsonl"

    def start(self, config: dict) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._path = self.run_dir / METRICS_FILE
        self._file = open(self._path, "a", buffering=1)  # a line at a time: a killed run keeps its lines

    def log(self, record: dict) -> None:
        if os.fstat(self._file.fileno()).st_ino != os.stat(self._path).st_ino:  # replaced (metrics.drop_records_after)
            self._file.close()
            self._file = open(self._path, "a", buffering=1)
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: say which file (a failed write names none)
            raise OSError(e.errno, e.strerror, self._file.name) from None

    def finish(self, failed: bool) -> None:
        self._file.close()
