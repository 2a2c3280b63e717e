"""Where a run starts: resuming its checkpoint per ``checkpoint.resume``, never a silent fresh start over an
earlier run, and the run's config written beside it (a mixin of ``Trainer``)."""
from __future__ import annotations

import sys

import jax
import yaml

from framework import rundir
from framework.checkpoint import CheckpointError, abstract_target, warn
from framework.config import ConfigError, config_to_dict
from framework.fileio import atomic_write
from framework.metrics import drop_records_after


class RunResume:
    """``restore_or_init``, ``check_resume_config`` and ``write_config`` of the Trainer."""

    def restore_or_init(self):
        """Resume per ``checkpoint.resume``: never a silent fresh start over an earlier run."""
        ck, resume = self.checkpointer, self.cfg.checkpoint.resume
        if ck is None:
            if resume is True:
                raise ConfigError("checkpoint.resume=true needs a run dir or checkpoint.dir to resume from")
            return self.init_state()
        if resume is False:
            moved = ck.set_aside_all()
            if moved is not None:
                warn(f"checkpoint.resume=false: starting over; earlier checkpoints moved to {moved}")
            drop_records_after(self.run_dir, 0)
            return self.init_state()
        if ck.latest_good_step() is None:
            metrics = self.run_dir / "metrics.jsonl" if self.run_dir is not None else None
            if resume is True:
                raise CheckpointError(f"checkpoint.resume=true but {ck.directory} holds no checkpoint")
            if metrics is not None and metrics.is_file() and metrics.stat().st_size:
                raise CheckpointError(
                    f"run dir {self.run_dir} holds an earlier run ({metrics.name}) but no checkpoint in {ck.directory}; "
                    "set checkpoint.resume=false to start over"
                )
            return self.init_state()
        self.check_resume_config(ck.latest_good_step())
        return self._restore_latest()

    def restart_state(self):
        """The state a run restarts from within its process (after a step ran out of memory with its state handed
        over): the latest checkpoint, else the first state; the logged steps after it are dropped (to be logged again)."""
        if self.checkpointer is not None and self.checkpointer.latest_good_step() is not None:
            return self._restore_latest()
        self.goodput.replay_until = max(self.goodput.replay_until, drop_records_after(self.run_dir, 0))
        return self.init_state()

    def _restore_latest(self):
        ck, nvme = self.checkpointer, self.nvme
        with self.goodput.span("checkpoint_restore"):
            target = abstract_target(self.abstract.shapes, self.state_shardings)
            if nvme is not None:  # the optimizer state (and master parameters) come to host memory, then go to files
                target = nvme.restore_target(target)
            state = ck.restore("latest", target)
            step = int(jax.device_get(state.step))
            if nvme is not None:
                state = nvme.restored(state)
        # steps after the checkpoint are trained again: logged no more, and counted as replayed
        print(f"checkpoint: resumed from step {step} in {ck.directory}", file=sys.stderr, flush=True)
        self.goodput.resumed(step, drop_records_after(self.run_dir, step))
        return state

    def check_resume_config(self, step: int) -> None:
        """Before resuming ``step``: refuse config changes the saved state cannot take, name those that change the run."""
        saved = self.checkpointer.restore_config(step)
        if saved is None and self.run_dir is not None and (self.run_dir / "config.yaml").is_file():
            saved = yaml.safe_load((self.run_dir / "config.yaml").read_text())
        if saved is None:
            return
        breaking, trajectory = rundir.compare(saved, config_to_dict(self.cfg))
        if breaking:
            raise CheckpointError(f"cannot resume step {step} in {self.checkpointer.directory} with this config: "
                                  f"{'; '.join(breaking)} (the saved state has the old shape or optimizer); "
                                  "undo the change, or set checkpoint.resume=false to start over")
        if jax.process_index() == 0:
            for change in trajectory:
                warn(f"resuming step {step} with a changed {change}: the run continues on a different course from here")

    def write_config(self) -> None:
        """RUN_DIR/config.yaml; a different earlier one is kept as config.yaml.1, .2, ..."""
        if self.run_dir is not None and jax.process_index() == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            text = yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False)
            rundir.keep_previous(self.run_dir / "config.yaml", text)
            atomic_write(self.run_dir / "config.yaml", text)
