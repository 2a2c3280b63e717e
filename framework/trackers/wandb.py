"""Weights & Biases, the optional extra (``pip install -e '.[wandb]'``): the resolved config, every logged step and
evaluation (``train/*``, ``eval/*``), goodput (``goodput/*``, in the run's summary too) and each try-run decision
(``tryrun/*`` and a table of its candidates).

The run id is kept in RUN_DIR/wandb_run_id, so a restarted or resumed run continues the same wandb run; its local
files go to RUN_DIR/wandb. ``WANDB_MODE=offline`` (tests, machines without a network) writes only those; online
without an API key the tracker cannot start (one warning line) and the run goes on without it.
"""
from __future__ import annotations

import secrets

from framework.fileio import atomic_write
from framework.trackers.base import Tracker, scalars
from framework.trackers.tensorboard import tryrun_scalars

RUN_ID_FILE = "wandb_run_id"
CANDIDATE_COLUMNS = ("kind", "mesh", "n_devices", "grad_accum", "samples_per_s", "improvement", "compile_s",
                     "peak_bytes_per_device")


class WandbTracker(Tracker):
    name = "wandb"

    def start(self, config: dict) -> None:
        import wandb

        self._wandb = wandb
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=self.cfg.wandb_project, entity=self.cfg.wandb_entity or None,
                                  name=self.run_dir.name, id=self._run_id(), resume="allow", dir=str(self.run_dir),
                                  config=config, settings=wandb.Settings(console="off", quiet=True))
        except Exception:
            wandb.teardown()  # wandb keeps its settings per process until then: a later start reads them again
            raise

    def _run_id(self) -> str:
        path = self.run_dir / RUN_ID_FILE
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        run_id = secrets.token_hex(8)
        atomic_write(path, run_id + "\n")
        return run_id

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def log_goodput(self, report: dict, step: int) -> None:
        values = {f"goodput/{key}": value for key, value in report.items()}
        self.run.log(values, step=step)
        self.run.summary.update(values)

    def log_tryrun(self, decision: dict) -> None:
        rows = [[_cell(row.get(c)) for c in CANDIDATE_COLUMNS] for row in (decision["baseline"], *decision["candidates"])]
        table = self._wandb.Table(columns=list(CANDIDATE_COLUMNS), data=rows)
        self.run.log({**tryrun_scalars(decision), "tryrun/candidates_table": table}, step=decision["step"])

    def finish(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
        self._wandb.teardown()  # waits for wandb's service to write the run (finish alone may return before)


def _cell(value):
    """A table cell: a mesh ({axis: size}) as text, numbers and text as they are."""
    return ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value
