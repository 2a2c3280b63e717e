"""Starting an elastic run on the devices there are, and resuming a checkpoint made on another mesh."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import jax
import orbax.checkpoint as ocp

from framework.checkpoint import Checkpointer
from framework.config import Config, ConfigError
from framework.distributed import spread_over_processes
from framework.metrics import drop_records_after
from framework.tryrun.devices import scheduled_devices
from framework.tryrun.layouts import fit_layout, with_layout


def elastic_trainer(trainer_cls, cfg: Config, run_dir, devices: Sequence[jax.Device] | None = None):
    """The Trainer an elastic run starts with on the devices there are.

    When a checkpoint will be resumed and the config's own mesh (or batch split) does not fit
    these devices, e.g. a run saved on 8 devices resumed on 6, start on the model split over all
    of them instead (or over as many as a layout fits): the start-up decision then tries the
    alternatives from the checkpoint.

    Compiled steps persist under RUN_DIR/xla_cache unless ``train.compilation_cache_dir`` says
    where: a restarted job (after a lost process, or to grow) compiles its layouts once.
    """
    devices = list(jax.devices() if devices is None else devices)
    for step, n in cfg.elastic.device_schedule:  # refused before anything compiles or is written
        scheduled_devices(jax.devices(), n, step)
    if not cfg.train.compilation_cache_dir and run_dir is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compilation_cache_dir=str(Path(run_dir) / "xla_cache")))
    try:
        return trainer_cls(cfg, run_dir=run_dir, devices=devices)
    except ConfigError:
        checkpoints = Checkpointer.for_run(cfg.checkpoint, run_dir)
        if cfg.checkpoint.resume is False or checkpoints is None or checkpoints.latest_good_step() is None:
            raise
        for n in range(len(devices), 0, -1):  # no layout over all of them (e.g. tensor 3 over 4 heads): fewer
            layout = fit_layout(cfg, "baseline", n, 1, n)
            if layout is not None:
                try:
                    subset = spread_over_processes(devices, n)
                except ConfigError:
                    continue
                return trainer_cls(with_layout(cfg, layout), run_dir=run_dir, devices=subset)
        raise


def start_or_resume(trainer, checkpoints: Checkpointer, step: int | None, total: int) -> int | None:
    """Give ``trainer`` the state its run goes on from, unless the checkpoint at ``step`` (None: none to resume)
    was made on another mesh (another device count, or a fallback layout): then its step, with ``trainer.state``
    left None for the start-up decision to fill from that checkpoint."""
    if trainer.state is not None:
        return None
    if step is None or step >= total or saved_mesh(checkpoints, step) == trainer.axis_sizes:
        trainer.state = trainer.restore_or_init()
        return None
    trainer.check_resume_config(step)  # restore_or_init checks on the other path
    # steps after the checkpoint are trained again: logged no more, and counted as replayed
    replayed = drop_records_after(trainer.run_dir, step)
    trainer.goodput.replay_until = max(trainer.goodput.replay_until, replayed)
    return step


def saved_mesh(checkpoints: Checkpointer, step: int) -> dict[str, int]:
    """{axis: size} of the mesh the checkpoint at ``step`` was saved from (orbax's sharding metadata)."""
    metadata = ocp.StandardCheckpointHandler().metadata(checkpoints.directory / str(step) / "state")
    leaf = jax.tree.leaves(metadata.tree)[0]
    return dict(zip(leaf.sharding.axis_names, (int(n) for n in leaf.sharding.shape)))
