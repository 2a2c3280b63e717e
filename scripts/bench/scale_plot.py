#!/usr/bin/env python
"""Scale on paper: per-device memory and communication per step over abstract meshes of 8..1024 devices.

python scripts/bench/scale_plot.py [--config configs/llama2_7b.yaml] [--out docs] [--min 8] [--max 1024] [key=value ...]

Runs the planning chain of scripts/plan.py (config -> MeshManager.abstract(n) -> abstract_state)
for three layouts per device count, with no devices: FSDP over all devices; FSDP x tensor=8;
and data-parallel replicas of an FSDP group of 8. Prints a table and writes it to OUT/scale.md,
with a PNG plot OUT/scale_<config name>.png.

Memory per device is exact for the state (``framework.sharding.bytes_per_device`` on the real
PartitionSpecs): parameters, gradients (same shape, dtype and sharding as the parameters) and
optimizer state. Activations: with ``model.remat`` only each layer's input is kept
(n_layers * local batch * seq_len * d_model in the compute dtype); a layer's recompute peak is
not counted. Without remat they are not modelled (the memory planner of issue 5 will be).

Communication per device per step (bytes each device receives; ring collectives over k devices:
all-gather and reduce-scatter move (k-1)/k of the full tensor, all-reduce 2(k-1)/k):
- FSDP parameter all-gather, twice (forward, and again in the backward pass as ZeRO-3 and
  scanned/rematerialised layers do), in the parameter dtype (XLA may gather after the cast to the
  compute dtype, halving it);
- FSDP gradient reduce-scatter, once, in the parameter dtype;
- data-parallel all-reduce of each device's gradient shard;
- tensor-parallel activation all-reduces (Megatron): per layer 2 in the forward, 2 in the
  backward, 2 more in the remat recompute, of (local batch, seq_len, d_model) in the compute dtype.
Embedding/logit collectives and the loss's small reductions are left out.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import timing  # noqa: F401  first: puts scripts/ on sys.path for _cli (nothing here is timed)
import _cli

GiB = 2**30
LAYOUTS = {  # name -> mesh overrides for n devices
    "fsdp": lambda n: {"data": 1, "fsdp": n, "tensor": 1},
    "fsdp x tp8": lambda n: {"data": 1, "fsdp": n // 8, "tensor": 8},
    "dp x fsdp8": lambda n: {"data": n // 8, "fsdp": 8, "tensor": 1},
}


@dataclass
class ScaleRow:
    devices: int
    layout: str
    mesh: dict
    feasible: bool  # the global batch splits evenly over data*fsdp
    params: int
    grads: int
    opt_state: int
    activations: int
    fsdp_gather: float
    fsdp_reduce_scatter: float
    data_all_reduce: float
    tensor_all_reduce: float

    @property
    def memory(self) -> int:
        return self.params + self.grads + self.opt_state + self.activations

    @property
    def comm(self) -> float:
        return self.fsdp_gather + self.fsdp_reduce_scatter + self.data_all_reduce + self.tensor_all_reduce


def plan_row(cfg, n: int, layout: str) -> ScaleRow:
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec

    from framework import sharding
    from framework.config import MeshConfig
    from framework.mesh import MeshManager, describe
    from framework.state import abstract_state

    mesh_cfg = MeshConfig(**{**LAYOUTS[layout](n), "axis_names": cfg.mesh.axis_names})
    sizes = describe(MeshManager(mesh_cfg).abstract(n))
    d, f, t = (sizes[a] for a in mesh_cfg.axis_names)
    fsdp_axis = mesh_cfg.axis_names[1]
    a = abstract_state(cfg, sizes)
    params = sharding.bytes_per_device(a.shapes.params, a.specs.params, sizes)
    opt = sharding.bytes_per_device(a.shapes.opt_state, a.specs.opt_state, sizes)

    # Parameter (and gradient) bytes that FSDP gathers / reduce-scatters: leaves sharded over fsdp.
    gathered = 0
    is_spec = lambda s: isinstance(s, PartitionSpec)
    for x, spec in zip(jax.tree.leaves(a.shapes.params), jax.tree.leaves(a.specs.params, is_leaf=is_spec)):
        axes = [ax for entry in spec if entry for ax in ((entry,) if isinstance(entry, str) else entry)]
        if fsdp_axis in axes:
            gathered += sharding.bytes_per_device([x], [spec], sizes) * f  # the fsdp-full (tensor-local) size

    t_cfg, m = cfg.train, cfg.model
    replicas = d * f
    feasible = t_cfg.global_batch % replicas == 0
    local_batch = t_cfg.global_batch / replicas
    act_item = np.dtype(t_cfg.dtype).itemsize
    layer_act = local_batch * t_cfg.seq_len * m.d_model * act_item
    tp_per_layer = 6 if m.remat else 4
    return ScaleRow(
        devices=n, layout=layout, mesh=sizes, feasible=feasible,
        params=params, grads=params, opt_state=opt,
        activations=int(m.n_layers * layer_act) if m.remat else 0,
        fsdp_gather=2 * gathered * (f - 1) / f,
        fsdp_reduce_scatter=gathered * (f - 1) / f,
        data_all_reduce=2 * params * (d - 1) / d,
        tensor_all_reduce=m.n_layers * tp_per_layer * 2 * layer_act * (t - 1) / t,
    )


def device_counts(lo: int, hi: int) -> list[int]:
    return [2**k for k in range(int(math.log2(lo)), int(math.log2(hi)) + 1)]


def markdown(rows: list[ScaleRow], cfg_name: str, cfg) -> str:
    t = cfg.train
    lines = [
        f"Config `{cfg_name}`: {t.global_batch} x {t.seq_len} tokens per step, compute {t.dtype}, "
        f"params {t.param_dtype}, remat {cfg.model.remat}. GiB per device; communication is what each device "
        "receives per step. `-`: the global batch does not split over data x fsdp (needs a larger batch or tensor parallelism).",
        "",
        "| devices | layout | mesh (data, fsdp, tensor) | params | grads | opt state | remat acts | memory total "
        "| FSDP gather | FSDP reduce-scatter | DP all-reduce | TP all-reduce | comm total |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mesh = f"({', '.join(str(v) for v in r.mesh.values())})"
        if not r.feasible:
            lines.append(f"| {r.devices} | {r.layout} | {mesh} | {r.params / GiB:.2f} | {r.grads / GiB:.2f} | "
                         f"{r.opt_state / GiB:.2f} | - | - | - | - | - | - | - |")
            continue
        lines.append(
            f"| {r.devices} | {r.layout} | {mesh} | {r.params / GiB:.2f} | {r.grads / GiB:.2f} | {r.opt_state / GiB:.2f} "
            f"| {r.activations / GiB:.2f} | **{r.memory / GiB:.2f}** | {r.fsdp_gather / GiB:.2f} | "
            f"{r.fsdp_reduce_scatter / GiB:.2f} | {r.data_all_reduce / GiB:.2f} | {r.tensor_all_reduce / GiB:.2f} "
            f"| **{r.comm / GiB:.2f}** |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[ScaleRow], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_comm) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, layout in enumerate(LAYOUTS):
        rs = [r for r in rows if r.layout == layout and r.feasible]
        n = [r.devices for r in rs]
        ax_mem.plot(n, [r.memory / GiB for r in rs], "o-", color=f"C{i}", label=layout)
        ax_comm.plot(n, [r.comm / GiB for r in rs], "o-", color=f"C{i}", label=f"{layout}: total")
        ax_comm.plot(n, [(r.fsdp_gather + r.fsdp_reduce_scatter) / GiB for r in rs], ":", color=f"C{i}",
                     label=f"{layout}: FSDP part")
    for ax in (ax_mem, ax_comm):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("devices")
        ax.grid(alpha=0.3, which="both")
    ax_mem.set_yscale("log")
    ax_comm.set_yscale("log")
    ax_mem.set(ylabel="GiB per device", title="state (+ remat layer inputs) per device")
    ax_comm.set(ylabel="GiB received per device per step", title="predicted communication per step")
    ax_mem.legend(fontsize=8)
    ax_comm.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/llama2_7b.yaml")
    p.add_argument("--out", default="docs", help="directory for scale.md and the PNG (default docs)")
    p.add_argument("--min", type=int, default=8, help="fewest devices (a power of two, default 8)")
    p.add_argument("--max", type=int, default=1024, help="most devices (a power of two, default 1024)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    with _cli.user_errors():
        from framework.config import ConfigError, load_config

        for name in ("min", "max"):
            v = getattr(args, name)
            if v < 8 or v & (v - 1):
                raise ConfigError(f"--{name}={v}: expected a power of two of at least 8")
        cfg = load_config(args.config, args.overrides)
        rows = [plan_row(cfg, n, layout) for n in device_counts(args.min, args.max) for layout in LAYOUTS]
        name = Path(args.config).stem
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        table = markdown(rows, args.config, cfg)
        (out / "scale.md").write_text(
            f"# Scale on paper: {name}\n\nGenerated by `python scripts/bench/scale_plot.py --config {args.config}` "
            f"(no devices needed). Model and assumptions: see the script's docstring.\n\n"
            f"![memory and communication vs devices](scale_{name}.png)\n\n{table}"
        )
        from framework.state import abstract_state

        count = abstract_state(cfg, rows[0].mesh).param_count
        plot(rows, out / f"scale_{name}.png", f"{name} ({count / 1e9:.2f}B parameters), {cfg.train.global_batch} x {cfg.train.seq_len} tokens/step")
    print(table, end="")
    print(f"wrote {out / 'scale.md'} and {out / f'scale_{name}.png'}")


if __name__ == "__main__":
    main()
