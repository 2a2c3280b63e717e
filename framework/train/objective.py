"""The default training objective, in one place: ``Trainer.loss_fn`` calls it, and scripts/plan.py's memory
estimate traces it where there is no Trainer (so the planner measures what training optimises)."""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import optax
from flax import nnx

from framework import memory
from framework.state import abstract_state
from models import context


def target_weights(batch):
    """1.0 where input ``i`` of a batch (any leading dims, fields of framework/data/batch.py) is trained on: its
    target ``i + 1`` is in the same document (segment ids) and marked (loss mask); None when every target is."""
    weights = None
    if "segment_ids" in batch:
        segments = batch["segment_ids"]
        weights = segments[..., 1:] == segments[..., :-1]
    if "loss_mask" in batch:
        marked = batch["loss_mask"][..., 1:] > 0
        weights = marked if weights is None else weights & marked
    return None if weights is None else weights.astype(jnp.float32)


def micro_batch_shares(batch):
    """Per micro-batch of a (A, B, T+1) batch, its targets times A over the whole batch's: the micro-batches' mean
    losses scaled by these and averaged are the mean over all the batch's targets (a micro-batch with more targets
    counts more). None when every target counts: then the shares are all 1."""
    weights = target_weights(batch)
    if weights is None:
        return None
    counts = weights.sum(axis=tuple(range(1, weights.ndim)))
    return counts * counts.shape[0] / jnp.maximum(counts.sum(), 1.0)


def next_token_loss(model, batch):
    """Mean next-token cross-entropy over the targets of a micro-batch: a dict of (B, T+1) fields
    (framework/data/batch.py); only the targets ``target_weights`` keeps count (plus an MoE model's routing
    losses). A model with its own objective (the CNN classifier's ``loss``) uses that, on the tokens."""
    return loss_and_metrics(model, batch)[0]


def loss_and_metrics(model, batch):
    """(``next_token_loss``, metrics): an MoE model's routing losses join the loss, its ``moe/*`` metrics the dict."""
    tokens = batch["tokens"]
    if hasattr(model, "loss"):
        return model.loss(tokens), {}
    fields = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
              **{k: batch[k][:, :-1] for k in ("segment_ids", "positions") if k in batch}}
    weights = target_weights(batch)
    if weights is not None:
        fields["weights"] = weights
    fields = context.to_layout(fields)  # the mesh's token order (zig-zag under mesh.context)
    out = model(fields["inputs"], **{k: fields[k] for k in ("segment_ids", "positions") if k in fields})
    logits, routing = out if isinstance(out, tuple) else (out, {"loss": 0.0, "metrics": {}})
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, fields["targets"])
    if weights is None:
        loss = losses.mean()
    else:
        loss = (losses * fields["weights"]).sum() / jnp.maximum(fields["weights"].sum(), 1.0)
    return loss + routing["loss"], routing["metrics"]


def loss_for_config(cfg, axis_sizes) -> Callable:
    """``remat_policy -> (params, batch) -> loss``: ``next_token_loss`` on the model of ``cfg`` built with that layer
    checkpoint policy, for the memory planner where there is no Trainer (scripts/plan.py on devices it does not
    have); a Trainer gives its own ``loss_fn`` (``Trainer.loss_for``)."""
    def loss_for(remat_policy=None):
        graphdef = abstract_state(cfg, axis_sizes, **memory.model_options(remat_policy, False)).graphdef
        return lambda params, batch: next_token_loss(nnx.merge(graphdef, params), batch)

    return loss_for
