"""The run directory: one run at a time (a lock file), and what a resumed run may change.

A run dir is written by one run only: ``train.py`` takes ``RUN_DIR/run.lock`` (host, pid,
start time) before it writes anything and removes it on exit. The lock is created with its
content in one step (``fileio.create_new``: a kill never leaves it empty). A second run on the
same dir stops at once naming the holder; a lock left by a dead process on this host (a kill -9,
a crash), or one that cannot be read and is older than ``UNREADABLE_LOCK_S`` (left empty by an
earlier meshpilot killed while writing it, or damaged), is taken over with a one-line notice. In a multi-process run process 0, the only one
that writes the run dir, holds the lock and the others follow its verdict.

On resume the config saved with the checkpoint is compared with the new one: changes that
no longer fit the saved state are refused, changes to the trajectory are named, the rest
(mesh, memory tiers, logging, ...) are free. ``config.yaml`` keeps its earlier versions.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from framework.config import ConfigError
from framework.fileio import atomic_write, create_new

LOCK = "run.lock"
UNREADABLE_LOCK_S = 10.0  # an unreadable lock this old has no writer still filling it


class RunDirBusy(ConfigError):
    """Another live run holds the run dir."""


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written, or damaged: held by someone we cannot name


class RunDirLock:
    """``RUN_DIR/run.lock`` held by this process; ``release()`` removes it (and a run dir it created, if left empty)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        for _ in range(3):  # a stale lock is removed and creation retried
            try:
                create_new(self.path, json.dumps(me))
                self._remove_dead_temps()
                return
            except FileExistsError:
                self._take_over_if_stale(me["host"])
        raise RunDirBusy(f"run dir {self.run_dir}: could not take {self.path} (another run keeps taking it)")

    def _take_over_if_stale(self, host: str) -> None:
        holder = _holder(self.path)
        if holder is None:  # released meanwhile
            return
        if holder.get("host") == host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
            self._take_over(f"the lock of pid {holder['pid']} (started {holder.get('started', '?')}), which is no "
                            "longer running")
            return
        if "pid" not in holder and self._age() > UNREADABLE_LOCK_S:
            self._take_over(f"an unreadable lock file, {self._age():.0f} s old (its writer died writing it)")
            return
        who = (f"pid {holder['pid']} on host {holder.get('host', '?')} since {holder.get('started', '?')}"
               if "pid" in holder else "an unknown run (lock file unreadable)")
        raise RunDirBusy(f"run dir {self.run_dir} is in use by {who} (lock file {self.path}); "
                         "wait for it to end, choose another --run-dir, or delete the lock file if that run is gone")

    def _age(self, path: Path | None = None) -> float:
        try:
            return time.time() - (path or self.path).stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def _remove_dead_temps(self) -> None:
        """The temp files of lock takers killed before they linked them (``create_new`` takes milliseconds): named by
        a pid no longer running here, or older than ``UNREADABLE_LOCK_S``."""
        for tmp in self.run_dir.glob(f"{LOCK}.*.tmp"):
            pid = tmp.name[len(LOCK) + 1:-len(".tmp")]
            if (pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid))) or self._age(tmp) > UNREADABLE_LOCK_S:
                tmp.unlink(missing_ok=True)

    def _take_over(self, what: str) -> None:
        print(f"notice: run dir {self.run_dir}: taking over {what}", file=sys.stderr, flush=True)
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        if self._created_dir:
            try:
                self.run_dir.rmdir()  # only when empty: a run refused at start leaves nothing behind
            except OSError:
                pass


@contextmanager
def hold(run_dir: str | Path) -> Iterator[None]:
    """Hold the run dir's lock for the block. Every process calls it; process 0 takes the lock."""
    import jax

    from framework.distributed import from_primary

    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = RunDirLock(run_dir)
        except Exception as e:  # held, or not writable: the others must not wait for process 0 in vain
            error = e
    taken = from_primary([float(error is None)])[0] == 1.0
    if error is not None:
        raise error
    if not taken:
        raise RunDirBusy(f"run dir {run_dir}: process 0 could not take its lock (see its error)")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


_written_here: set[Path] = set()  # files this process has written: their rewrites replace them


def keep_previous(path: Path, new_text: str) -> Path | None:
    """Before ``path`` is rewritten with ``new_text``: copy an earlier run's different version to ``path.N``.

    N = 1, 2, ... ``path`` itself stays until the caller replaces it (``atomic_write``): a kill in between leaves
    it, not a run dir without one. A file this process wrote itself (the try-run controller rewrites config.yaml
    with each new mesh) is simply replaced.
    """
    written_here, path = path.resolve() in _written_here, path.resolve()
    _written_here.add(path)
    if written_here or not path.is_file() or path.read_text() == new_text:
        return None
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    latest = path.with_name(f"{path.name}.{n - 1}")
    if n > 1 and latest.read_bytes() == path.read_bytes():  # kept already by a run killed before it replaced path
        return latest
    kept = path.with_name(f"{path.name}.{n}")
    atomic_write(kept, path.read_bytes())
    return kept


# ---------------------------------------------------------------- resume: saved config vs new config

# Keys whose change makes the saved state unusable (its shapes or its optimizer state's structure).
STATE_KEYS = (
    "model.name", "model.style", "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads",
    "model.n_kv_heads", "model.d_mlp", "model.max_seq_len", "model.tie_embeddings", "model.scan_layers",
    "model.head_dim", "model.qkv_bias", "model.qk_norm",
    "model.image_size", "model.image_channels", "model.conv_channels", "model.dense_features", "model.num_classes",
    "optimizer.name", "train.param_dtype",
)
# Keys whose change alters what training does from here on (warned, one line each).
TRAJECTORY_PREFIXES = ("optimizer.", "data.", "train.steps", "train.global_batch", "train.seq_len", "train.seed",
                       "train.dtype", "model.rope_theta", "model.norm_eps")
FREE_KEYS = ("data.prefetch",)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _adds_or_removes_state(key: str, old, new, optimizer: str) -> bool:
    """Values that add or remove a part of the optimizer state when they cross zero (a clip, sgd's momentum)."""
    if key == "optimizer.grad_clip" or (key == "optimizer.momentum" and optimizer == "sgd"):
        return ((old or 0) > 0) != ((new or 0) > 0)
    return False


def compare(saved: dict, new: dict) -> tuple[list[str], list[str]]:
    """(state-breaking changes, trajectory changes), each as ``key: old -> new``, between two config dicts."""
    old_flat, new_flat = _flatten(saved), _flatten(new)
    breaking, trajectory = [], []
    for key in sorted(set(old_flat) | set(new_flat)):
        old, value = old_flat.get(key), new_flat.get(key)
        if old == value or key not in old_flat:  # keys added since the save keep their default meaning
            continue
        line = f"{key}: {old!r} -> {value!r}"
        if key in STATE_KEYS or _adds_or_removes_state(key, old, value, new_flat.get("optimizer.name")):
            breaking.append(line)
        elif key.startswith(TRAJECTORY_PREFIXES) and key not in FREE_KEYS:
            trajectory.append(line)
    return breaking, trajectory
