"""The default training objective, in one place: ``Trainer.loss_fn`` calls it, and scripts/plan.py's memory
estimate traces it where there is no Trainer (so the planner measures what training optimises)."""
from __future__ import annotations

from typing import Callable

import optax
from flax import nnx

from framework import memory
from framework.state import abstract_state


def next_token_loss(model, batch):
    """Mean next-token cross-entropy of a (B, T+1) token batch (plus an MoE model's routing losses); a model with
    its own objective (the CNN classifier's ``loss``) uses that."""
    return loss_and_metrics(model, batch)[0]


def loss_and_metrics(model, batch):
    """(``next_token_loss``, metrics): an MoE model's routing losses join the loss, its ``moe/*`` metrics the dict."""
    if hasattr(model, "loss"):
        return model.loss(batch), {}
    out = model(batch[:, :-1])
    logits, routing = out if isinstance(out, tuple) else (out, {"loss": 0.0, "metrics": {}})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
    return loss + routing["loss"], routing["metrics"]


def loss_for_config(cfg, axis_sizes) -> Callable:
    """``remat_policy -> (params, batch) -> loss``: ``next_token_loss`` on the model of ``cfg`` built with that layer
    checkpoint policy, for the memory planner where there is no Trainer (scripts/plan.py on devices it does not
    have); a Trainer gives its own ``loss_fn`` (``Trainer.loss_for``)."""
    def loss_for(remat_policy=None):
        graphdef = abstract_state(cfg, axis_sizes, **memory.model_options(remat_policy, False)).graphdef
        return lambda params, batch: next_token_loss(nnx.merge(graphdef, params), batch)

    return loss_for
