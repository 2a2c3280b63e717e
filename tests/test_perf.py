"""Performance tooling: FLOPs formula, peaks/MFU, bench.py, plot.py, TensorBoard event files."""
import json
import struct

import pytest

from tests.helpers import TINY, run_script, tiny_config

# Tiny model (configs/tiny_lm.yaml): d=128, 4 layers, 8 heads, MLP 512, vocab 256 (tied), seq 128, batch 16.
D, L, F, V, T, B = 128, 4, 512, 256, 128, 16
TOKENS = B * T


def hand_count_flops() -> tuple[int, int]:
    """(matmul FLOPs of one training step counted op by op, bias+norm parameters)."""
    matmul_weights_per_token = L * (4 * D * D + 2 * D * F) + D * V  # q,k,v,out; fc_in, fc_out; tied unembedding
    attention_per_token = L * (2 * T * D + 2 * T * D)  # QK^T and AV, full T x T scores
    forward_per_token = 2 * matmul_weights_per_token + attention_per_token
    small = L * (3 * D + D + F + D + 4 * D) + 2 * D  # biases q,k,v,out,fc_in,fc_out; two LayerNorms; ln_f
    return 3 * forward_per_token * TOKENS, small


def test_flops_formula_matches_hand_count():
    from framework.metrics import model_flops
    from framework.state import abstract_state

    cfg = tiny_config()
    abstract = abstract_state(cfg, {"data": 1, "fsdp": 8, "tensor": 1})
    assert abstract.param_count == 842_496
    flops = model_flops(cfg, abstract.param_count)
    assert flops.matmul_params == 842_496 - T * D  # position table is a lookup; the tied token table counts once
    matmul, small = hand_count_flops()
    # 6N counts biases and norm scales like weights (as customary); everything else is the matmuls.
    assert flops.total == matmul + 6 * small * TOKENS == 11_761_876_992
    assert flops.attention == 12 * L * D * T * TOKENS == 1_610_612_736
    assert 6 * small * TOKENS / flops.total < 0.01


def test_flops_llama_untied_excludes_token_lookup():
    from framework.config import load_config
    from framework.metrics import model_flops

    cfg = load_config(TINY, ["model.style=llama", "model.tie_embeddings=false"])
    flops = model_flops(cfg, 1_000_000)
    assert flops.matmul_params == 1_000_000 - V * D  # untied: the input table is a lookup, unembed is a matmul


def test_peaks_and_mfu():
    from framework.metrics import mfu, peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("TPU v4") == 275e12
    assert peak_flops("TPU v5 lite") == 197e12
    assert peak_flops("TPU v5") == 459e12
    assert peak_flops("TPU v6 lite") == 918e12
    assert peak_flops("cpu") is None
    assert mfu(1e15, 1.0, 2, "NVIDIA H100 80GB HBM3") == pytest.approx(1e15 / (2 * 989e12))
    assert mfu(1e15, 1.0, 8, "cpu") is None


@pytest.mark.slow
def test_bench_json_reports_sane_fields_and_matches_reference():
    r = run_script("bench/bench.py", "--config", TINY, "--json", "--reference", "--steps", "3", "--rounds", "1",
                   "--warmup", "2", "--fit-steps", "4", "mesh.data=8", "mesh.fsdp=1",
                   "broadcast.mode=none")  # the reference is XLA's own propagation
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout)
    assert rep["platform"] == "cpu" and rep["n_devices"] == 8 and rep["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert rep["mfu"] is None and rep["peak_flops_per_device"] is None
    s = rep["step_s"]
    assert 0 < s["min"] <= s["median"] <= s["max"]
    assert rep["steps_timed"] == 3
    assert rep["tokens_per_s"] == pytest.approx(TOKENS / s["median"])
    assert rep["samples_per_s"] == pytest.approx(B / s["median"])
    assert rep["flops_per_step"] == 11_761_876_992
    assert rep["achieved_flops_per_s"] == pytest.approx(rep["flops_per_step"] / s["median"])
    # XLA's own count (all ops, per device, summed) is within 10% of the model FLOPs.
    assert 0.95 < rep["xla_flops_per_step"] / rep["flops_per_step"] < 1.10
    assert rep["compile_s"] > 0 and rep["first_step_s"] > 0
    assert 0.0 <= rep["host"]["gap_free_fraction"] <= 1.0
    # dispatching a step (async) takes a part of the step it starts, never more
    assert 0 < rep["host"]["host_dispatch_s"] < s["median"] and rep["host"]["host_data_s"] >= 0
    assert rep["fit"]["steps"] == 4 and rep["fit"]["step_s_median"] > 0
    ref = rep["reference"]
    assert ref["hlo_identical"] is True  # the framework compiles to the hand-written program
    assert len(ref["losses"]["framework"]) == 2 and ref["max_loss_diff"] < 1e-5
    assert ref["ratio"] == pytest.approx(s["median"] / ref["step_s"]["median"])


def test_bench_bad_steps_exit_2():
    r = run_script("bench/bench.py", "--config", TINY, "--steps", "1")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --steps=1: expected at least 2"


def read_event_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Parse TFRecord event files (length, crc, Event proto, crc) and return {tag: [(step, value)]}."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    scalars: dict[str, list[tuple[int, float]]] = {}
    files = sorted(directory.glob("events.out.tfevents.*"))
    assert files, f"no event files in {directory}"
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
            body = data[pos + 12:pos + 12 + length]
            assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == masked_crc32c(body)
            pos += 16 + length
            event = Event.FromString(body)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    r = run_script("train.py", "--config", TINY, "--run-dir", str(run_dir), "train.steps=6",
                   "logging.progress=false", "logging.tensorboard=true", "data.source=synthetic")
    assert r.returncode == 0, r.stderr[-2000:]
    return run_dir


def test_tensorboard_scalars_read_back(short_run):
    records = [json.loads(line) for line in (short_run / "metrics.jsonl").read_text().splitlines()]
    scalars = read_event_scalars(short_run / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "step_time_s"):
        assert [v for _, v in scalars[f"train/{key}"]] == pytest.approx([r[key] for r in records], rel=1e-6), key
    assert scalars["train/compile_s"] == [(1, pytest.approx(records[0]["compile_s"], rel=1e-6))]
    assert records[0]["compile_s"] > 0 and "compile_s" not in records[1]


def test_plot_writes_pngs(short_run, tmp_path):
    decision = {"step": 3, "adopted": True,
                "baseline": {"mesh": {"data": 1, "fsdp": 8, "tensor": 1}, "samples_per_s": 10.0},
                "candidates": [{"mesh": {"data": 8, "fsdp": 1, "tensor": 1}, "samples_per_s": 12.0},
                               {"mesh": {"data": 2, "fsdp": 4, "tensor": 1}, "samples_per_s": 9.0}],
                "chosen": {"mesh": {"data": 8, "fsdp": 1, "tensor": 1}, "samples_per_s": 12.0}}
    (short_run / "tryrun.jsonl").write_text(json.dumps(decision) + "\n")
    try:
        r = run_script("plot.py", str(short_run), "--out", str(tmp_path / "plots"))
    finally:
        (short_run / "tryrun.jsonl").unlink()
    assert r.returncode == 0, r.stderr[-2000:]
    names = ["loss.png", "throughput.png", "memory.png", "tryrun.png", "goodput.png"]  # every run writes goodput.json
    assert r.stdout.split() == [str(tmp_path / "plots" / n) for n in names]
    for n in names:
        data = (tmp_path / "plots" / n).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, n


def test_plot_without_tryrun_and_missing_dir(short_run, tmp_path):
    r = run_script("plot.py", str(short_run), "--out", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["goodput.png", "loss.png", "memory.png", "throughput.png"]
    r = run_script("plot.py", str(tmp_path / "nowhere"))
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {tmp_path / 'nowhere' / 'metrics.jsonl'}: not found (expected a run directory written by scripts/train.py)"


def test_scale_plot_llama2_7b(tmp_path):
    from tests.helpers import ROOT

    r = run_script("bench/scale_plot.py", "--config", str(ROOT / "configs/llama2_7b.yaml"), "--out", str(tmp_path),
                   "--min", "8", "--max", "16")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in r.stdout.splitlines() if line.startswith("| 16 |")}
    assert len(rows) == 3
    cells = [c.strip().strip("*") for c in rows[("16", "fsdp")].split("|")[1:-1]]
    param_bytes = 6_738_415_616 * 4
    assert cells[2] == "(1, 16, 1)"
    assert float(cells[3]) == round(param_bytes / 16 / 2**30, 2)  # params per device
    assert float(cells[5]) == round(2 * param_bytes / 16 / 2**30, 2)  # AdamW mu + nu
    assert float(cells[8]) == round(2 * param_bytes * 15 / 16 / 2**30, 2)  # gather forward + backward
    assert float(cells[9]) == round(param_bytes * 15 / 16 / 2**30, 2)  # gradient reduce-scatter
    assert (tmp_path / "scale_llama2_7b.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 16 | fsdp | (1, 16, 1) |" in (tmp_path / "scale.md").read_text()


@pytest.mark.slow
def test_reference_mirrors_llama_scan_remat_bf16():
    """The GPU path (Llama style, scanned and rematerialised layers, bf16 compute) compiles like the reference."""
    r = run_script("bench/bench.py", "--config", TINY, "--json", "--reference", "--steps", "2", "--rounds", "1",
                   "--warmup", "2", "--fit-steps", "2", "model.style=llama", "model.scan_layers=true",
                   "model.remat=true", "train.dtype=bfloat16", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                   "broadcast.mode=none")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout)
    assert rep["dtype"] == "bfloat16" and rep["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert rep["reference"]["hlo_identical"] is True
    assert rep["reference"]["max_loss_diff"] < 1e-5
