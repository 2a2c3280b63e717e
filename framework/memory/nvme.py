"""Memory tiers, the NVMe tier: the optimizer state (and the float32 master parameters) in files on local disk,
streamed through the update.

With ``memory.opt_state: nvme`` the optimizer's moments never live in the state pytree. Each
process keeps its unique shards of them (a replica held by several of its devices once) in one
flat float32 file per moment under ``memory.nvme_dir/process_<i>/``. The compiled step computes
the gradients (clipped by global norm, as optax's chain does) and stops; ``NvmeOptimizer.update``
then walks the process's parameter shards in chunks of ``memory.nvme_chunk_bytes``: a reader
thread reads the next chunks' moments ahead, the main thread does the elementwise arithmetic in
numpy (optax's formulas, step for step), a writer thread writes the new moments behind. Peak
memory is the parameters and gradients the step already holds plus a few chunks, never the state.

With ``memory.params: nvme`` too (ZeRO-Infinity's master copy: ``train.dtype`` bfloat16 compute,
``train.param_dtype`` float32), the float32 parameters are one more file beside the moments and the
device holds the parameters in the compute dtype only. The step reads those as float32, so the model
casts them as it casts the master copy and the gradients come out in float32; the update reads each
chunk of the master copy with its moments, writes both back, and hands the device the chunk rounded
to the compute dtype. Only the model's float32 reads of a parameter (norm scales) see rounded values.

Files are read and written with positional I/O (``os.preadv``/``os.pwrite``, framework/fileio.py) into
buffers of one chunk, not ``np.memmap``: pages of a mapping count in the process's resident set until the
kernel decides to drop them, so a mapped update could not promise a memory bound; and not
tensorstore: flat per-process files need no chunked array format or new dependency.

Checkpoints hold the state as an all-device run does (an optax pytree, float32 parameters):
``checkpoint_state`` reads the files into arrays at save time and ``restored`` writes a restored
state back, from any mesh. A marker (``state.json``) says which step the files hold and whether an
update is under way: a save of files an update left half-written (a crash, an error) is refused,
and a restart always rewrites the files from the last checkpoint, so no checkpoint mixes two steps.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from framework.config import Config, ConfigError
from framework.fileio import atomic_write, read_into, write_all
from framework.memory.nvme_rules import MASTER, file_names, make_rule, moment_names, update_chunk
from framework.memory.policy import HOST, NVME
from framework.optimizer import clip_by_global_norm, decay_mask, learning_rate_schedule

MARKER = "state.json"
READ_AHEAD = 2  # chunks read ahead of the arithmetic; as many may wait to be written behind it
_ITEM = 4  # float32 bytes: the state on disk is float32 (train.param_dtype=float32 is required)


class NvmeStateError(RuntimeError):
    """The files do not hold the step asked for (an update was interrupted, or another run wrote them)."""


@dataclass(frozen=True)
class Segment:
    """One unique shard of one parameter held by this process, and where it lies in each moment file."""

    leaf: int  # index among the flattened parameters
    index: tuple  # ((start, stop), ...) per dimension: the shard's place in the parameter
    shape: tuple
    offset: int  # elements before it in each moment file
    size: int


def _key(index, shape) -> tuple:
    return tuple((s.start or 0, dim if s.stop is None else s.stop) for s, dim in zip(index, shape))


def local_segments(shapes: list, shardings: list) -> list[Segment]:
    """This process's unique shards of each parameter, in a fixed order (leaf, then position)."""
    segments, offset = [], 0
    for leaf, (x, s) in enumerate(zip(shapes, shardings)):
        keys = sorted({_key(idx, x.shape) for idx in s.addressable_devices_indices_map(x.shape).values()})
        for key in keys:
            shape = tuple(b - a for a, b in key)
            size = int(np.prod(shape, dtype=np.int64))
            segments.append(Segment(leaf, key, shape, offset, size))
            offset += size
    return segments


def disk_bytes(cfg: Config, param_shapes, param_shardings) -> int:
    """Bytes this process keeps on disk: its unique parameter shards x 4 bytes x its files (8 bytes per
    parameter for Adam's moments, 4 more for the master copy)."""
    segments = local_segments(jax.tree.leaves(param_shapes), jax.tree.leaves(param_shardings))
    return sum(s.size for s in segments) * _ITEM * len(file_names(cfg))


class NvmeOptimizer:
    """The optimizer state (and master parameters) of one process in files, and the streamed update over it.

    ``param_shapes`` are the float32 parameters, ``param_shardings`` their device shardings (the moments
    and the master copy share them); ``opt_shapes`` and ``opt_specs`` the optax state's shapes and specs,
    for checkpoints in the all-device layout.
    """

    def __init__(self, cfg: Config, mesh, param_shapes, param_shardings, opt_shapes, opt_specs):
        self.cfg = cfg.optimizer
        self.moments = moment_names(cfg.optimizer)
        self.master = cfg.memory.params == NVME
        self.names = file_names(cfg)
        self.compute_dtype = jnp.dtype(cfg.train.dtype if self.master else cfg.train.param_dtype)
        self.chunk = max(cfg.memory.nvme_chunk_bytes // _ITEM, 1)
        self.schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
        self.mesh = mesh
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(param_shapes)
        self.leaf_of = {path: i for i, (path, _) in enumerate(flat)}
        self.shapes = [x for _, x in flat]
        self.shardings = jax.tree.leaves(param_shardings)
        self.decays = jax.tree.leaves(decay_mask(param_shapes, cfg.optimizer.decay_embeddings))
        self.opt_shapes, self.opt_specs = opt_shapes, opt_specs
        self.segments = local_segments(self.shapes, self.shardings)
        self.seg_of = {(s.leaf, s.index): s for s in self.segments}
        self.by_leaf = collections.defaultdict(list)
        for seg in self.segments:
            self.by_leaf[seg.leaf].append(seg)
        self.elements = sum(s.size for s in self.segments)
        self.directory = Path(cfg.memory.nvme_dir).expanduser() / f"process_{jax.process_index()}"
        self.files = {m: self.directory / f"{m}.f32" for m in self.names}
        self.clip = clip_by_global_norm(cfg.optimizer.grad_clip) if cfg.optimizer.grad_clip > 0 else None
        self._open()

    @property
    def disk_bytes(self) -> int:
        return self.elements * _ITEM * len(self.names)

    def _open(self) -> None:
        where = f"memory.nvme_dir={self.directory.parent}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            held = sum(f.stat().st_size for f in self.files.values() if f.is_file())
            free = shutil.disk_usage(self.directory).free
            if free + held < self.disk_bytes:
                raise ConfigError(f"{where}: the state ({', '.join(self.names)}) needs {self.disk_bytes:,} B on disk, "
                                  f"{free + held:,} B are free")
            self._fds = {m: os.open(f, os.O_RDWR | os.O_CREAT, 0o644) for m, f in self.files.items()}
        except OSError as e:
            raise ConfigError(f"{where}: {e.strerror}: {e.filename}") from None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    # ------------------------------------------------------------------ the step the files hold

    def _mark(self, step: int, complete: bool) -> None:
        atomic_write(self.directory / MARKER, json.dumps({"step": step, "complete": complete, "elements": self.elements,
                                                          "files": list(self.names)}))

    def held_step(self) -> int | None:
        """The step whose state the files hold; None when an update was interrupted or they hold another layout."""
        try:
            m = json.loads((self.directory / MARKER).read_text())
        except (OSError, ValueError):
            return None
        ok = m.get("complete") and m.get("elements") == self.elements and m.get("files") == list(self.names)
        return m["step"] if ok else None

    def _expect(self, step: int, doing: str) -> None:
        held = self.held_step()
        if held != step:
            state = "an interrupted update" if held is None else f"step {held}"
            raise NvmeStateError(f"cannot {doing} step {step}: {self.directory} holds {state}")

    def init(self, state=None, step: int = 0):
        """Fresh moments (zeros, as optax's ``init`` for these optimizers: files truncated to their size) and,
        with the master copy here, ``state``'s float32 parameters written to it. Returns ``state`` as the step
        holds it (the parameters in the compute dtype, from the master copy)."""
        self._mark(step, False)
        for m in self.moments:
            os.ftruncate(self._fds[m], 0)
            os.ftruncate(self._fds[m], self.elements * _ITEM)
        if self.master:
            self._write_tree(MASTER, state.params)
        self._mark(step, True)
        return self.held(state)

    def held(self, state):
        """``state`` as the compiled step holds it: no optimizer state and, with the master copy here, the
        parameters in the compute dtype read from it (the float32 ones ``state`` had are deleted)."""
        if state is None:
            return None
        if self.master:
            for x in jax.tree.leaves(state.params):
                x.delete()
            state = replace(state, params=self._read_tree(MASTER, self.shardings, self.compute_dtype))
        return replace(state, opt_state=None)

    # ------------------------------------------------------------------ the update

    def apply(self, state, metrics, grads):
        """The compiled step's outputs (state with the step counted, metrics, gradients) -> the updated state."""
        step = int(jax.device_get(state.step)) - 1
        return replace(state, params=self.update(state.params, grads, step)), metrics

    def update(self, params, grads, step: int):
        """Parameters after optimizer step ``step`` (0-based), streaming the moments through memory in chunks.

        Like a donated jit argument, ``params`` and ``grads`` are deleted as their new values are made.
        """
        self._expect(step, "update")
        self._mark(step, False)
        rule = make_rule(self.cfg, self.schedule, step)
        p_leaves, g_leaves = jax.tree.leaves(params), jax.tree.leaves(grads)
        new: dict[int, dict] = collections.defaultdict(dict)  # leaf -> segment key -> new values
        left = collections.Counter(s.leaf for s in self.segments)
        out = [None] * len(p_leaves)
        with ThreadPoolExecutor(1, "nvme-read") as reader, ThreadPoolExecutor(1, "nvme-write") as writer:
            reads, writes = collections.deque(), collections.deque()
            items = iter(self._items())
            for item in items:  # read-ahead: the first chunks
                reads.append((item, reader.submit(self._read, item)))
                if len(reads) == READ_AHEAD:
                    break
            current = None
            while reads:
                (seg, lo, hi), future = reads.popleft()
                bufs = future.result()
                nxt = next(items, None)
                if nxt is not None:
                    reads.append((nxt, reader.submit(self._read, nxt)))
                if current is None or current[0] is not seg:
                    p_flat = None if self.master else self._host(p_leaves[seg.leaf], seg).reshape(-1)
                    g_flat = self._host(g_leaves[seg.leaf], seg).reshape(-1)
                    current = (seg, p_flat, g_flat, np.empty(seg.size, self.compute_dtype))
                _, p_flat, g_flat, p_new = current
                if self.master:  # the master chunk is updated in place and written back; the device gets it rounded
                    bufs[0][...] = update_chunk(rule, bufs[0], g_flat[lo:hi], bufs[1:], self.decays[seg.leaf])
                    p_new[lo:hi] = bufs[0]
                else:
                    p_new[lo:hi] = update_chunk(rule, p_flat[lo:hi], g_flat[lo:hi], bufs, self.decays[seg.leaf])
                writes.append(writer.submit(self._write, (seg, lo, hi), bufs))  # write-behind
                while len(writes) > READ_AHEAD:
                    writes.popleft().result()
                if hi == seg.size:  # the segment is done: its new values, and the leaf once all its segments are
                    new[seg.leaf][seg.index] = p_new.reshape(seg.shape)
                    current = p_flat = g_flat = p_new = None
                    left[seg.leaf] -= 1
                    if left[seg.leaf] == 0:
                        out[seg.leaf] = self._put(seg.leaf, new.pop(seg.leaf), p_leaves, g_leaves)
            for w in writes:
                w.result()
        self._mark(step + 1, True)
        return jax.tree.unflatten(jax.tree.structure(params), out)

    def _items(self):
        for seg in self.segments:
            for lo in range(0, seg.size, self.chunk):
                yield seg, lo, min(lo + self.chunk, seg.size)

    def _read(self, item) -> list[np.ndarray]:
        seg, lo, hi = item
        bufs = [np.empty(hi - lo, np.float32) for _ in self.names]
        for m, buf in zip(self.names, bufs):
            read_into(self._fds[m], buf, (seg.offset + lo) * _ITEM, self.files[m])
        return bufs

    def _write(self, item, bufs) -> None:
        seg, lo, _ = item
        for m, buf in zip(self.names, bufs):
            write_all(self._fds[m], buf, (seg.offset + lo) * _ITEM)

    def _host(self, leaf: jax.Array, seg: Segment) -> np.ndarray:
        """The segment of ``leaf`` in host memory (a device-to-host copy on accelerators; a view on CPU)."""
        shard = next(s for s in leaf.addressable_shards if _key(s.index, leaf.shape) == seg.index)
        return np.asarray(shard.data, dtype=np.float32)

    def _put(self, i: int, values: dict, p_leaves: list, g_leaves: list) -> jax.Array:
        """Leaf ``i`` rebuilt from its new segments in its sharding; the old parameter and gradient deleted."""
        old = p_leaves[i]
        arrays = [jax.device_put(values[_key(s.index, old.shape)], s.data.sharding) for s in old.addressable_shards]
        leaf = jax.make_array_from_single_device_arrays(old.shape, old.sharding, arrays)
        for x in (old, g_leaves[i]):
            x.delete()
        return leaf

    # ------------------------------------------------------------------ checkpoints: the all-device layout

    def _moment_of(self, path) -> tuple[str, int] | None:
        """(moment, parameter leaf) of an optax state leaf's path; None for counters."""
        for j, key in enumerate(path):
            if isinstance(key, jax.tree_util.GetAttrKey) and key.name in self.moments:
                return key.name, self.leaf_of[tuple(path[j + 1:])]
        return None

    def _write_leaf(self, name: str, i: int, x: jax.Array) -> None:
        """This process's segments of ``x`` (parameter leaf ``i``'s shape, any sharding of this mesh) into file ``name``."""
        for seg in self.by_leaf[i]:
            write_all(self._fds[name], self._host(x, seg), seg.offset * _ITEM)

    def _write_tree(self, name: str, tree) -> None:
        for i, x in enumerate(jax.tree.leaves(tree)):
            self._write_leaf(name, i, x)

    def _read_leaf(self, name: str, i: int, sharding, dtype=np.float32) -> jax.Array:
        """Parameter leaf ``i``'s values in file ``name`` as an array in ``sharding``, cast to ``dtype``."""
        shape = self.shapes[i].shape

        def read(index):
            seg = self.seg_of[(i, _key(index, shape))]
            buf = np.empty(seg.size, np.float32)
            read_into(self._fds[name], buf, seg.offset * _ITEM, self.files[name])
            return buf.reshape(seg.shape).astype(dtype, copy=False)

        return jax.make_array_from_callback(shape, sharding, read)

    def _read_tree(self, name: str, shardings: list, dtype=np.float32):
        return jax.tree.unflatten(self.treedef, [self._read_leaf(name, i, s, dtype) for i, s in enumerate(shardings)])

    def host_shardings(self):
        """The parameters' shardings in host memory: where float32 parameters stop on their way to or from the files."""
        return jax.tree.unflatten(self.treedef, [s.with_memory_kind(HOST) for s in self.shardings])

    def restore_target(self, target):
        """``target`` (the held state's ShapeDtypeStructs) with what lives in the files as a checkpoint holds it,
        in host memory: the optax state and, with the master copy here, float32 parameters. Restore, then ``restored``."""
        opt = jax.tree.map(
            lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(self.mesh, spec, memory_kind=HOST)),
            self.opt_shapes, self.opt_specs)
        target = replace(target, opt_state=opt)
        if self.master:
            hosts = jax.tree.leaves(self.host_shardings())
            target = replace(target, params=jax.tree.unflatten(
                self.treedef, [jax.ShapeDtypeStruct(x.shape, np.float32, sharding=s) for x, s in zip(self.shapes, hosts)]))
        return target

    def restored(self, state):
        """Write a restored state (the all-device layout, arrays on this mesh) into the files, which then hold its
        step; returns it as the step holds it."""
        step = int(jax.device_get(state.step))
        self._mark(step, False)
        for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state):
            found = self._moment_of(path)
            if found is not None:
                self._write_leaf(*found, x)
        if self.master:
            self._write_tree(MASTER, state.params)
        self._mark(step, True)
        return self.held(state)

    def opt_state(self, step: int):
        """The optax state at ``step`` as arrays in host memory, for a checkpoint (counters = ``step``)."""
        self._expect(step, "save")

        def leaf(path, x, spec):
            sharding = NamedSharding(self.mesh, spec, memory_kind=HOST)
            found = self._moment_of(path)
            if found is None:
                return jax.device_put(jnp.full(x.shape, step, x.dtype), sharding)
            return self._read_leaf(found[0], found[1], sharding)

        return jax.tree_util.tree_map_with_path(leaf, self.opt_shapes, self.opt_specs)

    def checkpoint_state(self, state):
        """``state`` (as the step holds it) in the all-device layout, for a checkpoint: the optax state and, with the
        master copy here, the float32 parameters (not the device's rounded ones), read from the files into host memory."""
        step = int(jax.device_get(state.step))
        state = replace(state, opt_state=self.opt_state(step))
        if self.master:
            state = replace(state, params=self._read_tree(MASTER, jax.tree.leaves(self.host_shardings())))
        return state


def held_abstract(abstract, cfg: Config):
    """The run's abstract state as the compiled step holds it: no optimizer state (it is on disk) and, with the
    master parameters on disk, the parameters in the compute dtype."""
    shapes = replace(abstract.shapes, opt_state=None)
    if cfg.memory.params == NVME:
        dtype = jnp.dtype(cfg.train.dtype)
        shapes = replace(shapes, params=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), shapes.params))
    return replace(abstract, shapes=shapes, specs=replace(abstract.specs, opt_state=None))
