#!/usr/bin/env python
"""One command that proves meshpilot on a GPU inside a short lease (default budget 480 s).

python scripts/gpu_check.py [--out DIR] [--budget-s 480] [--dry-run] [key=value ...]

Parts, in order, each run as its own process tree with its own time slice:
  1. env     jax/jaxlib and CUDA plugin versions, devices, memory kinds, memory_stats();
             without a CUDA jax it prints the install line and exits 2
  2. tests   pytest -m gpu (memory tiers, streamed parameters, host-side update, activation
             offload, broadcast layers), JUnit XML under --out
  3. bench   scripts/bench/bench.py on gpt2_124m and llama_1b_gpu in bf16 under scripts/gpu_env.sh:
             tokens/s, step time, MFU with its FLOP formula, device bytes
  4. memory  gpt2_124m with everything on device / optimizer state in pinned_host / optimizer
             state and activations offloaded, one process each (memory_stats peaks are per
             process): device bytes (memory_analysis, memory_stats), step time vs all on device
  5. report  DIR/gpu_check.json, DIR/gpu_check.log (every child's output), a short table and
             the goals as pass/fail lines.

Slices are shares of the budget; a part may also use what earlier parts left unused, never what
later parts are owed. A part still running at the end of its slice is killed with its whole
process group and recorded as ``timeout``; a part whose slice is under its minimum is ``skipped``,
with a note either way. ``key=value`` overrides apply to every bench run.

``--dry-run`` runs the same sequence on the CPU with tiny model sizes on one emulated device, a
two-test sample of the pytest subset (CI runs the whole subset anyway), a 300 s default budget and a
1 s minimum slice: a check that the script itself works (CI runs it).
Exit status: 0 when every part ran (and, on a GPU, every goal passed), 1 when one failed or timed out or a goal
failed (each named on stderr), 2 for bad input or no CUDA jax.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

import _cli

ROOT = Path(__file__).resolve().parents[1]
INSTALL = 'pip install "jax[cuda13]==0.10.2" && pip install -e .'  # the README's GPU section says the same

# ------------------------------------------------------------------ what runs, and its share of the budget

BENCH_CONFIGS = ("gpt2_124m", "llama_1b_gpu")
MEMORY_CONFIG = "gpt2_124m"  # its three compiles fit the lease; the 1B model's would not
MEMORY_VARIANTS = {
    "all on device": [],
    "opt_state on host": ["memory.opt_state=pinned_host"],
    "opt_state + activations offloaded": ["memory.opt_state=pinned_host", "memory.activations=offload"],
}
SHARES = {"env": 0.06, "tests": 0.25, "bench:gpt2_124m": 0.13, "bench:llama_1b_gpu": 0.20,
          **{f"memory:{v}": 0.12 for v in MEMORY_VARIANTS}}
MIN_S = {"env": 5, "tests": 15, "bench": 15, "memory": 15}  # on a GPU, below these a run cannot finish: skip it
DRY_MIN_S = 1  # --dry-run: so that a tiny --budget-s makes parts time out (the CI test of the kill path)

TINY = ["model.vocab_size=256", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=0",
        "model.d_mlp=128", "model.max_seq_len=64", "train.seq_len=64", "train.global_batch=8", "model.attention=xla"]
DRY_TESTS = "test_policy_modes_and_per_name_map or test_verifier_finds_offload_in_cuda_hlo_and_none_without_it"

GOAL_MFU, GOAL_HOST_RATIO, GOAL_BYTES_SLACK = 0.45, 1.2, 0.05


@dataclass
class Run:
    """One child process of a part: its command, outcome, and the figures it returned."""

    name: str
    cmd: list[str]
    status: str = "pending"  # ok | failed | timeout | skipped
    note: str = ""
    rc: int | None = None
    seconds: float = 0.0
    timeout_s: float = 0.0
    result: dict = field(default_factory=dict)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json, gpu_check.log, pytest.xml")
    p.add_argument("--budget-s", type=float, default=None, help="seconds for all parts (default 480; 300 with --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="the same sequence on CPU with tiny sizes")
    p.add_argument("--probe-env", action="store_true", help=argparse.SUPPRESS)  # part 1, in its own process
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides for every bench run")
    return p.parse_intermixed_args(argv)


# ------------------------------------------------------------------ part 1: the environment (child process)


def probe_env() -> dict:
    """What this machine's jax sees: versions, CUDA plugins, devices, memory kinds and statistics."""
    import importlib.metadata as md
    import shutil

    import jax
    import jaxlib

    versions = {}
    for name in ("flax", "optax", "orbax-checkpoint", "numpy", "pyyaml", "pytest"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    plugins = {d.metadata["Name"]: d.version for d in md.distributions()
               if (d.metadata["Name"] or "").lower().replace("_", "-").startswith(("jax-cuda", "jax-rocm"))}
    try:  # everything after this part needs the framework to import with these packages
        import framework.train.trainer  # noqa: F401
        framework_error = None
    except Exception as e:  # report any import failure as a finding, not a crash of the probe
        framework_error = f"{type(e).__name__}: {e}"
    devices = jax.devices()
    d0 = devices[0]
    smi = None
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        smi = q.stdout.strip() or q.stderr.strip()
    return {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "cuda_plugins": plugins,
        "packages": versions,
        "framework_import_error": framework_error,
        "backend": jax.default_backend(),
        "device_count": len(devices),
        "devices": [f"{d.platform}:{d.id} {d.device_kind}" for d in devices],
        "memory_kinds": [m.kind for m in d0.addressable_memories()],
        "default_memory_kind": d0.default_memory().kind,
        "memory_stats": d0.memory_stats(),
        "nvidia_smi": smi,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def cuda_problem(env: dict) -> str | None:
    """Why this is not a usable CUDA jax (None when it is)."""
    plugins = {k.lower().replace("_", "-"): v for k, v in env.get("cuda_plugins", {}).items()}
    cuda = {k: v for k, v in plugins.items() if k.startswith("jax-cuda")}
    if not cuda:
        return f"jax {env.get('jax')} has no jax-cuda*-plugin installed (backend {env.get('backend')})"
    wrong = [f"{k} {v}" for k, v in cuda.items() if v != env.get("jaxlib")]
    if wrong:
        return f"CUDA plugin {', '.join(wrong)} does not match jaxlib {env.get('jaxlib')}"
    if env.get("backend") != "gpu":
        return f"jax {env.get('jax')} with {', '.join(cuda)} sees no GPU (backend {env.get('backend')})"
    return None


# ------------------------------------------------------------------ running children within the budget


class Budget:
    """Deadlines for the runs in order: each may use its share plus what earlier runs left unused."""

    def __init__(self, total_s: float, shares: dict[str, float]):
        self.start, self.total, self.shares = time.monotonic(), total_s, shares

    def left(self) -> float:
        return self.total - (time.monotonic() - self.start)

    def slice_for(self, key: str) -> float:
        keys = list(self.shares)
        owed_later = sum(self.shares[k] for k in keys[keys.index(key) + 1:]) * self.total
        return self.left() - owed_later


def run_child(run: Run, timeout_s: float, log, env: dict) -> str:
    """Run ``run.cmd`` in its own process group; kill the group at the timeout. Returns its stdout."""
    run.timeout_s = round(timeout_s, 1)
    log.write(f"\n===== {run.name} (timeout {timeout_s:.0f} s): {' '.join(run.cmd)}\n")
    log.flush()
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(run.cmd, cwd=ROOT, env=env, stdout=out, stderr=log, start_new_session=True)
        try:
            run.rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, None)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=grace)
                    break
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    continue
            run.status, run.note = "timeout", f"killed after its {timeout_s:.0f} s slice"
        except BaseException:  # Ctrl-C: take the child's whole group down with us
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        run.seconds = round(time.monotonic() - t0, 2)
        out.seek(0)
        stdout = out.read()
    log.write(f"----- stdout of {run.name} (rc {run.rc}, {run.seconds:.1f} s)\n{stdout}\n")
    log.flush()
    if run.status != "timeout":
        run.status = "ok" if run.rc == 0 else "failed"
        if run.rc != 0:
            run.note = f"exit code {run.rc}; see gpu_check.log"
    return stdout


def schedule(run: Run, budget: Budget, key: str, min_s: float, log, env: dict) -> str | None:
    """Run ``run`` in the slice ``key`` owns, or record it skipped when less than ``min_s`` is left."""
    slice_s = budget.slice_for(key)
    if slice_s < min_s:
        run.status = "skipped"
        run.note = f"budget spent: {max(slice_s, 0):.1f} s left for this part, it needs at least {min_s:g} s"
        log.write(f"\n===== {run.name}: skipped ({run.note})\n")
        return None
    return run_child(run, slice_s, log, env)


def last_json(stdout: str) -> dict:
    """The JSON object a child printed (the last '{' at a line start onwards)."""
    start = stdout.rfind("\n{")
    return json.loads(stdout[start + 1 if start >= 0 else stdout.index("{"):])


def python_cmd(script: str, *args: str, gpu_flags: bool = False) -> list[str]:
    cmd = [sys.executable, str(ROOT / "scripts" / script), *args]
    if gpu_flags:  # the framework's GPU flags, from the one file that holds them
        return ["bash", "-c", 'source scripts/gpu_env.sh && exec "$@"', "gpu_env", *cmd]
    return cmd


# ------------------------------------------------------------------ parts 2-4: the children's figures


def junit_summary(path: Path) -> dict:
    """Counts, failures and skip reasons from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed, skipped = [], {}
    for case in suite.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name')}"
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                failed.append(f"{name}: {(el.get('message') or '').splitlines()[0][:200] if el.get('message') else tag}")
        el = case.find("skipped")
        if el is not None:
            reason = el.get("message") or "skipped"
            skipped[reason] = skipped.get(reason, 0) + 1
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "seconds": float(suite.get("time", 0)), "failed": failed, "skip_reasons": skipped,
            "junit": path.name, "partial": False}


def verbose_summary(stdout: str) -> dict:
    """Counts from ``pytest -v`` lines (``path::test PASSED``) of a run killed before its summary."""
    outcomes = {k: [] for k in ("passed", "failed", "error", "skipped")}
    for m in re.finditer(r"^(\S+::.*?) (PASSED|FAILED|ERROR|SKIPPED)", stdout, re.M):
        outcomes[m[2].lower()].append(m[1])
    return {"tests": sum(map(len, outcomes.values())), "passed": len(outcomes["passed"]),
            "failures": len(outcomes["failed"]), "errors": len(outcomes["error"]), "skipped": len(outcomes["skipped"]),
            "failed": outcomes["failed"] + outcomes["error"], "skip_reasons": {}, "partial": True}


def bench_figures(report: dict) -> dict:
    """The figures the check reports from one ``bench.py --json`` report."""
    m = report["memory"]
    return {
        "device": f"{report['n_devices']} x {report['device_kind']}",
        "param_count": report["param_count"],
        "batch": f"{report['global_batch']} x {report['seq_len']}",
        "dtype": report["dtype"],
        "compile_s": report["compile_s"],
        "step_s": report["step_s"]["median"],
        "tokens_per_s": report["tokens_per_s"],
        "flops_per_step": report["flops_per_step"],
        "flops_formula": report["flops_formula"],
        "mfu": report["mfu"],
        "peak_flops_per_device": report["peak_flops_per_device"],
        "compiled_device_bytes": m["compiled_device_bytes"],
        "peak_bytes_in_use": m["peak_bytes_in_use"],
        "bytes_limit": m["bytes_limit"],
        "opt_state_bytes_per_device": m["opt_state_bytes_per_device"],
        "placement": m["placement"],
        "memory_analysis": m["memory_analysis"],
    }


def memory_table(runs: list[Run]) -> list[dict]:
    """One row per variant that ran: device bytes both ways and step time relative to all on device."""
    base = next((r.result for r in runs if r.name == "all on device" and r.status == "ok"), None)
    rows = []
    for r in runs:
        f = r.result
        row = {"variant": r.name, "status": r.status, "note": r.note}
        if r.status == "ok":
            row.update({k: f[k] for k in ("compiled_device_bytes", "peak_bytes_in_use", "opt_state_bytes_per_device", "step_s")})
            row["step_vs_all_device"] = f["step_s"] / base["step_s"] if base else None
        rows.append(row)
    return rows


def goals(bench: list[Run], mem_rows: list[dict], dry_run: bool) -> list[dict]:
    """The issue's three goals, judged on what was measured ('n/a' where it was not)."""
    def goal(name, measured, limit, passed, how, unit):
        status = "n/a" if measured is None else ("pass" if passed else "fail")
        return {"goal": name, "measured": measured, "limit": limit, "unit": unit, "status": status, "how": how}

    out = []
    llama = next((r.result for r in bench if r.name == "llama_1b_gpu" and r.status == "ok"), {})
    m = llama.get("mfu")
    out.append(goal("MFU of llama_1b_gpu in bf16", m, GOAL_MFU, m is not None and m >= GOAL_MFU,
                    "model FLOPs per step / step time / bf16 peak" + ("" if m is not None else "; no peak known for this device"),
                    "fraction"))
    rows = {r["variant"]: r for r in mem_rows if r["status"] == "ok"}
    base, host = rows.get("all on device"), rows.get("opt_state on host")
    ratio = host["step_vs_all_device"] if base and host else None
    out.append(goal("step time, opt_state on host / all on device", ratio, GOAL_HOST_RATIO,
                    ratio is not None and ratio <= GOAL_HOST_RATIO, f"{MEMORY_CONFIG}, median step times", "ratio"))
    for key, label in (("compiled_device_bytes", "memory_analysis"), ("peak_bytes_in_use", "memory_stats peak")):
        measured = limit = None
        if base and host and base[key] is not None and host[key] is not None:
            measured = host[key]
            limit = (base[key] - base["opt_state_bytes_per_device"]) * (1 + GOAL_BYTES_SLACK)
        out.append(goal(f"device bytes, opt_state on host ({label})", measured, limit,
                        measured is not None and measured <= limit,
                        "at most (all-device bytes - optimizer-state bytes) + 5%", "bytes"))
    if dry_run:
        for g in out:
            g["how"] += " [dry run: CPU figures, not a verdict]"
    return out


# ------------------------------------------------------------------ the check


def part_status(runs: list[Run]) -> str:
    order = ("failed", "timeout", "ok", "skipped")
    return min((r.status for r in runs), key=order.index) if runs else "skipped"


def git_commit() -> str | None:
    try:
        q = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return q.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def check(args) -> tuple[dict, int]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget_s = args.budget_s if args.budget_s is not None else (300.0 if args.dry_run else 480.0)
    budget = Budget(budget_s, SHARES)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    cache = Path(tempfile.gettempdir()) / "meshpilot-gpu-check-xla"  # repeated compiles of one step are cached
    bench_common = [*(TINY if args.dry_run else []), f"train.compilation_cache_dir={cache}", *args.overrides]
    dry_steps = ["--steps", "2", "--rounds", "1", "--warmup", "1", "--fit-steps", "2", "--cpu-devices", "1"]
    steps = dry_steps if args.dry_run else ["--steps", "10", "--rounds", "2", "--warmup", "2", "--fit-steps", "5"]
    mem_steps = dry_steps if args.dry_run else ["--steps", "5", "--rounds", "1", "--warmup", "2", "--fit-steps", "2"]
    min_s = (lambda part: DRY_MIN_S) if args.dry_run else MIN_S.get
    parts: dict[str, list[Run]] = {}
    report = {"command": ["scripts/gpu_check.py", *(args.argv or [])], "dry_run": args.dry_run, "budget_s": budget_s,
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(), "install_line": INSTALL, "parts": {}}

    with open(out / "gpu_check.log", "w") as log:
        # 1. environment
        run = Run("env", [sys.executable, str(Path(__file__).resolve()), "--probe-env"])
        parts["env"] = [run]
        stdout = schedule(run, budget, "env", min_s("env"), log, env)
        if run.status == "ok":
            run.result = last_json(stdout)
        problem = None if args.dry_run else (cuda_problem(run.result) if run.status == "ok" else
                                             f"the environment probe did not finish ({run.status}: {run.note})")
        if problem:
            run.status, run.note = "failed", f"no CUDA jax: {problem}"
        elif run.result.get("framework_import_error"):
            run.status, run.note = "failed", (
                f"meshpilot does not import: {run.result['framework_import_error']} (a package missing on a machine "
                "without network: carry the wheels of scripts/gpu_wheels.sh, see README 'On a GPU')")

        # 2. tests
        xml = out / "pytest.xml"
        xml.unlink(missing_ok=True)  # never read an earlier run's results
        select = ["-m", "gpu and not slow", "-k", DRY_TESTS] if args.dry_run else ["-m", "gpu"]
        # a test module that cannot import there (a package the GPU image lacks) must not stop the rest
        run = Run("pytest -m gpu", [sys.executable, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider",
                                    "--continue-on-collection-errors", f"--junitxml={xml}", *select])
        parts["tests"] = [run]
        if problem:
            run.status, run.note = "skipped", "no CUDA jax (see env)"
        else:
            # each test process and the scripts it starts share one GPU: no up-front 75% grab per process
            stdout = schedule(run, budget, "tests", min_s("tests"), log, {**env, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
            if run.status in ("ok", "failed") and xml.exists():
                run.result = junit_summary(xml)
                if run.rc == 1:
                    run.note = f"{run.result['failures'] + run.result['errors']} test(s) failed"
            elif run.status == "timeout":  # pytest writes no XML when killed: count what it printed
                run.result = verbose_summary(stdout)
            if run.rc == 5:
                run.note = "pytest selected no tests"

        # 3. bench, 4. memory table
        for part, names in (("bench", BENCH_CONFIGS), ("memory", list(MEMORY_VARIANTS))):
            parts[part] = []
            for name in names:
                if part == "bench":
                    config, extra, n = name, [], steps
                else:
                    config, extra, n = MEMORY_CONFIG, MEMORY_VARIANTS[name], mem_steps
                cmd = python_cmd("bench/bench.py", "--config", f"configs/{config}.yaml", "--json", *n,
                                 "train.dtype=bfloat16", *bench_common, *extra, gpu_flags=True)
                run = Run(name, cmd)
                parts[part].append(run)
                if problem:
                    run.status, run.note = "skipped", "no CUDA jax (see env)"
                    continue
                stdout = schedule(run, budget, f"{part}:{name}", min_s(part), log, env)
                if run.status == "ok":
                    run.result = bench_figures(last_json(stdout))

        report["parts"] = {k: {"status": part_status(v), "runs": [asdict(r) for r in v]} for k, v in parts.items()}
        report["memory_table"] = memory_table(parts["memory"])
        report["goals"] = goals(parts["bench"], report["memory_table"], args.dry_run)
        report["elapsed_s"] = round(time.monotonic() - budget.start, 1)
    with open(out / "gpu_check.json", "w") as f:
        json.dump(report, f, indent=1)
    return report, exit_code(report, bool(problem))


def exit_code(report: dict, no_cuda: bool) -> int:
    """2 without a usable CUDA jax; 1 when a part did not run through or (on a GPU) a goal failed; else 0. A dry
    run's goals are CPU figures, not a verdict: they decide nothing."""
    if no_cuda:
        return 2
    failed = [g["goal"] for g in report.get("goals", []) if g["status"] == "fail" and not report["dry_run"]]
    for goal in failed:
        print(f"gpu_check: goal failed: {goal}", file=sys.stderr, flush=True)
    return 0 if all(p["status"] == "ok" for p in report["parts"].values()) and not failed else 1


# ------------------------------------------------------------------ the short table


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.1f} MiB"


def print_summary(report: dict, out: str) -> None:
    mode = "DRY RUN on CPU (tiny sizes)" if report["dry_run"] else "GPU"
    env = report["parts"]["env"]["runs"][0]["result"]
    print(f"gpu_check {mode}: {report['elapsed_s']} s of a {report['budget_s']:.0f} s budget; commit {report['commit']}")
    if env:
        print(f"  jax {env['jax']} jaxlib {env['jaxlib']} plugins {env['cuda_plugins'] or 'none'}; "
              f"{env['device_count']} x {env['devices'][0]}; memory kinds {', '.join(env['memory_kinds'])}")
    print(f"  {'part':<8} {'run':<36} {'status':<8} {'seconds':>8}  note")
    for part, p in report["parts"].items():
        for r in p["runs"]:
            print(f"  {part:<8} {r['name']:<36} {r['status']:<8} {r['seconds']:>8.1f}  {r['note']}")
    t = report["parts"]["tests"]["runs"][0]["result"]
    if t:
        partial = " (before it was killed; no JUnit XML)" if t["partial"] else ""
        print(f"  tests: {t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped{partial}")
        for reason, n in t["skip_reasons"].items():
            print(f"    skipped {n}: {reason}")
        for line in t["failed"]:
            print(f"    FAILED {line}")
    for r in report["parts"]["bench"]["runs"]:
        f = r["result"]
        if f:
            mfu = "n/a" if f["mfu"] is None else f"{100 * f['mfu']:.1f}%"
            print(f"  bench {r['name']}: {f['tokens_per_s']:,.0f} tokens/s, step {f['step_s'] * 1e3:.1f} ms, "
                  f"MFU {mfu}, compiled {_mib(f['compiled_device_bytes'])}, peak {_mib(f['peak_bytes_in_use'])}")
            print(f"    FLOPs/step {f['flops_per_step']:.4g} = {f['flops_formula']}")
    print(f"  memory table ({MEMORY_CONFIG}): variant | memory_analysis device | memory_stats peak | step | vs all on device")
    for row in report["memory_table"]:
        if row["status"] == "ok":
            vs = "n/a" if row["step_vs_all_device"] is None else f"{row['step_vs_all_device']:.2f}x"
            print(f"    {row['variant']:<34} | {_mib(row['compiled_device_bytes']):>10} | {_mib(row['peak_bytes_in_use']):>10} "
                  f"| {row['step_s'] * 1e3:8.1f} ms | {vs}")
        else:
            print(f"    {row['variant']:<34} | {row['status']}: {row['note']}")
    for g in report["goals"]:
        fmt = _mib if g["unit"] == "bytes" else (lambda v: "n/a" if v is None else f"{v:.3g}")
        print(f"  GOAL {g['status'].upper():<4} {g['goal']}: measured {fmt(g['measured'])}, limit {fmt(g['limit'])} ({g['how']})")
    print(f"  written: {out}/gpu_check.json, {out}/gpu_check.log")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.argv = argv
    if args.probe_env:
        json.dump(probe_env(), sys.stdout, indent=1, default=str)
        print()
        return
    with _cli.user_errors():
        from framework.config import ConfigError, load_config

        if args.budget_s is not None and args.budget_s <= 0:
            raise ConfigError(f"--budget-s={args.budget_s:g}: expected a positive number of seconds")
        for config in {*BENCH_CONFIGS, MEMORY_CONFIG}:  # bad overrides stop the check here, not in every child
            load_config(ROOT / "configs" / f"{config}.yaml", args.overrides)
    report, code = check(args)
    print_summary(report, args.out)
    if code == 2:
        note = report["parts"]["env"]["runs"][0]["note"].removeprefix("no CUDA jax: ")
        print(f"error: no usable CUDA jax found: {note}; install it with: {INSTALL}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
