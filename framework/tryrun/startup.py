"""Starting an elastic run on the devices there are, and resuming a checkpoint made on another mesh."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import jax
import orbax.checkpoint as ocp

from framework.checkpoint import Checkpointer
from framework.config import Config, ConfigError
from framework.distributed import share_over_processes
from framework.goodput import GoodputClock
from framework.metrics import drop_records_after
from framework.tryrun.decision import mesh_text
from framework.tryrun.devices import scheduled_devices, wait_until_enough
from framework.tryrun.layouts import start_layout, with_layout


def elastic_trainer(trainer_cls, cfg: Config, run_dir, devices: Sequence[jax.Device] | None = None):
    """The Trainer an elastic run starts with on the devices there are.

    When the config's own mesh (or batch split, or model split) does not fit these devices, e.g. a batch of 16
    on 6 devices, or a run saved on 8 devices resumed on 6, it starts on the layout ``layouts.start_layout``
    picks among those that fit (over as many devices as any fits, the rest idle, spread so that every process
    drives some), with ``start_misfit`` saying why the configured one did not: the controller's start-up
    decision then tries the alternatives (``TryRunController``). When none fits, a ConfigError with both reasons.

    Compiled steps persist under RUN_DIR/xla_cache unless ``train.compilation_cache_dir`` says
    where: a restarted job (after a lost process, or to grow) compiles its layouts once.
    """
    devices = list(jax.devices() if devices is None else devices)
    for step, n in cfg.elastic.device_schedule:  # refused before anything compiles or is written
        scheduled_devices(jax.devices(), n, step)
    if not cfg.train.compilation_cache_dir and run_dir is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compilation_cache_dir=str(Path(run_dir) / "xla_cache")))
    try:
        trainer = trainer_cls(cfg, run_dir=run_dir, devices=devices)
        trainer.start_misfit = None
        return trainer
    except ConfigError as e:
        misfit = str(e)
    min_devices = cfg.elastic.min_devices if cfg.elastic.min_devices != "auto" else 1  # (memory: the decision's)
    # fewer devices than one replica needs: wait (or ask the elastic launcher) before any layout is planned
    wait_until_enough(lambda: devices, lambda _: min_devices, cfg.elastic, GoodputClock())
    dropped: list[dict] = []
    layout = start_layout(cfg, len(devices), min_devices, dropped)
    if layout is None:
        reasons = "; ".join(dict.fromkeys(d["reason"] for d in dropped)) or "fewer devices than processes"
        raise ConfigError(f"elastic: {misfit}, and no other layout over {len(devices)} devices or fewer fits: {reasons}")
    trainer = trainer_cls(with_layout(cfg, layout), run_dir=run_dir, devices=share_over_processes(devices, layout.n_devices))
    trainer.start_misfit = misfit
    if jax.process_index() == 0:
        idle = len(devices) - layout.n_devices
        print(f"elastic: the configured mesh does not fit {len(devices)} devices ({misfit}); starting on "
              f"{mesh_text(layout.mesh)} over {layout.n_devices} (grad_accum {layout.grad_accum}"
              f"{f', {idle} idle' if idle else ''}) for the start-up decision to try the layouts that fit", flush=True)
    return trainer


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
    trainer.goodput.resumed(step, drop_records_after(trainer.run_dir, step))
    return step


def saved_mesh(checkpoints: Checkpointer, step: int) -> dict[str, int]:
    """{axis: size} of the mesh the checkpoint at ``step`` was saved from (orbax's sharding metadata)."""
    metadata = ocp.StandardCheckpointHandler().metadata(checkpoints.directory / str(step) / "state")
    leaf = jax.tree.leaves(metadata.tree)[0]
    return dict(zip(leaf.sharding.axis_names, (int(n) for n in leaf.sharding.shape)))
