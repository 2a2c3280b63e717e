"""Evaluation on held-out batches (a mixin of ``Trainer``): the ``eval_step`` extension point, the jitted
evaluation of the layout's params, and the ``on_eval_end`` hook. Always the same held-out batches (positions
0..``train.eval_batches``-1 of the eval split), so evaluations compare across steps, runs and meshes."""
from __future__ import annotations

import jax
import numpy as np

from framework import broadcast, sharding
from framework.state import TrainState
from framework.train.objective import micro_batch_shares


class Evaluation:
    """``evaluate``, ``eval_step`` and ``on_eval_end`` of the Trainer."""

    def eval_step(self, params, batch: dict) -> dict:
        """Metrics of one held-out batch (fields of (accum, micro, seq+1)), no gradient: the mean ``loss_fn`` of its
        micro-batches.

        The rng is fixed so that an evaluation is a pure function of params and batch.
        """
        rng = jax.random.key_data(jax.random.key(self.cfg.train.seed))
        losses = jax.lax.map(lambda micro: self.loss_fn(params, micro, rng)[0], batch)
        shares = micro_batch_shares(batch)  # packed or masked: the mean over the batch's targets, as training's
        return {"loss": losses.mean() if shares is None else (losses * shares).mean()}

    def _traced_eval(self, params, batch):
        # params stay in their memory kind (pinned_host ones stream per layer), as in _traced_step
        layout = self.layout
        with sharding.activation_sharding(self.mesh, self.activation_rules), \
                broadcast.use_plan(layout.broadcast_plan(self.cfg, jax.tree.leaves(batch)[0].shape[0]), self.mesh):
            return self.eval_step(layout.master_view(params, self.cfg.train.param_dtype), batch)

    def evaluate(self, state: TrainState | None = None) -> dict:
        """``eval_step``'s metrics averaged over eval batches 0..``train.eval_batches``-1, keyed ``eval_<name>``.

        Always the same held-out batches, so evaluations compare across steps, runs and meshes.
        """
        state = self.state if state is None else state
        if state is None:
            raise ValueError("Trainer.evaluate: no state yet; pass one or call fit() first")
        layout = self._placed()
        if layout.eval_loader is None:
            layout.eval_loader = layout.make_loader(self.cfg, "eval")
        per_batch = [layout.steps.eval_step(state.params, layout.eval_loader.batch(pos))
                     for pos in range(self.cfg.train.eval_batches)]
        per_batch = jax.device_get(per_batch)
        return {f"eval_{key}": float(np.mean([m[key] for m in per_batch])) for key in per_batch[0]}

    def on_eval_end(self, step: int, record: dict) -> None:
        """Called on every process after each evaluation; ``record`` is ``{"step": step, "eval_loss": ...}``."""
