#!/usr/bin/env python
"""Plan a run without its devices: mesh, parameter count, and each parameter's PartitionSpec.

python scripts/plan.py --config configs/llama2_7b.yaml --devices 256 [--json] [key=value ...]
Runs the same chain as training (config -> mesh -> abstract model -> shardings) on an
AbstractMesh of any size, so what it prints is what training will do.
"""
from __future__ import annotations

import argparse
import json
import sys

import _cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--devices", type=int, default=None, help="devices to plan for (default: those present)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def build_report(cfg, n_devices: int) -> dict:
    import jax

    from framework.mesh import MeshManager, describe
    from framework.state import abstract_state

    mesh = MeshManager(cfg.mesh).abstract(n_devices)
    axis_sizes = describe(mesh)
    abstract = abstract_state(cfg, axis_sizes)
    params = []
    flat_specs = dict(jax.tree_util.tree_leaves_with_path(abstract.specs.params, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    for path, x in jax.tree_util.tree_leaves_with_path(abstract.shapes.params):
        params.append({
            "name": "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path),
            "shape": list(x.shape),
            "dtype": str(x.dtype),
            "spec": [None if a is None else a if isinstance(a, str) else list(a) for a in flat_specs[path]],
        })
    return {"devices": n_devices, "mesh": axis_sizes, "param_count": abstract.param_count, "params": params}


def print_text(report: dict) -> None:
    print(f"mesh {report['mesh']} over {report['devices']} devices; {report['param_count']:,} parameters")
    width = max(len(p["name"]) for p in report["params"])
    print(f"{'name':<{width}}  {'shape':<22} {'dtype':<9} spec")
    for p in report["params"]:
        spec = "(" + ", ".join("None" if a is None else str(a) for a in p["spec"]) + ")"
        print(f"{p['name']:<{width}}  {str(tuple(p['shape'])):<22} {p['dtype']:<9} {spec}")


def main(argv=None) -> None:
    args = parse_args(argv)
    _cli.emulate_cpu_devices(8)
    with _cli.user_errors():
        import jax

        from framework.config import load_config

        cfg = load_config(args.config, args.overrides)
        report = build_report(cfg, args.devices or jax.device_count())
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print_text(report)


if __name__ == "__main__":
    main()
