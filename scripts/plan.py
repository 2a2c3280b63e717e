#!/usr/bin/env python
"""Plan a run without its devices: mesh, parameter count, and each parameter's PartitionSpec.

python scripts/plan.py --config configs/llama2_7b.yaml --devices 256 [--json] [key=value ...]
Runs the same chain as training (config -> mesh -> abstract model -> shardings) on an
AbstractMesh of any size, so what it prints is what training will do.
"""
from __future__ import annotations

import argparse
import math

import _cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--devices", type=int, default=None, help="devices to plan for (default: those present)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--estimate", action="store_true",
                   help="memory section from the planner's estimate even where the devices exist (default: compiled)")
    p.add_argument("--measure", action="store_true",
                   help="compile the step on the available devices and count its collective bytes (broadcast section)")
    p.add_argument("overrides", nargs="*")
    return p.parse_intermixed_args(argv)


def build_report(cfg, n_devices: int, estimate: bool = False) -> dict:
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
    from framework.metrics import active_param_count, model_flops

    flops = model_flops(cfg, abstract.param_count)
    report = {"devices": n_devices, "mesh": axis_sizes, "param_count": abstract.param_count,
              "active_param_count": active_param_count(cfg, abstract.param_count),
              "flops_per_step": flops.total, "flops_formula": flops.FORMULA, "params": params}
    report["memory"] = memory_section(cfg, n_devices, abstract, estimate)
    report["pipeline"] = pipeline_section(cfg, axis_sizes, abstract, report["memory"]["placement"]["params"])
    report["context"] = context_section(cfg, axis_sizes)
    # ---- broadcast modes (issue 6): the per-layer job list
    report["broadcast"] = None if abstract.broadcast_plan is None else abstract.broadcast_plan.to_dict()
    from framework.broadcast.experts import plan_experts

    experts = plan_experts(cfg, axis_sizes, cfg.train.global_batch // cfg.train.grad_accum)  # MoE layers: tokens travel
    report["experts"] = None if experts is None else experts.to_dict()
    if abstract.broadcast_plan is None:  # auto fell back to XLA's propagation: say why
        from framework.broadcast import unplannable

        report["broadcast_fallback"] = unplannable(cfg, axis_sizes)
    return report


def measure_broadcast(cfg, n_devices: int) -> dict:
    """Compile the real step on ``n_devices`` devices; measured collective bytes next to the plan's."""
    import jax

    from framework.collectives import count_compiled
    from framework.config import ConfigError
    from framework.train import Trainer

    if n_devices > jax.device_count():
        raise ConfigError(f"--measure: --devices={n_devices} but only {jax.device_count()} devices are present")
    trainer = Trainer(cfg, devices=jax.devices()[:n_devices])
    trainer.compile()
    report = count_compiled(trainer.compiled_step, n_devices)  # per step: loop bodies count once per iteration
    plan = trainer.broadcast_plan  # made for the micro-batch the step compiled for
    accum = trainer.cfg.train.grad_accum  # the plan's unit is one micro-batch
    by_layer = {k: v // accum for k, v in report.by_layer().items()}
    layers = [] if plan is None else [
        {"name": layer.name, "mode": layer.mode, "predicted": layer.predicted_bytes, "measured": by_layer.get(layer.name, 0)}
        for layer in plan.layers
    ]
    return {
        "devices": n_devices, "unit": "bytes per device per micro-batch (forward + backward)",
        "predicted_total": None if plan is None else plan.total_bytes, "measured_total": report.total // accum,
        "predicted_layers": None if plan is None else plan.layer_bytes,
        "measured_layers": sum(v for k, v in by_layer.items() if k is not None),
        "measured_unattributed": by_layer.get(None, 0), "by_kind": {k: v // accum for k, v in report.by_kind().items()},
        "layers": layers, "experts_all_to_all": report.by_kind()["all-to-all"] // accum,  # only MoE layers exchange so
    }


def memory_section(cfg, n_devices: int, abstract, estimate: bool = False) -> dict:
    """Memory tiers: compiled on the devices when they exist (``auto`` placed on the compiled step), estimated otherwise.

    Each category's figure says how it was obtained (``figures``): exact (shard shapes),
    compiled (the step's ``memory_analysis()``) or estimated (residuals of the traced loss).
    """
    import jax

    from framework import memory, sharding
    from framework.mesh import MeshManager, describe
    from framework.train import Trainer
    from framework.train.objective import loss_for_config

    if n_devices <= jax.device_count() and not estimate:
        return Trainer(cfg, devices=jax.devices()[:n_devices]).memory_plan().to_dict()
    axis_sizes = describe(MeshManager(cfg.mesh).abstract(n_devices))
    batch_axes = sharding.batch_axes(cfg.sharding.activation_rules, axis_sizes)
    needs = memory.estimate_needs(cfg, abstract, axis_sizes, batch_axes, cfg.train.grad_accum,
                                  loss_for_config(cfg, axis_sizes))
    budget = memory.resolve_budget(cfg.memory, None, cfg.train.micro_batch)
    plan = memory.plan_memory(cfg.memory, needs, axis_sizes, budget)
    memory.check_auto_offload(cfg, plan.placement, budget)
    return plan.to_dict()


def context_section(cfg, axis_sizes: dict) -> dict | None:
    """Context parallelism: the sequence split, tokens per device and the attention (with the cost model's reason)."""
    import jax.numpy as jnp

    from framework import sharding
    from models import context

    size = math.prod(axis_sizes.get(a, 1) for a in sharding.rules_table(cfg.sharding.activation_rules).get("length", ()))
    if size == 1:
        return None
    seq = cfg.train.seq_len
    mode, reason = context.mode_for(cfg.model, seq, size, jnp.dtype(cfg.train.dtype).itemsize)
    return {"size": size, "seq_len": seq, "tokens_per_device": seq // size, "attention": mode, "reason": reason}


def pipeline_section(cfg, axis_sizes: dict, abstract, param_memory: str) -> dict | None:
    """Per pipeline stage: layers, bytes per device (params in ``param_memory``), bubble (None without a ``stage`` axis)."""
    from framework import memory, sharding

    batch_axes = sharding.batch_axes(cfg.sharding.activation_rules, axis_sizes)
    plan = memory.pipeline_plan(cfg, abstract, axis_sizes, batch_axes, cfg.train.grad_accum, param_memory)
    return None if plan is None else plan.to_dict()


def print_text(report: dict) -> None:
    active = report["active_param_count"]
    per_token = "" if active == report["param_count"] else f" in all, {active:,} active per token (MoE top_k experts)"
    print(f"mesh {report['mesh']} over {report['devices']} devices; {report['param_count']:,} parameters{per_token}")
    width = max(len(p["name"]) for p in report["params"])
    print(f"{'name':<{width}}  {'shape':<22} {'dtype':<9} spec")
    for p in report["params"]:
        spec = "(" + ", ".join("None" if a is None else str(a) for a in p["spec"]) + ")"
        print(f"{p['name']:<{width}}  {str(tuple(p['shape'])):<22} {p['dtype']:<9} {spec}")
    from framework.memory import format_plan

    print("\n".join(format_plan(report["memory"])))
    if report.get("pipeline") is not None:
        from framework.pipeline import format_plan as format_pipeline

        print("\n".join(format_pipeline(report["pipeline"])))
    c = report.get("context")
    if c is not None:
        print(f"context: each sequence of {c['seq_len']:,} tokens split over {c['size']} devices ({c['tokens_per_device']:,} "
              f"each, zig-zag: chunks d and {2 * c['size'] - 1}-d); attention {c['attention']} ({c['reason']})")
    print_broadcast(report)


def print_broadcast(report: dict) -> None:
    """The broadcast job list, and measured next to predicted bytes when --measure ran."""
    from framework.broadcast import BroadcastPlan, LayerPlan

    plan = report.get("broadcast")
    if plan is None and report.get("broadcast_fallback"):
        print(f"broadcast: no plan, XLA decides every layer's collectives ({report['broadcast_fallback']})")
    elif plan is None:
        print("broadcast: mode none (XLA decides every layer's collectives)")
    else:
        layers = [LayerPlan(**{k: tuple(v) if k == "kernel_shape" else v for k, v in layer.items() if k != "predicted_bytes"})
                  for layer in plan["layers"]]
        print(BroadcastPlan(plan["devices"], tuple(plan["axes"]), plan["compress"], layers, plan["other_param_bytes"],
                            plan["budget_bytes"], plan["xla_table_bytes"]).table())
    m = report.get("broadcast_measured")
    if report.get("experts") is not None:
        from framework.broadcast.experts import format_experts

        measured = "" if m is None else f" (measured {m['experts_all_to_all']:,})"
        print(format_experts(report["experts"]) + measured)
    if m is None:
        return
    print(f"measured on {m['devices']} devices (bytes per device per micro-batch):")
    if m["layers"]:
        width = max(len(layer["name"]) for layer in m["layers"])
        print(f"  {'layer':<{width}}  {'mode':<6} {'predicted':>12} {'measured':>12}")
        for layer in m["layers"]:
            print(f"  {layer['name']:<{width}}  {layer['mode']:<6} {layer['predicted']:>12,} {layer['measured']:>12,}")
    pred = "-" if m["predicted_total"] is None else f"{m['predicted_total']:,}"
    print(f"  layers: predicted {m['predicted_layers'] or 0:,} measured {m['measured_layers']:,}; "
          f"unattributed measured {m['measured_unattributed']:,}")
    print(f"  total: predicted {pred} measured {m['measured_total']:,}; by kind {m['by_kind']}")


def main(argv=None) -> None:
    args = parse_args(argv)
    _cli.emulate_cpu_devices(8)
    with _cli.user_errors():
        import jax

        from framework.config import load_config

        cfg = load_config(args.config, args.overrides)
        report = build_report(cfg, args.devices or jax.device_count(), args.estimate)
        if args.measure:
            report["broadcast_measured"] = measure_broadcast(cfg, args.devices or jax.device_count())
    _cli.print_report(report, args.json, print_text)


if __name__ == "__main__":
    main()
