"""Multi-process start-up and the local launcher, with real processes, sockets and signals."""
import collections
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from framework.config import ConfigError
from framework.distributed import DistributedArgs, plan_join, share_over_processes, spread_over_processes

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, str(ROOT / "scripts" / "launch_local.py")]
WORKER = str(ROOT / "tests" / "dist_worker.py")
# Rows r*10 + c for r < 8, c < 3: what 2 processes x 2 devices x 2 rows per device must add up to.
EXPECTED_SUM = sum(r * 10 + c for r in range(8) for c in range(3))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, timeout=120):
    """Run to completion; on time-out SIGTERM the launcher so that it stops its processes too."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.communicate(timeout=30)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# --- where the processes come from (no processes started) ---------------------------------

def test_device_subsets_take_as_many_from_each_process():
    Device = collections.namedtuple("Device", "id process_index")  # what a 2-process x 4-device run lists
    devices = [Device(i, i // 4) for i in range(8)]
    assert [d.id for d in spread_over_processes(devices, 4)] == [0, 1, 4, 5]
    assert [d.id for d in spread_over_processes(devices, 8)] == list(range(8))
    with pytest.raises(ConfigError, match="^5 devices cannot be shared evenly by 2 processes: expected a multiple of 2$"):
        spread_over_processes(devices, 5)
    assert [d.id for d in spread_over_processes(devices[:4], 3)] == [0, 1, 2]  # one process: the first n


def test_device_subsets_that_leave_devices_idle_give_every_process_a_share():
    Device = collections.namedtuple("Device", "id process_index")  # 3 processes x 2 devices
    devices = [Device(i, i // 2) for i in range(6)]
    assert [d.id for d in share_over_processes(devices, 4)] == [0, 1, 2, 4]  # 2, 1, 1
    assert [d.id for d in share_over_processes(devices, 5)] == [0, 1, 2, 3, 4]
    assert [d.id for d in share_over_processes(devices, 3)] == [0, 2, 4]  # even: as spread_over_processes
    with pytest.raises(ConfigError, match="^2 devices cannot give each of 3 processes one"):
        share_over_processes(devices, 2)



def test_explicit_args_give_coordinator_count_and_id():
    plan = plan_join(DistributedArgs("10.0.0.1:1234", 4, 3), environ={})
    assert plan.kwargs == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
    assert plan.coordinator == "10.0.0.1:1234"


def test_one_process_needs_no_runtime():
    assert plan_join(DistributedArgs(), environ={}) is None
    assert plan_join(DistributedArgs("127.0.0.1:1234", 1, 0), environ={}) is None


@pytest.mark.parametrize("args, message", [
    (DistributedArgs("10.0.0.1:1234", None, 0), "--num-processes missing"),
    (DistributedArgs(None, 2, 1), "--coordinator missing"),
    (DistributedArgs("10.0.0.1", 2, 1), "--coordinator='10.0.0.1': expected HOST:PORT"),
    (DistributedArgs("10.0.0.1:99999", 2, 1), "expected HOST:PORT"),
    (DistributedArgs("10.0.0.1:1234", 2, 2), "--process-id=2: expected 0 <= id < --num-processes=2"),
    (DistributedArgs("10.0.0.1:1234", 0, 0), "--num-processes=0: expected at least 1"),
    (DistributedArgs(timeout_s=0), "--join-timeout=0"),
])
def test_bad_args_name_the_flag(args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan_join(args, environ={})


SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-002]", "SLURM_NTASKS": "16",
              "SLURM_PROCID": "5", "SLURM_LOCALID": "5"}


def test_slurm_step_with_many_tasks_uses_jax_slurm_detection():
    plan = plan_join(DistributedArgs(), environ=SLURM_STEP)
    assert plan.kwargs == {"cluster_detection_method": "slurm"}
    assert "gpu[001-002]" in plan.coordinator


def test_slurm_single_task_or_batch_script_is_one_process():
    assert plan_join(DistributedArgs(), environ={**SLURM_STEP, "SLURM_NTASKS": "1"}) is None
    batch_step = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}
    assert plan_join(DistributedArgs(), environ=batch_step) is None


def test_explicit_args_win_over_slurm_and_auto_defers_to_jax():
    plan = plan_join(DistributedArgs("10.0.0.1:1234", 2, 1, auto=True), environ=SLURM_STEP)
    assert plan.kwargs["coordinator_address"] == "10.0.0.1:1234"
    assert plan_join(DistributedArgs(auto=True), environ={}).kwargs == {}


# --- real processes ----------------------------------------------------------------------

def test_two_processes_of_two_devices_form_one_mesh_and_agree_on_collectives():
    r = run([*LAUNCH, "--processes", "2", "--devices-per-process", "2", "--", WORKER])
    assert r.returncode == 0, r.stdout + r.stderr
    for p in (0, 1):
        assert re.search(rf"^\[p{p}\] joined=True process {p} of 2 pid \d+ devices 4 local 2$", r.stdout, re.M), r.stdout
        assert f"[p{p}] sum {EXPECTED_SUM:.1f} psum {EXPECTED_SUM:.1f}\n" in r.stdout
        assert f"[p{p}] shutdown ok\n" in r.stdout


@pytest.mark.slow
def test_failing_process_is_named_with_its_exit_code_and_others_are_stopped():
    t = time.monotonic()
    r = run([*LAUNCH, "--processes", "2", "--devices-per-process", "2", "--", WORKER,
             "--fail-process", "1", "--fail-code", "3", "--then-sleep", "600"])
    assert r.returncode == 3, r.stdout + r.stderr
    assert re.search(r"error: process p1 \(pid \d+\) exited with code 3", r.stderr), r.stderr
    assert "[p0] shutdown ok" not in r.stdout  # p0 was sleeping: terminated, not finished
    assert time.monotonic() - t < 60


def test_exception_in_one_process_ends_the_run_promptly_with_its_traceback():
    t = time.monotonic()
    r = run([*LAUNCH, "--processes", "2", "--devices-per-process", "2", "--", WORKER,
             "--raise-process", "0", "--then-sleep", "600"])
    assert r.returncode == 1, r.stdout + r.stderr
    assert "[p0] RuntimeError: deliberate failure\n" in r.stdout
    assert re.search(r"error: process p0 \(pid \d+\) exited with code 1", r.stderr), r.stderr
    assert time.monotonic() - t < 60  # not JAX's 5-minute shutdown barrier


def test_killed_process_makes_launcher_exit_nonzero_naming_it():
    proc = subprocess.Popen([*LAUNCH, "--processes", "2", "--devices-per-process", "2", "--", WORKER,
                             "--then-sleep", "600"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        victim, seen_sum = None, False
        for line in proc.stdout:
            if m := re.match(r"\[p1\] joined=True .* pid (\d+) ", line):
                victim = int(m.group(1))
            seen_sum |= line.startswith("[p1] sum")
            if victim and seen_sum:
                break
        assert victim, "p1 never reported its pid"
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.terminate()  # the launcher stops its processes on SIGTERM
            proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGKILL
    assert re.search(rf"error: process p1 \(pid {victim}\) was killed by signal SIGKILL", err), err


@pytest.mark.parametrize("process_id", [1, 0])
def test_process_that_cannot_join_fails_in_one_line_naming_the_coordinator(process_id):
    address = f"127.0.0.1:{free_port()}"  # nobody serves here (process 1) / nobody else joins (process 0)
    t = time.monotonic()
    r = run([sys.executable, WORKER, "--coordinator", address, "--num-processes", "2",
             "--process-id", str(process_id), "--join-timeout", "3"], timeout=60)
    elapsed = time.monotonic() - t
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: process {process_id} of 2 could not join the coordinator {address} within 3 s")
    assert elapsed < 30  # our timeout, not JAX's 5-minute default


def test_auto_detection_without_a_cluster_is_a_one_line_error():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_", "KUBERNETES_"))}
    proc = subprocess.run([sys.executable, WORKER, "--distributed-auto"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**env, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: --distributed-auto: jax.distributed could not start: "
                                   "coordinator_address should be defined.")


def test_train_script_rejects_incomplete_flags_in_one_line():
    r = run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "tiny_lm.yaml"),
             "--coordinator", "127.0.0.1:1234"], timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: --num-processes, --process-id missing: --coordinator, --num-processes and "
                                "--process-id go together")


def test_launcher_rejects_bad_usage():
    r = run([*LAUNCH, "--processes", "0", "--", WORKER])
    assert r.returncode == 2 and r.stderr.strip() == "error: --processes=0: expected at least 1"
    r = run([*LAUNCH, "--processes", "2", "--", "no_such_script.py"])
    assert r.returncode == 2 and r.stderr.strip() == "error: no_such_script.py: no such file"
