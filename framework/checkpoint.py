"""Checkpoints that never lose a step: orbax save/restore with an integrity seal.

orbax writes each step into ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>``
when every item is committed, so a crash mid-save never leaves a half-written ``<step>``.
That guards against crashes but not against files damaged afterwards (truncated, deleted,
bit-flipped), and orbax reads some of those back silently. So after orbax finalizes a
step, the primary process *seals* it: ``meshpilot_manifest.json`` lists every file with
its size and CRC32. A step is *good* only when its manifest is present and every file
matches; a step without a manifest (killed between rename and seal) counts as incomplete.

Resume picks the newest good step; newer damaged or incomplete steps are reported in one
line and moved aside (``<step>.damaged``) so the run can save those step numbers again.
When checkpoints exist but none is good, :class:`CheckpointError` is raised: scripts
turn it into ``error: ...`` and exit 2 (it is a ConfigError), never a silent fresh start.

Restores go straight into the target's shardings and memory kinds (a pytree of
``jax.ShapeDtypeStruct(..., sharding=...)``), on any mesh or device subset: each device
reads only its own shards, nothing is gathered onto one device.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Literal

import jax
import orbax.checkpoint as ocp

from framework.config import CheckpointConfig, ConfigError
from framework.distributed import from_primary
from framework.fileio import atomic_write

MANIFEST = "meshpilot_manifest.json"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's AtomicRenameTemporaryPath suffix
DAMAGED_SUFFIX = ".damaged"
_CHUNK = 8 << 20
MAX_CHECK_AHEAD = 1 << 20  # steps between time checks at most (exact in the float32 broadcast)


class CheckpointError(ConfigError):
    """Checkpoints exist but cannot be used (damaged, incomplete, missing): one line for the user."""


def warn(message: str) -> None:
    """One line on stderr: checkpoint problems are the user's business, not a traceback's."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


@contextlib.contextmanager
def naming(step_dir: Path):
    """An OS error that names no file (a failed write or close of an open file names none, and orbax
    raises some from its own files that way) is re-raised naming ``step_dir``, the step being saved:
    a full disk is then reported with where it filled, not as a bare "No space left on device"."""
    try:
        yield
    except Exception as e:
        cause = e
        while cause is not None and not (isinstance(cause, OSError) and cause.errno):
            cause = cause.__cause__ or cause.__context__
        if cause is None or cause.filename is not None:
            raise
        raise OSError(cause.errno, cause.strerror, str(step_dir)) from e


def write_manifest(step_dir: Path) -> None:
    """Seal a finalized step: size and CRC32 of every file, written atomically."""
    files = {str(p.relative_to(step_dir)): [p.stat().st_size, _crc32(p)] for p in _files(step_dir)}
    atomic_write(step_dir / MANIFEST, json.dumps({"files": files}))


def check_step_dir(step_dir: Path) -> str | None:
    """None when the step is intact, else why not (a short phrase for a one-line report)."""
    manifest = step_dir / MANIFEST
    if not manifest.is_file():
        return "incomplete (no manifest: the save never finished)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"damaged ({MANIFEST} unreadable)"
    for rel, (size, crc) in files.items():
        p = step_dir / rel
        if not p.is_file():
            return f"damaged ({rel} missing)"
        actual = p.stat().st_size
        if actual != size:
            return f"damaged ({rel} is {actual} bytes, expected {size})"
        if _crc32(p) != crc:
            return f"damaged ({rel} checksum mismatch)"
    return None


def barrier(name: str) -> None:
    """Wait for every process at the coordinator, not with a device collective.

    orbax's default barrier is a compiled all-gather; run from the seal thread while the
    main thread trains, it deadlocks multi-process runs. Naming the processes makes orbax
    use the distributed runtime's key-value barrier instead (a no-op for one process).
    """
    ocp.multihost.sync_global_processes(
        ocp.multihost.unique_barrier_key(name), processes=set(range(jax.process_count()))
    )


class Checkpointer:
    """Save a train-state pytree every N steps (async), keep K, restore the newest good one.

    Public API (also used by the try-run controller): ``should_save(step)``, ``new_segment()``, ``save(step, state)``,
    ``restore(step_or_latest, target)``, ``latest_good_step()``, ``wait()``, ``close()``.
    Call the same methods on every process; only the primary one writes seals and moves files.
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, every_steps: int = 0, every_minutes: float = 0.0,
                 async_save: bool = True, config: dict | None = None):
        self.directory = Path(directory).resolve()
        self.keep, self.every_steps, self.async_save = keep, every_steps, async_save
        self.every_minutes = every_minutes
        self.last_saved_step: int | None = None
        self._last_save_time = time.monotonic()
        self._next_check, self._time_checked = 0, None  # should_save: the next step that checks the time; the last check
        self.config = config
        self._sealer: threading.Thread | None = None
        self._seal_error: BaseException | None = None
        self._checked: dict[int, str | None] = {}  # step -> problem (None: good), checked once per instance
        self._reported: set[int] = set()
        self._opened: ocp.CheckpointManager | None = None

    @classmethod
    def for_run(cls, cfg: CheckpointConfig, run_dir: str | Path | None, config: dict | None = None) -> "Checkpointer | None":
        """The run's checkpointer: ``checkpoint.dir`` or RUN_DIR/checkpoints; None when neither is set."""
        if cfg.dir:
            directory = Path(cfg.dir)
        elif run_dir is not None:
            directory = Path(run_dir) / "checkpoints"
        else:
            return None
        return cls(directory, keep=cfg.keep, every_steps=cfg.every_steps, every_minutes=cfg.every_minutes,
                   async_save=cfg.async_, config=config)

    @property
    def _manager(self) -> ocp.CheckpointManager:
        """orbax's manager, opened at first use: a Trainer handed another's Checkpointer (the try-run
        controller's candidates share the run's) never opens a second manager on the same directory."""
        if self._opened is None:
            # No max_to_keep: orbax would delete old steps when the new one is renamed, before it is
            # sealed; with keep=1 a crash in between would leave no good step. _prune deletes later.
            options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=self.async_save)
            self._opened = ocp.CheckpointManager(self.directory, options=options)
        return self._opened

    @property
    def _primary(self) -> bool:
        return jax.process_index() == 0

    # ------------------------------------------------------------------ saving

    def should_save(self, step: int) -> bool:
        """Every ``every_steps`` steps, and when ``every_minutes`` have passed since the last save.

        Call it on every process at every step, in step order. The time is process 0's, or the processes
        would disagree and their saves never pair up; agreeing is a broadcast that waits for the step in
        flight, so it happens only at check steps: each check also fixes the next one, half the steps
        the time left would take at the step rate measured since the previous check (the next step once
        under two steps are left). The save so comes at the step that checking every step would pick
        unless the steps slow down more than twofold between checks, and the processes agree about
        log2(n) + 2 times per save of n steps (n = 30: at steps 0, 15, 22, 26, 28, 29, 30) instead of n.
        The rate is measured within one loop: ``new_segment`` starts it anew.
        """
        if self.every_steps > 0 and step % self.every_steps == 0:
            return True
        if self.every_minutes <= 0 or (self._time_checked is not None and self._time_checked[0] < step < self._next_check):
            return False  # (a step at or before the last check, as after a rewind, checks again)
        interval, now = self.every_minutes * 60, time.monotonic()
        due = now - self._last_save_time >= interval
        left = interval if due else interval - (now - self._last_save_time)  # a due save starts the interval anew
        previous, self._time_checked = self._time_checked, (step, now)
        step_s = (now - previous[1]) / (step - previous[0]) if previous is not None and step > previous[0] else None
        ahead = 1 if not step_s else int(min(max(left / step_s / 2, 1), MAX_CHECK_AHEAD))
        due, ahead = from_primary([float(due), float(ahead)])
        self._next_check = step + int(ahead)
        return due == 1.0

    def new_segment(self) -> None:
        """Steps from here on run at a rate of their own (another mesh, after a try-run decision or a pause):
        ``should_save`` checks the time at the next step and measures the rate anew, instead of averaging
        over the pause. The time since the last save still counts."""
        self._next_check, self._time_checked = 0, None

    def save(self, step: int, state: Any) -> None:
        """Start saving ``state`` as ``step``; returns once the arrays are copied off the devices.

        The caller may donate or overwrite ``state`` right after. The step becomes good (and
        visible to ``latest_good_step``) only when written, renamed by orbax, and sealed.
        """
        self.wait()
        self.last_saved_step, self._last_save_time = step, time.monotonic()
        items = {"state": ocp.args.StandardSave(state)}
        if self.config is not None:
            items["config"] = ocp.args.JsonSave(self.config)
        with naming(self.directory / str(step)):
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        if self.async_save:
            self._sealer = threading.Thread(target=self._seal_in_background, args=(step,), name=f"seal-{step}", daemon=True)
            self._sealer.start()
        else:
            self._seal(step)
            self._prune()

    def _seal(self, step: int) -> None:
        with naming(self.directory / str(step)):
            self._manager.wait_until_finished()
            if self._primary:
                write_manifest(self.directory / str(step))
        barrier("meshpilot_checkpoint_sealed")

    def _prune(self) -> None:
        """Keep the newest ``keep`` sealed steps: older steps go only once newer ones are sealed.

        Only the primary process looks and deletes; the others wait at the barrier and reload.
        Letting each process list the directory itself races with the primary's deletions: a
        process that looks late sees fewer steps, deletes nothing, and the processes' barriers
        no longer pair up.
        """
        if self._primary:
            final, _ = self._listing()
            sealed = [s for s in final if (self.directory / str(s) / MANIFEST).is_file()]
            if len(sealed) > self.keep:
                cutoff = sealed[self.keep - 1]
                for s in final:
                    if s < cutoff:
                        shutil.rmtree(self.directory / str(s))
        barrier("meshpilot_checkpoint_pruned")
        self._manager.reload()

    def _seal_in_background(self, step: int) -> None:
        try:
            self._seal(step)
        except BaseException as e:  # handed to the caller's thread by wait()
            self._seal_error = e

    def wait(self) -> None:
        """Block until the save in flight is written and sealed; re-raise its error, if any."""
        if self._sealer is not None:
            self._sealer.join()
            self._sealer = None
            if self._seal_error is None:
                # Pruning runs here, on the caller's thread: orbax's delete synchronises processes,
                # which must not happen on the seal thread while the main thread trains.
                self._prune()
        if self._seal_error is not None:
            error, self._seal_error = self._seal_error, None
            raise error

    def close(self) -> None:
        self.wait()
        if self._opened is not None:
            self._opened.close()
            self._opened = None

    # ------------------------------------------------------------------ finding good steps

    def _listing(self) -> tuple[list[int], list[int]]:
        """(finalized steps, steps whose save never reached orbax's rename), newest first."""
        final, unfinished = [], []
        if self.directory.is_dir():
            for p in self.directory.iterdir():
                if p.is_dir() and p.name.isdigit():
                    final.append(int(p.name))
                elif p.is_dir() and TMP_SUFFIX in p.name and p.name.split(TMP_SUFFIX)[0].isdigit():
                    unfinished.append(int(p.name.split(TMP_SUFFIX)[0]))
        return sorted(final, reverse=True), sorted(set(unfinished) - set(final), reverse=True)

    def has_checkpoints(self) -> bool:
        """Anything a previous run left here: finalized or half-written steps."""
        self.wait()
        final, unfinished = self._listing()
        return bool(final or unfinished)

    def check(self, step: int) -> str | None:
        """None when ``step`` is intact, else why it is not."""
        self.wait()
        if step not in self._checked:
            self._checked[step] = check_step_dir(self.directory / str(step))
        return self._checked[step]

    def _problems_newer_than(self, step: int | None) -> list[tuple[int, str]]:
        final, unfinished = self._listing()
        bad = [(s, "incomplete (the save never finished)") for s in unfinished]
        bad += [(s, self.check(s)) for s in final if self.check(s) is not None]
        return sorted(((s, why) for s, why in bad if step is None or s > step), reverse=True)

    def latest_good_step(self) -> int | None:
        """Newest intact step; None when the directory holds no checkpoint at all.

        Damaged or incomplete newer steps are reported in one warning line (once per instance).
        Raises CheckpointError when checkpoints exist but none is intact.
        """
        self.wait()
        final, unfinished = self._listing()
        good = next((s for s in final if self.check(s) is None), None)
        problems = self._problems_newer_than(good)
        if good is None and problems:
            listed = "; ".join(f"step {s} is {why}" for s, why in problems)
            raise CheckpointError(
                f"checkpoint dir {self.directory}: no intact checkpoint ({listed}); "
                "set checkpoint.resume=false to start over"
            )
        fresh = [(s, why) for s, why in problems if s not in self._reported]
        if fresh:
            self._reported.update(s for s, _ in fresh)
            listed = "; ".join(f"step {s} is {why}" for s, why in fresh)
            warn(f"checkpoint dir {self.directory}: {listed}; using step {good}")
        return good

    # ------------------------------------------------------------------ restoring

    def restore(self, step: int | Literal["latest"], target: Any) -> Any:
        """Read ``step`` (or the newest good one) into ``target``'s structure, shardings and memory kinds.

        ``target`` is a pytree of ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` (or of
        arrays, whose shardings are used); the mesh may differ from the one that saved, in
        shape and in devices. Restoring ``"latest"`` means continuing from it, so newer
        damaged or incomplete steps are moved aside and their step numbers can be saved again.
        """
        if step == "latest":
            step = self.latest_good_step()
            if step is None:
                raise CheckpointError(f"checkpoint dir {self.directory}: no checkpoint to restore")
            self._set_aside_newer(step)
        else:
            why = self.check(step)
            if why is not None:
                raise CheckpointError(f"checkpoint dir {self.directory}: step {step} is {why}")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except (ValueError, KeyError, TypeError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"checkpoint dir {self.directory}: step {step} does not fit the target state: {first_line}"
            ) from None
        return restored.state

    def restore_config(self, step: int) -> dict | None:
        """The resolved config saved with ``step`` (None when it was saved without one)."""
        self.wait()
        if not (self.directory / str(step) / "config").is_dir():
            return None
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def _set_aside_newer(self, step: int) -> None:
        """Move damaged or incomplete steps newer than ``step`` aside (primary only; every process waits)."""
        if self._primary:
            for s, _ in self._problems_newer_than(step):
                src = self.directory / str(s)
                if src.is_dir():
                    dst = self.directory / f"{s}{DAMAGED_SUFFIX}"
                    if dst.exists():
                        dst = self.directory / f"{s}{DAMAGED_SUFFIX}-{time.time_ns()}"
                    src.rename(dst)
        barrier("meshpilot_checkpoint_set_aside")
        self._checked = {s: why for s, why in self._checked.items() if s <= step}
        self._manager.reload()

    def set_aside_all(self) -> Path | None:
        """Start over (``checkpoint.resume=false``): move the whole directory to ``<dir>.old-<time>``.

        Returns where it went on the primary process; None on the others and when there was nothing.
        """
        self.close()
        moved = None
        if self._primary and self.has_checkpoints():
            moved = self.directory.with_name(f"{self.directory.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            self.directory.rename(moved)
        barrier("meshpilot_checkpoint_set_aside_all")
        self._checked.clear()
        return moved


def abstract_target(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (and their memory kinds), for ``restore``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
