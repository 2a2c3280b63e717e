"""scripts/gpu_check.py: the GPU proof command runs end to end on CPU (--dry-run), never hangs, and says what it needs."""
import importlib
import json
import sys

import pytest

from tests.helpers import ROOT, run_script

VARIANTS = ["all on device", "opt_state on host", "opt_state + activations offloaded"]


def gpu_check():
    """scripts/gpu_check.py as a module (its directory first on the path, as when it runs)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module("gpu_check")
    finally:
        sys.path.pop(0)


def test_goals_judged_from_known_figures_and_a_failed_goal_exits_1(capsys):
    """Known step times and bytes: the goal statuses follow from the limits, and on a GPU a failed goal is exit 1
    naming it (a dry run's goals decide nothing)."""
    g = gpu_check()
    base = {"variant": "all on device", "status": "ok", "step_vs_all_device": 1.0, "compiled_device_bytes": 1000,
            "peak_bytes_in_use": None, "opt_state_bytes_per_device": 400}
    slow_host = {**base, "variant": "opt_state on host", "step_vs_all_device": g.GOAL_HOST_RATIO + 0.1,
                 "compiled_device_bytes": 600}
    goals = {x["goal"]: x for x in g.goals([], [base, slow_host], dry_run=False)}
    assert goals["step time, opt_state on host / all on device"]["status"] == "fail"
    assert goals["device bytes, opt_state on host (memory_analysis)"]["status"] == "pass"  # 600 <= 630
    assert goals["device bytes, opt_state on host (memory_stats peak)"]["status"] == "n/a"
    assert goals["MFU of llama_1b_gpu in bf16"]["status"] == "n/a"
    fast_host = {**slow_host, "step_vs_all_device": g.GOAL_HOST_RATIO, "compiled_device_bytes": 640}
    statuses = [x["status"] for x in g.goals([], [base, fast_host], dry_run=False)]
    assert statuses == ["n/a", "pass", "fail", "n/a"]  # 640 > (1000 - 400) * 1.05

    parts = {name: {"status": "ok"} for name in ("env", "tests", "bench", "memory")}
    report = {"dry_run": False, "parts": parts, "goals": list(goals.values())}
    capsys.readouterr()
    assert g.exit_code(report, no_cuda=False) == 1
    assert capsys.readouterr().err == "gpu_check: goal failed: step time, opt_state on host / all on device\n"
    assert g.exit_code({**report, "dry_run": True}, no_cuda=False) == 0
    assert g.exit_code({**report, "goals": [x for x in goals.values() if x["status"] != "fail"]}, no_cuda=False) == 0
    assert g.exit_code({**report, "parts": {**parts, "bench": {"status": "timeout"}}, "goals": []}, no_cuda=False) == 1
    assert g.exit_code(report, no_cuda=True) == 2


def _report(out):
    return json.loads((out / "gpu_check.json").read_text())


@pytest.mark.slow
def test_dry_run_reports_every_part_with_figures(tmp_path):
    r = run_script("gpu_check.py", "--dry-run", "--out", str(tmp_path), "--budget-s", "600")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = _report(tmp_path)
    assert rep["dry_run"] and rep["budget_s"] == 600
    assert {k: p["status"] for k, p in rep["parts"].items()} == {"env": "ok", "tests": "ok", "bench": "ok", "memory": "ok"}
    for part in rep["parts"].values():
        for run in part["runs"]:
            assert run["status"] == "ok" and run["rc"] == 0 and 0 < run["seconds"] <= run["timeout_s"], run

    env = rep["parts"]["env"]["runs"][0]["result"]
    assert env["backend"] == "cpu" and env["jax"] and env["device_count"] >= 1
    assert {"device", "pinned_host"} <= set(env["memory_kinds"])

    tests = rep["parts"]["tests"]["runs"][0]["result"]
    assert (tests["tests"], tests["passed"], tests["failures"], tests["errors"]) == (2, 2, 0, 0)
    assert (tmp_path / "pytest.xml").is_file()

    bench = {run["name"]: run["result"] for run in rep["parts"]["bench"]["runs"]}
    assert list(bench) == ["gpt2_124m", "llama_1b_gpu"]
    for f in bench.values():
        assert f["device"] == "1 x cpu" and f["dtype"] == "bfloat16" and f["batch"] == "8 x 64"
        assert f["step_s"] > 0 and f["tokens_per_s"] == pytest.approx(8 * 64 / f["step_s"])
        assert f["flops_per_step"] > 0 and f["flops_formula"].startswith("6 * matmul_params * tokens")
        assert f["mfu"] is None and f["peak_bytes_in_use"] is None  # no bf16 peak, no memory_stats on CPU
        assert f["compiled_device_bytes"] > 0 and f["opt_state_bytes_per_device"] > 0

    table = {row["variant"]: row for row in rep["memory_table"]}
    assert list(table) == VARIANTS and all(row["status"] == "ok" for row in table.values())
    base, host, both = (table[v] for v in VARIANTS)
    assert base["step_vs_all_device"] == 1.0 and host["step_vs_all_device"] > 0 and both["step_s"] > 0
    # the optimizer state in pinned_host is not counted as device bytes: the accounting the GPU run is judged on
    assert host["opt_state_bytes_per_device"] == base["opt_state_bytes_per_device"]
    assert host["compiled_device_bytes"] <= base["compiled_device_bytes"] - base["opt_state_bytes_per_device"]
    placements = [run["result"]["placement"] for run in rep["parts"]["memory"]["runs"]]
    assert [(p["opt_state"], p["activations"]) for p in placements] == [
        ("device", "save"), ("pinned_host", "save"), ("pinned_host", "offload")]

    goals = {g["goal"]: g for g in rep["goals"]}
    assert goals["MFU of llama_1b_gpu in bf16"]["status"] == "n/a"
    ratio = goals["step time, opt_state on host / all on device"]
    assert ratio["measured"] == pytest.approx(host["step_vs_all_device"])
    assert ratio["status"] == ("pass" if ratio["measured"] <= gpu_check().GOAL_HOST_RATIO else "fail")
    assert goals["device bytes, opt_state on host (memory_analysis)"]["status"] == "pass"
    assert goals["device bytes, opt_state on host (memory_stats peak)"]["status"] == "n/a"
    assert "GOAL PASS device bytes, opt_state on host (memory_analysis)" in r.stdout
    assert "step time, opt_state on host / all on device" in r.stdout
    log = (tmp_path / "gpu_check.log").read_text()
    assert "===== llama_1b_gpu" in log and '"tokens_per_s"' in log


@pytest.mark.slow
def test_tiny_budget_times_out_and_skips_parts_with_notes_never_hangs(tmp_path):
    r = run_script("gpu_check.py", "--dry-run", "--out", str(tmp_path), "--budget-s", "12", timeout=60)
    assert r.returncode == 1, r.stderr[-2000:]
    rep = _report(tmp_path)
    runs = {run["name"]: run for part in rep["parts"].values() for run in part["runs"]}
    env = runs.pop("env")  # its share of 12 s is under the 1 s minimum
    assert env["status"] == "skipped" and env["note"].startswith("budget spent: 0.7 s left for this part")
    # no bench can import jax, compile and run inside its 1-2 s slice: each is killed at its slice
    for name in ("gpt2_124m", "llama_1b_gpu", *VARIANTS):
        assert runs[name]["status"] == "timeout", runs[name]
        assert runs[name]["note"] == f"killed after its {runs[name]['timeout_s']:.0f} s slice"
        assert runs[name]["seconds"] < runs[name]["timeout_s"] + 5
    assert runs["pytest -m gpu"]["status"] == "timeout" and runs["pytest -m gpu"]["result"]["partial"]
    assert rep["parts"]["bench"]["status"] == rep["parts"]["memory"]["status"] == "timeout"
    assert [row["status"] for row in rep["memory_table"]] == ["timeout"] * 3
    assert {g["status"] for g in rep["goals"]} == {"n/a"}
    assert rep["elapsed_s"] < 12 + 10
    assert "GOAL N/A  MFU of llama_1b_gpu in bf16" in r.stdout


def test_without_cuda_jax_prints_the_install_line_and_exits_2(tmp_path):
    r = run_script("gpu_check.py", "--out", str(tmp_path), timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: no usable CUDA jax found: jax ") and "has no jax-cuda*-plugin installed (backend cpu)" in line
    install = 'pip install "jax[cuda13]==0.10.2" && pip install -e .'
    assert line.endswith(f"; install it with: {install}")
    assert install in (ROOT / "README.md").read_text()  # the one documented line
    rep = _report(tmp_path)
    assert rep["parts"]["env"]["status"] == "failed" and rep["parts"]["env"]["runs"][0]["result"]["backend"] == "cpu"
    assert all(run["status"] == "skipped" and run["note"] == "no CUDA jax (see env)"
               for k in ("tests", "bench", "memory") for run in rep["parts"][k]["runs"])


@pytest.mark.parametrize("args, message", [
    (["--budget-s", "0"], "error: --budget-s=0: expected a positive number of seconds"),
    (["train.stepz=3"], "error: unknown config key 'train.stepz'; did you mean 'train.steps'?"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    r = run_script("gpu_check.py", "--dry-run", "--out", str(tmp_path), *args, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == message, r.stderr
    assert not (tmp_path / "gpu_check.json").exists()
