"""Looking inside a run: profiler traces, compiled steps on demand, memory over time, trackers, the run report.

Real jax.profiler traces, real compiled executables, the real wandb library (offline), a real headless browser.
"""
import gzip
import json
import os
import signal
import struct
import subprocess
import sys

import jax
import pytest

from framework import memory
from framework.config import ConfigError
from framework.preemption import Preempted
from framework.trackers import Tracker
from framework.train import Callback, Trainer
from tests.helpers import ROOT, SMALLER, TINY, run_script, tiny_config
from tests.test_preemption import SignalAt
from tests.test_resume import compile_once  # noqa: F401  (module fixture: one compile per config)

SMALL = (*SMALLER, "data.source=synthetic")
STEP_FUNCTION = b"jit__traced_step"  # the train step's compiled module, as XLA and the profiler name it


def traces(run_dir):
    """{file name: bytes} of every trace file under RUN_DIR/profile (the perfetto trace unzipped)."""
    out = {}
    for path in sorted((run_dir / "profile").rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            out[str(path.relative_to(run_dir / "profile"))] = gzip.decompress(data) if path.suffix == ".gz" else data
    return out


def assert_trace_of_the_step(run_dir):
    found = traces(run_dir)
    xplanes = [data for name, data in found.items() if name.endswith(".xplane.pb")]
    perfetto = [data for name, data in found.items() if name.endswith("perfetto_trace.json.gz")]
    assert xplanes and perfetto, sorted(found)
    for data in (*xplanes, *perfetto):
        assert len(data) > 1000 and STEP_FUNCTION in data
    json.loads(perfetto[0])  # what the Perfetto UI opens


class Collecting(Tracker):
    """A tracker of one's own (the extension point): keeps what it is given."""

    name = "collecting"

    def start(self, config):
        self.config, self.records, self.goodput, self.failed = config, [], [], None

    def log(self, record):
        self.records.append(record)

    def log_goodput(self, report, step):
        self.goodput.append((step, report))

    def finish(self, failed):
        self.failed = failed


@pytest.fixture(scope="module")
def inside_run(tmp_path_factory, compile_once):
    """One run with everything on: a trace of steps 2..3, every compiled step dumped, evaluation, tensorboard."""
    run_dir = tmp_path_factory.mktemp("inside")
    cfg = tiny_config(*SMALL, "logging.profile_steps=[2, 3]", "logging.dump_hlo=true", "train.eval_every=3",
                      "logging.tensorboard=true", steps=6)
    trainer = Trainer(cfg, run_dir=run_dir)
    trainer.collecting = Collecting(run_dir, cfg.logging)
    trainer.trackers.add(trainer.collecting)
    records = trainer.fit()
    return run_dir, trainer, records


@pytest.mark.gpu
def test_profile_steps_write_a_trace_that_names_the_step(inside_run):
    run_dir, _, records = inside_run
    assert [r["step"] for r in records] == list(range(1, 7))
    assert_trace_of_the_step(run_dir)
    sessions = list((run_dir / "profile" / "plugins" / "profile").iterdir())  # TensorBoard's profile plugin layout
    assert len(sessions) == 1


@pytest.mark.gpu
def test_dump_hlo_and_memory_figures_are_the_compiled_steps(inside_run):
    """The dump is the compiled step the run used; each logged step carries its memory figures and host RSS."""
    run_dir, trainer, records = inside_run
    (layout,) = (run_dir / "compiled").iterdir()  # one layout, compiled once
    compiled = trainer.compiled_step
    assert (layout / "train_step.hlo.txt").read_text() == compiled.as_text()
    assert compiled.as_text().startswith("HloModule " + STEP_FUNCTION.decode())
    analysis = json.loads((layout / "memory_analysis.json").read_text())
    ma = compiled.memory_analysis()
    assert analysis["temp_size_in_bytes"] == ma.temp_size_in_bytes > 0
    assert analysis["argument_size_in_bytes"] == ma.argument_size_in_bytes > 0
    assert json.loads((layout / "cost_analysis.json").read_text())["flops"] > 0
    # what plan.py --measure counts in the live step, read from the dump
    from framework.collectives import count_compiled, parse_collectives

    n = len(trainer.devices)
    dumped = parse_collectives((layout / "train_step.hlo.txt").read_text(), n)
    assert dumped == count_compiled(compiled, n).ops and (dumped or n == 1)
    about = json.loads((layout / "layout.json").read_text())
    assert about["mesh"] == trainer.axis_sizes and about["grad_accum"] == 1 and about["placement"]["opt_state"] == "device"
    assert about["device_bytes"] == memory.compiled_device_bytes(ma, 0)
    for r in records:
        assert r["host_rss_bytes"] > 50 * 2**20 and r["host_peak_rss_bytes"] >= r["host_rss_bytes"]
        if trainer.devices[0].platform == "cpu":  # no memory_stats(): the compiled figure, labelled
            assert r["device_memory_source"] == "compiled"
            assert (r["device_bytes_in_use"], r["device_peak_bytes"]) == (about["argument_device_bytes"], about["device_bytes"])
        else:
            assert r["device_memory_source"] == "memory_stats"
            assert 0 < r["device_bytes_in_use"] <= r["device_peak_bytes"]
    plans = json.loads((run_dir / "plans.json").read_text())["layouts"]
    assert len(plans) == 1 and plans[0]["memory"]["totals"] == trainer.memory_plan().to_dict()["totals"]


def test_metrics_and_evaluations_reach_every_tracker(inside_run):
    from tests.test_perf import read_event_scalars

    run_dir, trainer, records = inside_run
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 3, 4, 5, 6, 6]
    scalars = read_event_scalars(run_dir / "tensorboard")
    assert scalars["train/device_peak_bytes"] == [(r["step"], r["device_peak_bytes"]) for r in records]
    assert [s for s, _ in scalars["eval/loss"]] == [3, 6]
    assert [s for s, _ in scalars["goodput/goodput"]] == [6]
    events = b"".join(p.read_bytes() for p in (run_dir / "tensorboard").iterdir())
    assert b"config/text_summary" in events and b"global_batch: 16" in events  # the resolved config, as text
    assert scalars["train/model_flops_per_s"][0][1] == pytest.approx(records[0]["model_flops_per_s"], rel=1e-6)
    own = trainer.collecting  # a tracker of one's own gets what metrics.jsonl gets, the goodput, the config
    assert own.records == logged and own.failed is False and own.config["train"]["steps"] == 6
    assert [(step, report["goodput"]) for step, report in own.goodput] == \
        [(6, json.loads((run_dir / "goodput.json").read_text())["runs"][0]["goodput"])]


class FailAt(Callback):
    """Raises when step ``at`` has finished: an error that ends the run mid-trace."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, trainer, step, record):
        if step == self.at:
            raise RuntimeError(f"stopped at step {step}")


class StatsMonitor(memory.MemoryMonitor):
    """A platform that reports memory_stats() (the research hook), with the numbers a GPU would give."""

    def read(self, devices):
        return memory.MemoryReading(bytes_in_use=3 << 20, peak_bytes_in_use=5 << 20, bytes_limit=80 << 30)


def test_a_trace_cut_short_by_an_error_is_written_and_a_tracker_that_cannot_start_is_one_warning(tmp_path, capsys):
    (tmp_path / "tensorboard").write_text("a file where the event files would go")
    cfg = tiny_config(*SMALL, "logging.profile_steps=[2, 6]", "logging.tensorboard=true", steps=6)
    trainer = Trainer(cfg, run_dir=tmp_path)
    trainer.memory_monitor = StatsMonitor()
    trainer.callbacks.append(FailAt(3))
    own = Collecting(tmp_path, cfg.logging)
    trainer.trackers.add(own)
    with pytest.raises(RuntimeError, match="stopped at step 3"):
        trainer.fit()
    assert_trace_of_the_step(tmp_path)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: tracker")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: tracker tensorboard could not start (")
    assert warnings[0].endswith("; the run goes on without it")
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3]  # jsonl went on; the step that raised was logged first
    assert own.records == logged and own.failed is True
    assert {(r["device_memory_source"], r["device_bytes_in_use"], r["device_peak_bytes"]) for r in logged} == \
        {("memory_stats", 3 << 20, 5 << 20)}
    jax.profiler.start_trace(str(tmp_path / "again"))  # the profiler was left stopped
    jax.profiler.stop_trace()


@pytest.mark.slow
def test_a_trace_is_written_when_sigterm_stops_the_run(tmp_path):
    trainer = type("T", (SignalAt,), {"at": 2, "sig": signal.SIGTERM})(
        tiny_config(*SMALL, "logging.profile_steps=[2, 8]", steps=8), run_dir=tmp_path)
    with pytest.raises(Preempted):
        trainer.fit()
    assert_trace_of_the_step(tmp_path)


def test_profile_on_a_resumed_run_past_its_steps_is_a_notice(tmp_path, capsys):
    cfg = tiny_config(*SMALL, steps=2)
    Trainer(cfg, run_dir=tmp_path).fit()
    Trainer(tiny_config(*SMALL, "logging.profile_steps=[1, 2]", steps=3), run_dir=tmp_path).fit()
    assert not (tmp_path / "profile").exists()
    assert "notice: logging.profile_steps=[1, 2]: those steps were trained before this run resumed at step 3; no trace" \
        in capsys.readouterr().err


# ---------------------------------------------------------------- bad input: one line, exit 2

@pytest.mark.parametrize("args, line", [
    (["logging.trackers=[jsonl, mlflow]"], "error: logging.trackers: unknown tracker 'mlflow'; expected a list of jsonl, tensorboard, wandb"),
    (["--profile", "3:40", "train.steps=20"], "error: logging.profile_steps=[3, 40]: expected [start, stop] with 1 <= start "
     "<= stop <= train.steps=20 (steps numbered as in metrics.jsonl; [] for no trace)"),
    (["--profile", "5-8"], "error: --profile '5-8': expected START:STOP, two step numbers as metrics.jsonl numbers them "
     "(e.g. --profile 5:8)"),
])
def test_bad_trackers_and_profile_steps_are_one_line(tmp_path, args, line):
    r = run_script("train.py", "--config", TINY, "--run-dir", str(tmp_path / "run"), *args, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == line, r.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_profile_steps_outside_the_run_in_the_config():
    for steps in ("[0, 3]", "[4, 2]", "[1, 6]", "[2]"):
        with pytest.raises(ConfigError, match=r"^logging\.profile_steps=.*train\.steps=5 "):
            tiny_config(f"logging.profile_steps={steps}", steps=5)


def test_report_of_a_dir_that_is_not_a_run_is_one_line(tmp_path):
    r = run_script("report.py", str(tmp_path), timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == \
        f"error: {tmp_path}: no config.yaml (not a run directory written by scripts/train.py)"
    r = run_script("report.py", str(tmp_path / "nowhere"), timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == \
        f"error: {tmp_path / 'nowhere'}: not a directory (expected a run directory written by scripts/train.py)"


# ---------------------------------------------------------------- wandb (the optional extra), offline

def wandb_records(run_dir):
    """The records of RUN_DIR/wandb/offline-run-*/run-*.wandb: the LevelDB-style log wandb writes (32 KiB blocks of
    crc32, length, type, data), each a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, out, partial = path.read_bytes(), 7, [], b""  # after the 7-byte header (":W&B", magic, version)
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        partial = chunk if kind in (1, 2) else partial + chunk  # full, first / middle, last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(partial)
            out.append(record)
    return out


def test_wandb_offline_gets_the_config_metrics_eval_and_goodput(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is the optional extra: pip install -e '.[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tiny_config(*SMALL, "logging.trackers=[jsonl, wandb]", "train.eval_every=2", steps=4)
    records = Trainer(cfg, run_dir=tmp_path).fit()
    found = wandb_records(tmp_path)
    run = next(r.run for r in found if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train"]["steps"] == 4 and config["logging"]["trackers"] == ["jsonl", "wandb"]
    assert run.run_id == (tmp_path / "wandb_run_id").read_text().strip()
    assert (run.project, run.display_name) == ("meshpilot", tmp_path.name)  # logging.wandb_project; the run dir's name
    key = lambda item: item.key or "/".join(item.nested_key)  # noqa: E731  ("train/loss" arrives as a nested key)
    history = [{key(i): json.loads(i.value_json) for i in r.history.item} for r in found if r.WhichOneof("record_type") == "history"]
    train = [h for h in history if "train/loss" in h]
    assert [h["_step"] for h in train] == [1, 2, 3, 4]
    assert [h["train/loss"] for h in train] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert [h["train/device_peak_bytes"] for h in train] == [r["device_peak_bytes"] for r in records]
    evals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert [(h["_step"], h["eval/loss"]) for h in history if "eval/loss" in h] == \
        [(r["step"], pytest.approx(r["eval_loss"], rel=1e-6)) for r in evals] and len(evals) == 2
    summary = {key(i): json.loads(i.value_json) for r in found if r.WhichOneof("record_type") == "summary" for i in r.summary.update}
    goodput = json.loads((tmp_path / "goodput.json").read_text())["runs"][0]
    assert summary["goodput/goodput"] == pytest.approx(goodput["goodput"], rel=1e-9)
    assert not (tmp_path / "tensorboard").exists()


def test_wandb_keeps_its_run_id_on_a_rerun_and_online_without_a_key_is_one_warning(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb", reason="wandb is the optional extra: pip install -e '.[wandb]'")
    from framework.trackers import Trackers

    cfg = tiny_config("logging.trackers=[wandb]").logging
    monkeypatch.setenv("WANDB_MODE", "offline")
    ids = []
    for _ in range(2):  # a restarted run continues the same wandb run
        trackers = Trackers(cfg, tmp_path / "offline")
        trackers.start({"train": {"steps": 1}})
        ids.append(trackers.active[0].run.id)
        trackers.finish()
    assert ids[0] == ids[1] == (tmp_path / "offline" / "wandb_run_id").read_text().strip()

    for key in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    capsys.readouterr()
    trackers = Trackers(cfg, tmp_path / "online")
    trackers.start({"train": {"steps": 1}})
    assert trackers.active == []
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert line == ("warning: tracker wandb could not start (UsageError: No API key configured. Use `wandb login` to "
                    "log in.); the run goes on without it")
    trackers.finish()


# ---------------------------------------------------------------- the run report, in a real headless browser

def browser():
    """Debian's chromium driven by selenium, offline; skipped (with the reason) where they are not installed."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra: pip install -e '.[test]'")
    from selenium.webdriver.chrome.service import Service

    binary, driver = "/usr/bin/chromium", "/usr/bin/chromedriver"
    if not (os.path.exists(binary) and os.path.exists(driver)):
        pytest.skip("no headless browser: apt-get install -y chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    import tempfile

    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def render(page):
    """Open ``page`` (file://) and return what the browser saw: charts drawn, their marks, console, requests."""
    driver = browser()
    try:
        driver.get(page.as_uri())
        seen = driver.execute_script("""
            const svgs = [...document.querySelectorAll('svg.chart-svg')];
            return {charts: document.body.dataset.charts, titles: svgs.map(s => s.getAttribute('aria-label')),
                    marks: svgs.map(s => s.querySelectorAll('path.series, circle.marker, rect.bar').length),
                    widths: svgs.map(s => s.getBoundingClientRect().width),
                    requests: performance.getEntriesByType('resource').map(e => e.name),
                    headings: [...document.querySelectorAll('h2')].map(h => h.textContent)};""")
        seen["console"] = driver.get_log("browser")
        return seen
    finally:
        driver.quit()


def test_report_renders_its_charts_offline_with_no_console_errors(inside_run, tmp_path):
    run_dir, _, _ = inside_run
    r = run_script("report.py", str(run_dir), "--out", str(tmp_path / "report.html"), timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == str(tmp_path / "report.html"), r.stderr[-2000:]
    text = (tmp_path / "report.html").read_text()
    assert "<script src" not in text and "<link" not in text and "http" not in text.split("report-data")[0]
    seen = render(tmp_path / "report.html")
    assert seen["console"] == [] and seen["requests"] == []
    assert seen["titles"] == ["loss", "throughput (the first step includes its start-up)",
                              "model TFLOP/s (no known peak on this device: no MFU)", "device memory per device (compiled)",
                              "host memory (process 0)", "goodput: where the wall time went (seconds)"]
    assert seen["charts"] == str(len(seen["titles"]))
    assert seen["marks"][0] == 4  # loss: the train line, the eval line and its two points
    assert all(n >= 1 for n in seen["marks"]) and all(w > 300 for w in seen["widths"])
    assert seen["headings"][:5] == ["Summary", "Loss", "Throughput and MFU", "Memory over time", "Goodput"]
    assert "data 1 x fsdp 8 x tensor 1" in text and "activations" in text  # the plans and the config


# ---------------------------------------------------------------- an elastic run: try-run candidates inside

class AdoptCandidate:
    """Scores the candidate above the baseline, so the run goes on on another layout (another Trainer) whatever
    the shared machine's timings."""

    def score(self, trial):
        return 100.0 if trial.layout.kind == "baseline" or trial.source == "rolling" else 200.0


@pytest.mark.slow
def test_elastic_run_dumps_every_candidate_logs_their_peaks_and_reports_the_decision(tmp_path, capsys, monkeypatch):
    from framework.tryrun import TryRunController
    from tests.test_perf import read_event_scalars

    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb = "wandb" if _has_wandb() else None  # the decision reaches wandb too where the extra is installed
    trackers = ["jsonl", "tensorboard"] + ([wandb] if wandb else [])
    cfg = tiny_config(*SMALL, "model.n_heads=4", "model.d_mlp=128", "elastic.tryrun_steps=2", "elastic.enabled=true",
                      "elastic.min_devices=2", "elastic.trigger=every_n_steps", "elastic.every_n_steps=3",
                      "elastic.device_schedule=[[0,4]]", "logging.dump_hlo=true", "logging.tensorboard=true",
                      f"logging.trackers=[{', '.join(trackers)}]", steps=6)
    trainer = Trainer(cfg, run_dir=tmp_path, devices=jax.devices()[:4])
    records = type("Adopt", (AdoptCandidate, TryRunController), {})(trainer).fit()
    assert [r["step"] for r in records] == list(range(1, 7))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 7))
    assert records[-1]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1} != records[0]["mesh"]  # adopted at step 3

    (decision,) = [json.loads(line) for line in (tmp_path / "tryrun.jsonl").read_text().splitlines()]
    dumped = {json.dumps(json.loads((d / "layout.json").read_text())["mesh"]): json.loads((d / "layout.json").read_text())
              for d in (tmp_path / "compiled").iterdir()}
    rows = [decision["baseline"], *decision["candidates"]]
    assert len(rows) == 2 and len(dumped) == 2  # the live layout and the candidate: each dumped once
    for row in rows:  # each candidate's peak is its compiled step's, as dumped
        assert row["peak_bytes_per_device"] == dumped[json.dumps(row["mesh"])]["device_bytes"] > 0
    table = capsys.readouterr().out
    assert "peak MiB" in table and f"{rows[1]['peak_bytes_per_device'] / 2**20:.1f}" in table
    scalars = read_event_scalars(tmp_path / "tensorboard")  # the adopted layout's trainer logs to the run's trackers
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 7)) and len(list((tmp_path / "tensorboard").iterdir())) == 1
    assert scalars["tryrun/candidates"] == [(3, 1.0)] and scalars["tryrun/adopted"] == [(3, 1.0)]
    if wandb:
        found = wandb_records(tmp_path)
        keys = {item.key or "/".join(item.nested_key) for r in found if r.WhichOneof("record_type") == "history"
                for item in r.history.item}
        assert {"tryrun/chosen_samples_per_s", "tryrun/candidates_table/_type", "train/loss"} <= keys
        table_file = next(tmp_path.glob("wandb/offline-run-*/files/media/table/tryrun/candidates_table_3_*.table.json"))
        assert len(json.loads(table_file.read_text())["data"]) == 2

    r = run_script("report.py", str(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    seen = render(tmp_path / "report.html")
    assert seen["console"] == [] and seen["requests"] == []
    assert "try-run decisions (samples/s)" in seen["titles"] and all(n >= 1 for n in seen["marks"])
    text = (tmp_path / "report.html").read_text()
    assert f"{rows[1]['peak_bytes_per_device']:,}" in text  # the candidate's peak in the decision's table


def _has_wandb() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("every_process", [False, True], ids=["process0", "all_processes"])
def test_two_processes_trace_on_process_0_unless_all_are_asked(tmp_path, every_process):
    from tests.test_distributed import run

    r = run([sys.executable, str(ROOT / "scripts" / "launch_local.py"), "--processes", "2", "--devices-per-process", "2",
             "--", str(ROOT / "scripts" / "train.py"), "--config", TINY, "--run-dir", str(tmp_path), "train.steps=4",
             "logging.progress=false", "logging.tensorboard=false", *SMALL, "--profile", "2:3",
             f"logging.profile_all_processes={str(every_process).lower()}"], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_trace_of_the_step(tmp_path)  # process 0's, in RUN_DIR/profile
    own = [p for p in (tmp_path / "profile").rglob("*.xplane.pb") if "process_1" not in p.parts]
    assert len(own) == 1
    other = list((tmp_path / "profile" / "process_1").rglob("*.xplane.pb"))
    if every_process:
        assert len(other) == 1 and STEP_FUNCTION in other[0].read_bytes()
    else:
        assert not (tmp_path / "profile" / "process_1").exists()
