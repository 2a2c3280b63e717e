#!/usr/bin/env python
"""One self-contained HTML page about a run: python scripts/report.py RUN_DIR [--out FILE]

Reads what a run already wrote (config.yaml, metrics.jsonl, goodput.json, tryrun.jsonl, plans.json, compiled/,
profile/) and writes RUN_DIR/report.html (or FILE): the config, loss and eval curves, throughput and MFU, the
memory timeline, the goodput breakdown, the try-run decisions and each layout's memory and broadcast plans. The
page needs no network: its script and style are inlined (scripts/report_assets/), its charts are SVG drawn from
the data embedded in it. A directory that is not a run's is one line and exit code 2.
"""
from __future__ import annotations

import argparse
import html
import json
import statistics
from pathlib import Path

import _cli
from _runfiles import mesh_changes, read_json, read_jsonl, read_metrics

ASSETS = Path(__file__).resolve().parent / "report_assets"
KINDS = ("device", "pinned_host")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory written by scripts/train.py")
    p.add_argument("--out", default=None, help="the HTML file to write (default RUN_DIR/report.html)")
    return p.parse_intermixed_args(argv)


def load_run(run_dir: Path) -> dict:
    """Everything the page shows, read from the run dir; one line (ConfigError) when it is not a run's."""
    from framework.config import ConfigError

    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: not a directory (expected a run directory written by scripts/train.py)")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: no config.yaml (not a run directory written by scripts/train.py)")
    records, evals = read_metrics(run_dir)
    tryrun = run_dir / "tryrun.jsonl"
    compiled = sorted(p.parent for p in (run_dir / "compiled").glob("*/layout.json"))  # logging.dump_hlo
    return {
        "dir": run_dir, "config": (run_dir / "config.yaml").read_text(), "records": records, "evals": evals,
        "goodput": read_json(run_dir / "goodput.json", "runs and total"),
        "decisions": read_jsonl(tryrun) if tryrun.is_file() else [],
        "plans": (read_json(run_dir / "plans.json", "layouts") or {}).get("layouts", []),
        "compiled": [{**read_json(d / "layout.json", "a compiled layout"), "name": d.name,
                      "cost": read_json(d / "cost_analysis.json", "cost_analysis()") or {}} for d in compiled],
        "traces": sorted((run_dir / "profile").rglob("*.xplane.pb")),
    }


# ---------------------------------------------------------------- charts (drawn by report_assets/report.js)

def series(name: str, records: list[dict], key: str, scale: float = 1.0, **style) -> dict:
    return {"name": name, "points": [[r["step"], r[key] * scale] for r in records if r.get(key) is not None], **style}


def charts(run: dict) -> list[dict]:
    records, evals = run["records"], run["evals"]
    marks = [[step, "mesh " + "x".join(str(v) for v in mesh.values())] for step, mesh in mesh_changes(records)]
    loss = [series("train", records, "loss")] + ([series("eval (held out)", evals, "eval_loss", markers=True)] if evals else [])
    out = [{"id": "loss", "type": "line", "title": "loss", "xlabel": "step", "ylabel": "loss", "series": loss},
           {"id": "throughput", "type": "line", "title": "throughput (the first step includes its start-up)",
            "xlabel": "step", "ylabel": "tokens/s", "zero": True, "vlines": marks,
            "series": [series("tokens/s", records, "tokens_per_s")]}]
    if any("mfu" in r for r in records):
        out.append({"id": "mfu", "type": "line", "title": "MFU (model FLOPs / devices' bf16 peak)", "xlabel": "step",
                    "ylabel": "MFU %", "zero": True, "series": [series("MFU", records, "mfu", 100.0)]})
    elif any("model_flops_per_s" in r for r in records):
        out.append({"id": "mfu", "type": "line", "title": "model TFLOP/s (no known peak on this device: no MFU)",
                    "xlabel": "step", "ylabel": "TFLOP/s", "zero": True,
                    "series": [series("model TFLOP/s", records, "model_flops_per_s", 1e-12)]})
    memory = [r for r in records if "device_bytes_in_use" in r]
    if memory:
        sources = ", ".join(sorted({r["device_memory_source"] for r in memory}))
        out += [{"id": "device_memory", "type": "line", "title": f"device memory per device ({sources})", "xlabel": "step",
                 "ylabel": "MiB", "zero": True, "series": [series("in use", memory, "device_bytes_in_use", 2**-20),
                                                          series("peak", memory, "device_peak_bytes", 2**-20, dash=True)]},
                {"id": "host_memory", "type": "line", "title": "host memory (process 0)", "xlabel": "step",
                 "ylabel": "MiB", "zero": True, "series": [series("RSS", memory, "host_rss_bytes", 2**-20),
                                                          series("peak RSS", memory, "host_peak_rss_bytes", 2**-20, dash=True)]}]
    if run["goodput"]:
        out.append(goodput_chart(run["goodput"]))
    if run["decisions"]:
        out.append(tryrun_chart(records, run["decisions"]))
    return out


def goodput_chart(history: dict) -> dict:
    from framework.goodput import PARTS

    runs = history["runs"]
    rows = [*runs, history["total"]] if len(runs) > 1 else runs
    labels = [f"run {i + 1}" for i in range(len(runs))] + (["total"] if len(rows) > len(runs) else [])
    parts = [*PARTS, "unaccounted"]
    return {"id": "goodput", "type": "bars", "title": "goodput: where the wall time went (seconds)",
            "parts": [p.replace("_", " ") for p in parts],
            "rows": [{"label": label, "values": [r.get(f"{p}_s", 0.0) for p in parts], "note": f"goodput {r['goodput']:.1%}"}
                     for label, r in zip(labels, rows)]}


def tryrun_chart(records: list[dict], decisions: list[dict]) -> dict:
    candidates = [[d["step"], c["samples_per_s"]] for d in decisions for c in d.get("candidates", [])]
    return {"id": "tryrun", "type": "line", "title": "try-run decisions (samples/s)", "xlabel": "step", "ylabel": "samples/s",
            "zero": True, "series": [series("run", records, "samples_per_s"),
                                     {"name": "baseline", "points": [[d["step"], d["baseline"]["samples_per_s"]] for d in decisions],
                                      "markers_only": True},
                                     {"name": "candidates", "points": candidates, "markers_only": True},
                                     {"name": "chosen", "points": [[d["step"], d["chosen"]["samples_per_s"]] for d in decisions],
                                      "markers_only": True}]}


# ---------------------------------------------------------------- tables

def esc(value) -> str:
    return html.escape(str(value))


def num(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.{digits}f}"


def table(headers: list[str], rows: list[list], numeric: set[int] = frozenset(), classes: list[str] | None = None) -> str:
    head = f"<tr>{''.join(f'<th>{esc(h)}</th>' for h in headers)}</tr>" if headers else ""
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f'<td class="num">{esc(c)}</td>' if j in numeric else f"<td>{esc(c)}</td>" for j, c in enumerate(row))
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def mesh_text(mesh: dict | None) -> str:
    return "-" if not mesh else " x ".join(f"{k} {v}" for k, v in mesh.items())


def summary(run: dict) -> str:
    records, evals, g = run["records"], run["evals"], run["goodput"]
    steady = [r["step_time_s"] for r in records[1:]] or [records[0]["step_time_s"]]
    rows = [["steps logged", f"{records[0]['step']} .. {records[-1]['step']} ({len(records)} records)"],
            ["final loss", num(records[-1]["loss"], 4)],
            ["best eval loss", num(min(r["eval_loss"] for r in evals), 4) if evals else "no evaluation"],
            ["meshes", "; ".join(dict.fromkeys(mesh_text(r.get("mesh")) for r in records))],
            ["median step time (s, after the first)", num(statistics.median(steady), 4)],
            ["median tokens/s", num(statistics.median(r["tokens_per_s"] for r in records), 0)]]
    mfu = [r["mfu"] for r in records if "mfu" in r]
    if mfu:
        rows.append(["median MFU", f"{statistics.median(mfu):.1%}"])
    if g:
        t = g["total"]
        rows.append(["goodput", f"{t['goodput']:.1%} of {t['wall_s']:.1f} s wall over {len(g['runs'])} run(s)"])
    rows.append(["try-run decisions", str(len(run["decisions"]))])
    rows.append(["profiler traces", ", ".join(str(p.relative_to(run["dir"])) for p in run["traces"]) or "none"])
    return table([], rows).replace("<table>", '<table class="kv">', 1)


def tryrun_tables(decisions: list[dict]) -> str:
    if not decisions:
        return '<p class="note">No try-run decisions (elastic.enabled=false, or no trigger).</p>'
    parts = []
    for d in decisions:
        chosen = d["chosen"]
        verdict = (f"adopted {chosen['kind']} {mesh_text(chosen['mesh'])}" if d["adopted"]
                   else f"kept the baseline {mesh_text(chosen['mesh'])}")
        parts.append(f"<h3>step {d['step']} ({esc(d['trigger'])}): {d['available_devices']} devices available, "
                     f"{d['min_devices']} per model replica: {esc(verdict)}</h3>")
        rows, classes = [], []
        for row in (d["baseline"], *d["candidates"]):
            rows.append([row["kind"], mesh_text(row["mesh"]), row["n_devices"], row["grad_accum"], num(row["samples_per_s"]),
                         "" if row is d["baseline"] else f"{row['improvement']:+.1%}", num(row.get("compile_s"), 2),
                         num(row.get("peak_bytes_per_device")), row.get("source", "")])
            classes.append("chosen" if row["mesh"] == chosen["mesh"] and row["kind"] == chosen["kind"] else "")
        for row in d.get("dropped", []):
            rows.append([row["kind"], "-", row["n_devices"], "", "dropped", "", "", "", row["reason"]])
            classes.append("")
        parts.append(table(["kind", "mesh", "devices", "accum", "samples/s", "vs base", "compile s",
                            "peak bytes/device", "source"], rows, {2, 3, 4, 5, 6, 7}, classes))
    return "".join(parts)


def plan_tables(plans: list[dict]) -> str:
    if not plans:
        return '<p class="note">No plans.json (a run from before it was written).</p>'
    parts = []
    for p in plans:
        m = p["memory"]
        parts.append(f"<h3>from step {p['step']}: {esc(mesh_text(p['mesh']))} ({p['devices']} devices, "
                     f"grad_accum {p['grad_accum']})</h3>")
        rows = [[c, *(num(b[k]) for k in KINDS), m["figures"].get(c, ""), m["placement"].get(c, ""),
                 m["reasons"].get(c, "")] for c, b in m["bytes_per_device"].items()]
        rows.append(["total", *(num(m["totals"][k]) for k in KINDS), "", "",
                     "" if m["budget_bytes"] is None else f"budget {m['budget_bytes']:,} B"])
        parts.append("<p>memory plan: bytes per device</p>" + table(
            ["category", *KINDS, "figure", "placement", "why"], rows, {1, 2}))
        parts.append(f'<p class="note">{esc(m["activation_source"])}</p>')
        b = p["broadcast"]
        if b is None:
            why = p.get("broadcast_fallback") or "broadcast.mode=none: every layer is left to XLA's sharding propagation"
            parts.append(f'<p class="note">broadcast plan: none ({esc(why)})</p>')
            continue
        rows = [[layer["name"], layer["kind"], layer["repeats"], layer["mode"], layer["compress"], num(layer["predicted_bytes"]),
                 layer["reason"]] for layer in b["layers"]]
        parts.append(f"<p>broadcast job list over P={b['devices']} devices {esc(tuple(b['axes']))}, "
                     f"{num(b['total_bytes'])} bytes per device per micro-batch in all</p>")
        parts.append(table(["layer", "kind", "x", "mode", "compress", "predicted bytes", "reason"], rows, {2, 5}))
    return "".join(parts)


def compiled_table(compiled: list[dict]) -> str:
    if not compiled:
        return '<p class="note">None dumped (set logging.dump_hlo=true to write each compiled train step).</p>'
    rows = [[c["name"], mesh_text(c["mesh"]), c["grad_accum"], num(c["argument_device_bytes"]), num(c["device_bytes"]),
             num(c["cost"].get("flops"), 0)] for c in compiled]
    return table(["compiled/ (train_step.hlo.txt, memory_analysis.json, cost_analysis.json)", "mesh", "accum",
                  "argument bytes/device", "peak bytes/device", "XLA flops"], rows, {2, 3, 4, 5})


# ---------------------------------------------------------------- the page

def checked(path: Path, what: str, build, *args):
    """``build(*args)``; a file that lacks what the page needs is one line naming it (a damaged or foreign file)."""
    from framework.config import ConfigError

    try:
        return build(*args)
    except (KeyError, TypeError, IndexError) as e:
        raise ConfigError(f"{path}: {what} lacks {e} (expected a file scripts/train.py wrote)") from None


def page(run: dict) -> str:
    d = run["dir"]
    specs = checked(d, "a file the charts read", charts, run)
    holder = lambda *ids: "".join(f'<div class="chart" id="chart-{i}"></div>' for i in ids  # noqa: E731
                                  if any(s["id"] == i for s in specs))
    data = json.dumps({"charts": specs}).replace("</", "<\\/")  # inside <script>: no early end tag
    title = f"meshpilot run {run['dir'].resolve().name}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>{(ASSETS / "report.css").read_text()}</style></head>
<body>
<h1>{esc(title)}</h1><p class="sub">{esc(run['dir'].resolve())}</p>
<h2>Summary</h2>{checked(d / "metrics.jsonl", "a record", summary, run)}
<h2>Loss</h2><div class="grid2">{holder("loss")}</div>
<h2>Throughput and MFU</h2><div class="grid2">{holder("throughput", "mfu")}</div>
<h2>Memory over time</h2><div class="grid2">{holder("device_memory", "host_memory") or '<p class="note">No memory figures in metrics.jsonl.</p>'}</div>
<h2>Goodput</h2><div class="grid2">{holder("goodput") or '<p class="note">No goodput.json.</p>'}</div>
<h2>Try-run decisions</h2><div class="grid2">{holder("tryrun")}</div>{checked(d / "tryrun.jsonl", "a decision", tryrun_tables, run["decisions"])}
<h2>Plans</h2>{checked(d / "plans.json", "a layout", plan_tables, run["plans"])}
<h2>Compiled steps</h2>{checked(d / "compiled", "a layout.json", compiled_table, run["compiled"])}
<h2>Config</h2><details><summary>config.yaml (resolved)</summary><pre>{esc(run['config'])}</pre></details>
<script type="application/json" id="report-data">{data}</script>
<script>{(ASSETS / "report.js").read_text()}</script>
</body></html>
"""


def main(argv=None) -> None:
    args = parse_args(argv)
    with _cli.user_errors():
        run_dir = Path(args.run_dir)
        out = Path(args.out) if args.out else run_dir / "report.html"
        text = page(load_run(run_dir))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(out)


if __name__ == "__main__":
    main()
