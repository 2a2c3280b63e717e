"""Trackers: the one way a run's numbers leave the training loop (Levanter's trackers, MaxText's TensorBoard).

  base.py         Tracker (the interface: start with the resolved config, log step and evaluation records,
                  goodput, try-run decisions, finish) and Trackers, the fan-out the Trainer holds
  jsonl.py        RUN_DIR/metrics.jsonl: one JSON object per logged record (what resume, plot.py, report.py read)
  tensorboard.py  RUN_DIR/tensorboard: train/*, eval/*, goodput/*, tryrun/* scalars, the config as text
  wandb.py        Weights & Biases, the optional extra (pip install -e '.[wandb]'): config, metrics, eval, goodput,
                  try-run decisions (a table per decision); a restarted run continues the same wandb run

``logging.trackers`` names them (default ``[jsonl, tensorboard]``). Only process 0 reports. A tracker that cannot
start is one warning line and the run goes on with the others.
"""
from framework.trackers.base import Tracker, Trackers, scalars

__all__ = ["Tracker", "Trackers", "scalars"]
