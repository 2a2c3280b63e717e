"""scripts/train.py and scripts/plan.py end to end, in fresh interpreters."""
import json

import pytest
import yaml

from tests.helpers import ROOT, TINY, run_script


@pytest.mark.slow
def test_default_demo_trains_and_loss_falls(tmp_path):
    r = run_script("train.py", "--config", TINY, "--run-dir", str(tmp_path), "train.steps=60", "logging.progress=false")
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == list(range(1, 61))
    for key in ("loss", "step_time_s", "samples_per_s", "tokens_per_s"):
        assert all(rec[key] > 0 for rec in records), key
    assert records[0]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    first = sum(rec["loss"] for rec in records[:5]) / 5
    last = sum(rec["loss"] for rec in records[-5:]) / 5
    assert first > 5.0 and last < 3.2, (first, last)  # from ~ln(256)=5.5 to clearly learned byte statistics
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["train"]["steps"] == 60 and saved["checkpoint"]["async"] is True
    assert "done: step 60" in r.stdout


def test_plan_json_without_devices():
    r = run_script("plan.py", "--config", str(ROOT / "configs/llama2_7b.yaml"), "--devices", "512", "mesh.tensor=8", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["mesh"] == {"data": 1, "fsdp": 64, "tensor": 8}
    assert report["param_count"] == 6_738_415_616  # Llama-2-7B
    by_name = {p["name"]: p for p in report["params"]}
    assert by_name["blocks/mlp/fc_in/kernel"] == {"name": "blocks/mlp/fc_in/kernel", "shape": [32, 4096, 11008],
                                                  "dtype": "float32", "spec": [None, "fsdp", "tensor"]}


def test_plan_gpt2_param_count_and_text():
    r = run_script("plan.py", "--config", str(ROOT / "configs/gpt2_124m.yaml"), "--devices", "16")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[0] == "mesh {'data': 1, 'fsdp': 16, 'tensor': 1} over 16 devices; 124,439,808 parameters"
    assert "embed  " in r.stdout and "(50257, 768)" in r.stdout


def test_plan_bad_mesh_exit_2():
    r = run_script("plan.py", "--config", TINY, "--devices", "6", "mesh.tensor=4")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: mesh: mesh.data=1 mesh.fsdp=-1 mesh.tensor=4 cannot fill mesh.fsdp=-1 from 6 devices (6 is not divisible by 4)"
