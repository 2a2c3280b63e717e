"""Training: the Trainer and the parts it is made of.

  trainer.py     Trainer: the run's extension points (loss_fn, train_step, optimizer_update, eval_step, hooks)
                 and ``fit``, the loop that reads like the algorithm
  layout.py      MeshLayout: what a mesh fixes (devices, batch sharding, the state's placement and shardings);
                 the try-run controller hands it between Trainers (``Trainer.adopt``)
  steps.py       CompiledSteps: the jitted train/eval steps of one placement, compiled per micro-batch on first use
  loop.py        timed_steps: the one timed loop of live training and try-runs
  segment.py     Segment: one stretch of the loop: records to the trackers, hooks, the profiler, evaluation and
                 checkpoint work between steps
  session.py     the run around its segments: preemption, goodput, the trackers' lifetime, RUN_DIR/plans.json (a mixin)
  profiler.py    StepProfiler: a jax.profiler trace of logging.profile_steps in RUN_DIR/profile
  artifacts.py   logging.dump_hlo's compiled steps in RUN_DIR/compiled, the layouts' plans in RUN_DIR/plans.json
  callbacks.py   Callback: research hooks outside the Trainer class
  microbatch.py  the micro-batch follows device memory (a Trainer mixin)
  resume.py      resume per checkpoint.resume, the run's config.yaml (a Trainer mixin)
  objective.py   next_token_loss: the default objective

Names are imported on first use (PEP 562): ``import framework.train`` stays cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Trainer": "trainer", "enable_compilation_cache": "steps", "Callback": "callbacks", "MeshLayout": "layout",
    "CompiledSteps": "steps", "timed_steps": "loop", "StepDone": "loop", "next_token_loss": "objective",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
