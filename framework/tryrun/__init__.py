"""Elastic remeshing by short try-runs from a checkpoint.

When the available devices change (or every N steps, or at start-up) the controller saves
the train state with orbax, works out how many devices one model replica needs, builds
*horizontal* candidates (more data-parallel replicas of that minimal split; only when the
available count is an integer multiple of it) and *vertical* ones (the model split over
more devices: over fsdp/tensor, and, kind ``pipeline``, its stacked layers cut into more
pipeline stages where the layer count allows), starts each candidate from the saved state (the
live state resharded in memory while its devices are all still there, else the checkpoint),
measures a few steps with the loop that times live steps, and adopts the best only if it beats
the baseline by ``elastic.threshold``. Training then continues from the saved state on the
chosen mesh, so try-run steps never count: step, optimizer state and data position are those
of the checkpoint, and the global batch stays fixed (gradient accumulation adapts when the
micro-batch does not divide the new data-parallel size).

  layouts.py     Layout, the candidates and their gates (tensor fit, batch split, stage count)
  trial.py       Trial: one try-run from the decision's start state, timed like live steps
  decision.py    the decision record (tryrun.jsonl), its printed table, how many devices are useful
  devices.py     available / scheduled / usable devices, one replica's minimum, waiting for enough
  controller.py  TryRunController: the decision loop tying them together
  startup.py     the trainer an elastic run starts with; resuming a checkpoint made on another mesh

Extension points (subclass TryRunController): ``available_devices``, ``min_devices``, ``candidates``,
``score``, ``should_adopt``.
"""
from framework.tryrun.controller import TryRunController
from framework.tryrun.decision import Decision, devices_to_use, format_decision, max_useful_devices
from framework.tryrun.layouts import Layout, grad_accum_for, plan_layout, plan_pipeline_layout, tensor_misfit, with_layout
from framework.tryrun.startup import elastic_trainer
from framework.tryrun.trial import Trial, target_of

__all__ = ["Decision", "Layout", "Trial", "TryRunController", "devices_to_use", "elastic_trainer", "format_decision",
           "grad_accum_for", "max_useful_devices", "plan_layout", "plan_pipeline_layout", "target_of",
           "tensor_misfit", "with_layout"]
