#!/usr/bin/env python
"""Plot a run: loss, throughput, memory over steps, (when RUN_DIR/tryrun.jsonl exists) try-run decisions,
and (when RUN_DIR/goodput.json exists) where the wall time went.

python scripts/plot.py RUN_DIR [--out DIR]
Reads RUN_DIR/metrics.jsonl (written by Trainer.fit) and writes loss.png, throughput.png, memory.png,
tryrun.png and goodput.png to DIR (default RUN_DIR/plots). Mesh changes are marked on the throughput plot;
evaluation records (``eval_loss``, with ``train.eval_every``) are drawn on the loss plot; memory.png shows the
device bytes in use and at peak (memory_stats(), or the compiled step's figures where the platform has none, as
on CPU: the title says which) and the process's host RSS.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import _cli  # noqa: F401  (puts the repository on sys.path)
from _runfiles import mesh_changes, read_json, read_jsonl, read_metrics


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    p.add_argument("--out", default=None, help="where the PNGs go (default RUN_DIR/plots)")
    return p.parse_intermixed_args(argv)


def plot_loss(records: list[dict], evals: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1, label="train")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", ms=3, lw=1, label="eval (held out)")
        ax.legend(fontsize=8)
    ax.set(xlabel="step", ylabel="loss", title="training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_throughput(records: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["tokens_per_s"] for r in records], lw=1, label="tokens/s")
    for step, mesh in mesh_changes(records):
        ax.axvline(step, color="gray", ls="--", lw=0.8)
        ax.annotate(str(mesh), (step, ax.get_ylim()[1]), fontsize=7, rotation=90, va="top", ha="right")
    ax.set(xlabel="step", ylabel="tokens/s", title="throughput (first step includes start-up)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_memory(records: list[dict], path: Path) -> None:
    """Device bytes in use and peak (per device, as the record's ``device_memory_source`` says) and host RSS, in MiB."""
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    mib = lambda key: [(r.get(key) or 0) / 2**20 for r in records]  # noqa: E731
    sources = sorted({r["device_memory_source"] for r in records})
    fig, (dev, host) = plt.subplots(1, 2, figsize=(11, 4))
    dev.plot(steps, mib("device_bytes_in_use"), lw=1, label="in use")
    dev.plot(steps, mib("device_peak_bytes"), lw=1, ls="--", label="peak")
    dev.set(xlabel="step", ylabel="MiB per device", title=f"device memory ({', '.join(sources)})")
    host.plot(steps, mib("host_rss_bytes"), lw=1, label="RSS")
    host.plot(steps, mib("host_peak_rss_bytes"), lw=1, ls="--", label="peak RSS")
    host.set(xlabel="step", ylabel="MiB", title="host memory (process 0)")
    for ax in (dev, host):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_tryrun(records: list[dict], decisions: list[dict], path: Path) -> None:
    """The run's samples/s, and at each decision the baseline, every candidate, and the choice."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["samples_per_s"] for r in records], lw=1, color="C0", label="run samples/s")
    for i, d in enumerate(decisions):
        step = d["step"]
        first = i == 0
        ax.scatter([step], [d["baseline"]["samples_per_s"]], marker="s", color="C1", label="baseline" if first else None)
        cands = d.get("candidates", [])
        ax.scatter([step] * len(cands), [c["samples_per_s"] for c in cands], marker="o", facecolors="none",
                   edgecolors="C2", label="candidates" if first else None)
        chosen = d["chosen"]
        ax.scatter([step], [chosen["samples_per_s"]], marker="*", s=120, color="C3" if d.get("adopted") else "gray",
                   label="chosen (red: adopted)" if first else None)
        ax.annotate(str(chosen.get("mesh", "")), (step, chosen["samples_per_s"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="step", ylabel="samples/s", title="try-run decisions")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_goodput(history: dict, path: Path) -> None:
    """Where the wall time went, one bar per run of the directory (restarts included) and the total."""
    import matplotlib.pyplot as plt

    from framework.goodput import PARTS

    rows = [*history["runs"], history["total"]] if len(history["runs"]) > 1 else history["runs"]
    labels = [f"run {i + 1}" for i in range(len(history["runs"]))] + (["total"] if len(rows) > len(history["runs"]) else [])
    fig, ax = plt.subplots(figsize=(8, max(3.0, 1.2 + 0.5 * len(rows))))
    left = [0.0] * len(rows)
    for i, part in enumerate((*PARTS, "unaccounted")):
        widths = [max(r.get(f"{part}_s", 0.0), 0.0) for r in rows]
        ax.barh(labels, widths, left=left, color=f"C{i}", label=part.replace("_", " "))
        left = [a + b for a, b in zip(left, widths)]
    for y, r in enumerate(rows):
        ax.annotate(f"goodput {r['goodput']:.0%}", (left[y], y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set(xlabel="wall seconds", title="goodput: where the wall time went")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.12, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def make_plots(run_dir: Path, out: Path) -> list[Path]:
    from framework.config import ConfigError

    records, evals = read_metrics(run_dir)
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "loss.png", out / "throughput.png"]
    plot_loss(records, evals, written[0])
    plot_throughput(records, written[1])
    with_memory = [r for r in records if "device_bytes_in_use" in r]  # runs from before memory was logged have none
    if with_memory:
        plot_memory(with_memory, out / "memory.png")
        written.append(out / "memory.png")
    tryrun = run_dir / "tryrun.jsonl"
    if tryrun.is_file():
        decisions = read_jsonl(tryrun)
        try:
            plot_tryrun(records, decisions, out / "tryrun.png")
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{tryrun}: a decision lacks {e} (expected step, baseline, candidates, chosen)") from None
        written.append(out / "tryrun.png")
    goodput = read_json(run_dir / "goodput.json", "runs and total")
    if goodput is not None:
        try:
            plot_goodput(goodput, out / "goodput.png")
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{run_dir / 'goodput.json'}: not a goodput record ({e}; expected runs and total)") from None
        written.append(out / "goodput.png")
    return written


def main(argv=None) -> None:
    args = parse_args(argv)
    with _cli.user_errors():
        run_dir = Path(args.run_dir)
        for path in make_plots(run_dir, Path(args.out) if args.out else run_dir / "plots"):
            print(path)


if __name__ == "__main__":
    main()
