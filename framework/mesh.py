"""MeshManager: where the device mesh is built (real, device subset, abstract, multi-slice).

Axis types are ``AxisType.Auto`` on purpose. meshpilot shards by giving ``jax.jit``
in/out shardings and constraining activations at layer boundaries, and lets XLA's SPMD
partitioner propagate the rest (the classic GSPMD model, as MaxText does). Explicit axes
(the default of ``jax.make_mesh`` since jax 0.7) would need an ``out_sharding=`` on every
ambiguous contraction inside the models, tying model code to one mesh layout; with Auto
axes the same model code runs on any factorisation.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh

from framework.config import ConfigError, MeshConfig

STAGE = "stage"  # the pipeline axis (framework/pipeline.py): outermost, so each stage is a contiguous device subset
EXPERT = "expert"  # expert parallelism: a mixture-of-experts layer's experts are split over it
CONTEXT = "context"  # context parallelism: activations split along the sequence
OPTIONAL_AXES = (STAGE, EXPERT, CONTEXT)  # in the mesh only when their size is not 1, so meshes without them stay as they were


def factorizations(n: int, axis_names: Sequence[str] = ("data", "fsdp", "tensor")) -> list[dict[str, int]]:
    """Every way to write ``n`` as an ordered product of one size per axis."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    out = []
    for sizes in itertools.product(divisors, repeat=len(axis_names) - 1):
        rest, rem = divmod(n, math.prod(sizes))
        if rem == 0:
            out.append(dict(zip(axis_names, (*sizes, rest))))
    return out


class MeshManager:
    """Turns the ``mesh`` config section into meshes for a given device count or device list."""

    def __init__(self, cfg: MeshConfig):
        self.cfg = cfg
        self.axis_names = tuple(cfg.axis_names)

    def requested(self) -> dict[str, int]:
        """Axis -> configured size (-1: fill), outermost first: stage, data, fsdp, expert, context, tensor (the
        innermost axis gets neighbouring devices: tensor parallelism moves the most bytes per step)."""
        data, fsdp, tensor = self.axis_names
        c = self.cfg
        sizes = {STAGE: c.stage, data: c.data, fsdp: c.fsdp, EXPERT: c.expert, CONTEXT: c.context, tensor: c.tensor}
        return _without_unit_optional_axes(sizes)

    def axis_sizes(self, n_devices: int) -> dict[str, int]:
        """Sizes per axis for ``n_devices`` (the per-slice share when multi-slice), -1 filled.

        The ``stage``, ``expert`` and ``context`` axes are there only when their size is not 1 (also after a
        -1 fill), so a mesh without a pipeline, experts or context split is the same mesh it always was.
        """
        sizes = self.requested()
        for name, s in sizes.items():
            if s == 0 or s < -1:
                raise ConfigError(f"mesh.{name}={s}: expected a positive size or -1")
        if self.cfg.dcn_data < 1:
            raise ConfigError(f"mesh.dcn_data={self.cfg.dcn_data}: expected a positive integer")
        if n_devices % self.cfg.dcn_data:
            raise ConfigError(
                f"mesh.dcn_data={self.cfg.dcn_data} does not divide the {n_devices} available devices"
            )
        per_slice = n_devices // self.cfg.dcn_data
        fill = [k for k, s in sizes.items() if s == -1]
        if len(fill) > 1:
            raise ConfigError(f"mesh: at most one axis may be -1, got {', '.join('mesh.' + k for k in fill)}")
        known = math.prod(s for s in sizes.values() if s != -1)
        if fill:
            if per_slice % known:
                raise ConfigError(
                    f"mesh: {self._describe(sizes)} cannot fill mesh.{fill[0]}=-1 from {per_slice} devices "
                    f"({per_slice} is not divisible by {known})"
                )
            sizes[fill[0]] = per_slice // known
        elif known != per_slice:
            raise ConfigError(
                f"mesh: {self._describe(sizes)} multiplies to {known}, expected the device count {per_slice}"
                " (set one axis to -1 to fill it)"
            )
        if self.cfg.dcn_data > 1:
            if STAGE in sizes:
                raise ConfigError(f"mesh.stage={sizes[STAGE]} with mesh.dcn_data={self.cfg.dcn_data}: pipeline stages are "
                                  "not supported across slices; use mesh.dcn_data=1")
            sizes[self.axis_names[0]] *= self.cfg.dcn_data
        return _without_unit_optional_axes(sizes)

    @staticmethod
    def _describe(sizes: dict[str, int]) -> str:
        return " ".join(f"mesh.{k}={v}" for k, v in sizes.items())

    def build(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
        """A Mesh over ``devices`` (default: all), e.g. only the first k of n when some are gone."""
        devices = list(jax.devices() if devices is None else devices)
        sizes = self.axis_sizes(len(devices))
        shape = tuple(sizes.values())
        if self.cfg.dcn_data > 1:
            grid = self._hybrid_grid(devices, shape)
        else:
            grid = self._local_grid(devices, shape)
        return Mesh(grid, tuple(sizes), axis_types=(AxisType.Auto,) * len(shape))

    def abstract(self, n_devices: int) -> AbstractMesh:
        """A device-less mesh of any size, for planning and lowering without the hardware."""
        sizes = self.axis_sizes(n_devices)
        return AbstractMesh(tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes))

    @staticmethod
    def _local_grid(devices: list, shape: tuple[int, ...]) -> np.ndarray:
        if len(devices) == len(jax.devices()) and devices == list(jax.devices()):
            # Topology-aware order on real accelerators (ICI rings); plain order elsewhere.
            from jax.experimental import mesh_utils

            try:
                return mesh_utils.create_device_mesh(shape, devices=devices)
            except (ValueError, NotImplementedError, AssertionError):
                pass
        return np.asarray(devices, dtype=object).reshape(shape)

    def _hybrid_grid(self, devices: list, shape: tuple[int, ...]) -> np.ndarray:
        """Multi-slice: the data axis spans slices (DCN), the others stay inside a slice (ICI)."""
        n_slices = self.cfg.dcn_data
        per_slice_shape = (shape[0] // n_slices, *shape[1:])
        if all(hasattr(d, "slice_index") for d in devices):
            from jax.experimental import mesh_utils

            return mesh_utils.create_hybrid_device_mesh(
                per_slice_shape, (n_slices,) + (1,) * (len(shape) - 1), devices=devices, allow_split_physical_axes=True
            )
        # No slice information (CPU, single-slice GPU): contiguous groups of devices stand in for slices.
        return group_into_slices(devices, n_slices, per_slice_shape)


def _without_unit_optional_axes(sizes: dict[str, int]) -> dict[str, int]:
    return {name: n for name, n in sizes.items() if n != 1 or name not in OPTIONAL_AXES}


def group_into_slices(devices: list, n_slices: int, per_slice_shape: tuple[int, ...]) -> np.ndarray:
    """Stack ``n_slices`` contiguous device groups along the first (data) axis."""
    per = len(devices) // n_slices
    groups = [np.asarray(devices[i * per:(i + 1) * per], dtype=object).reshape(per_slice_shape) for i in range(n_slices)]
    return np.concatenate(groups, axis=0)


def describe(mesh) -> dict[str, int]:
    """{axis: size} of a Mesh or AbstractMesh, as written to metrics and plans."""
    return {name: int(size) for name, size in zip(mesh.axis_names, mesh.axis_sizes)}
