#!/usr/bin/env python
"""Run a script as P cooperating JAX processes on this machine, each with D emulated CPU devices.

    python scripts/launch_local.py --processes 2 --devices-per-process 4 -- scripts/train.py --config configs/tiny_lm.yaml

Each process gets ``--coordinator 127.0.0.1:PORT --num-processes P --process-id I`` right
after the script path; its output is forwarded line by line as ``[pI] ...``. If one process
fails, the others are terminated and the launcher exits non-zero naming the process in one line, with
the reason it gave (its ``error: ...`` line, held back and reported once, not each process's copy) and
the processes that died of its exit (JAX's coordination service aborts those; their dump is not
forwarded).

With ``--elastic`` a process may hand waiting over to the launcher: it writes what it needs (JSON with
``need_devices`` and ``reason``) to the file that ``MESHPILOT_LAUNCHER_REQUEST`` names and exits with
code 75 (``NEED_CAPACITY_EXIT_CODE``); the launcher waits up to ``--wait-timeout`` for the capacity file
to give enough process slots and restarts the job on them (exit 2 when the wait runs out or more
would be needed than ``--max-processes`` allows).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from framework import handover  # (imports neither jax nor numpy)

TERMINATE_GRACE_S = 5  # JAX's preemption notifier catches SIGTERM in joined processes, so SIGKILL follows
PREEMPT_GRACE_S = 300  # the launcher itself signalled: time for the processes to save a checkpoint
POLL_S = 0.1
# The line with which JAX's coordination service aborts a process whose peer is gone (its dump follows), and the
# lines the runtime logs on the way there (a lost peer's socket): neither is forwarded.
PEER_FAILURE_MARKER = "JAX distributed service detected fatal errors"
PEER_LOST_MARKERS = ("coordination_service", "coordination service", "preemption_sync_manager.cc",
                     "GRPC error information", "Error received from peer")
ERROR_PREFIX = "error: "


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, required=True, metavar="P")
    p.add_argument("--devices-per-process", type=int, default=1, metavar="D")
    e = p.add_argument_group("elastic (restart on the processes left, grow when capacity returns)")
    e.add_argument("--elastic", action="store_true", help="restart the job when a process dies or capacity changes")
    e.add_argument("--min-processes", type=int, default=1, metavar="K", help="never run on fewer (default 1)")
    e.add_argument("--max-processes", type=int, default=0, metavar="M", help="never run on more (default --processes)")
    e.add_argument("--capacity-file", default=None, metavar="F", help="one integer: process slots available now")
    e.add_argument("--wait-timeout", type=float, default=300, metavar="S",
                   help="seconds to wait for --min-processes slots before giving up with exit code 2 (default 300)")
    e.add_argument("--max-restarts", type=int, default=10, metavar="R", help="give up after R restarts (default 10)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT.py [args ...]")
    args = p.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if args.processes < 1:
        p.exit(2, f"error: --processes={args.processes}: expected at least 1\n")
    if args.devices_per_process < 1:
        p.exit(2, f"error: --devices-per-process={args.devices_per_process}: expected at least 1\n")
    if args.elastic and not 1 <= args.min_processes <= args.processes:
        p.exit(2, f"error: --min-processes={args.min_processes}: expected 1 <= K <= --processes={args.processes}\n")
    if args.elastic and args.max_processes and args.max_processes < args.processes:
        p.exit(2, f"error: --max-processes={args.max_processes}: expected at least --processes={args.processes}\n")
    if not args.command or not args.command[0].endswith(".py"):
        p.exit(2, "error: expected a Python script after --, e.g. -- scripts/train.py --config FILE\n")
    if not os.path.isfile(args.command[0]):
        p.exit(2, f"error: {args.command[0]}: no such file\n")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices: int) -> dict[str, str]:
    """This environment, with exactly ``devices`` emulated CPU devices and the CPU platform unless one is set."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Output:
    """What the launcher keeps of one process's output: its ``error: ...`` lines (held back: the launcher reports
    the failing process's reason once, in its own line) and whether JAX's coordination service aborted it because
    a peer was gone (that dump, to the end of the output, is not forwarded)."""

    def __init__(self):
        self.errors: list[str] = []
        self.peer_failed = False


def forward(proc: subprocess.Popen, prefix: str, lock: threading.Lock, out: Output) -> None:
    for line in proc.stdout:
        out.peer_failed = out.peer_failed or PEER_FAILURE_MARKER in line
        if out.peer_failed or any(marker in line for marker in PEER_LOST_MARKERS):
            continue
        if line.startswith(ERROR_PREFIX):
            out.errors.append(line[len(ERROR_PREFIX):].strip())
            continue
        with lock:
            sys.stdout.write(f"{prefix} {line}" if line.endswith("\n") else f"{prefix} {line}\n")
            sys.stdout.flush()


def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by signal {signal.Signals(-code).name}"
    return f"exited with code {code}"


def terminate(procs: list[subprocess.Popen], grace_s: float = TERMINATE_GRACE_S,
              sig: signal.Signals = signal.SIGTERM) -> None:
    """``sig`` to every running process group, then SIGKILL what is left after ``grace_s``."""
    for p in procs:
        if p.poll() is None:
            _signal_group(p, sig)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait()


def _signal_group(p: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:  # exited between the check and the signal
        pass


def first_failure(procs: list[subprocess.Popen]) -> int | None:
    """Index of the process that caused the failure. When one process dies its peers fail moments
    later, often within the same poll, and JAX's coordination client aborts them (SIGABRT). So the
    cause is, in order: a process killed from outside (any other signal), one that exited with an
    error, and only then one that aborted."""
    def rank(i: int) -> tuple[int, int]:
        code = procs[i].returncode
        return (0 if code < 0 and -code != signal.SIGABRT else 1 if code > 0 else 2), i

    failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
    return min(failed, key=rank, default=None)


class Job:
    """P processes of one command joined at a fresh coordinator port; output forwarded as ``[pI] ...``."""

    def __init__(self, processes: int, devices: int, command: list[str], request: str | None = None):
        self.address = f"127.0.0.1:{free_port()}"
        script, rest = command[0], command[1:]
        env = process_env(devices)
        if request is not None:  # the elastic hand-over: where a process asks the launcher for capacity
            env[handover.LAUNCHER_REQUEST_ENV] = request
        lock = threading.Lock()
        self.procs, self.forwarders = [], []
        self.outputs = [Output() for _ in range(processes)]
        for i in range(processes):
            argv = [sys.executable, "-u", script, "--coordinator", self.address, "--num-processes", str(processes),
                    "--process-id", str(i), *rest]
            # Own session per process: terminating it also reaches anything it started.
            p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 errors="replace", bufsize=1, start_new_session=True)
            self.procs.append(p)
            t = threading.Thread(target=forward, args=(p, f"[p{i}]", lock, self.outputs[i]), daemon=True)
            t.start()
            self.forwarders.append(t)
        print(f"launch_local: coordinator {self.address}; " + ", ".join(f"p{i} pid {p.pid}" for i, p in enumerate(self.procs)),
              file=sys.stderr, flush=True)

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def stop(self, grace_s: float = TERMINATE_GRACE_S, sig: signal.Signals = signal.SIGTERM) -> None:
        terminate(self.procs, grace_s, sig)
        for t in self.forwarders:
            t.join(timeout=5)

    def exit_code(self) -> int:
        """0 when every process exited 0, else the first failure's code (128 + N for signal N)."""
        code = next((c for c in (p.returncode for p in self.procs) if c), 0)
        return code if code >= 0 else 128 - code

    def report_failure(self, failed: int) -> int:
        """One line: the process that failed, its reason (its last ``error:`` line), the processes that died of its
        exit and those the launcher terminated, and any other process's reason where it differs; the exit code to
        pass on."""
        code = self.procs[failed].returncode
        errors = self.outputs[failed].errors
        others = [i for i in range(len(self.procs)) if i != failed]
        peers = [f"p{i}" for i in others if self.outputs[i].peer_failed]
        rest = len(others) - len(peers)
        line = f"error: process p{failed} (pid {self.procs[failed].pid}) {describe_exit(code)}"
        line += f": {errors[-1]}" if errors else ""
        line += f"; {', '.join(peers)} exited because p{failed} failed" if peers else ""
        line += f"; terminated the other {rest}" if rest else ""
        said = {i: self.outputs[i].errors[-1] for i in others if self.outputs[i].errors}
        for i, reason in said.items():  # another reason than the failing process's is not lost
            line += f"; p{i}: {reason}" if not errors or reason != errors[-1] else ""
        print(line, file=sys.stderr, flush=True)
        return code if code > 0 else 128 - code


def on_signals(job_of) -> None:
    """The launcher itself preempted: pass the signal on; the processes agree on a step, save it and
    exit (train.py: 0 after SIGTERM, 130 after SIGINT); the launcher exits as they did."""
    def on_signal(signum, _frame):
        job = job_of()
        if job is None:
            sys.exit(128 + signum)
        job.stop(PREEMPT_GRACE_S, signal.Signals(signum))
        sys.exit(job.exit_code())

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def launch(processes: int, devices: int, command: list[str]) -> int:
    job = Job(processes, devices, command)
    on_signals(lambda: job)
    failed = None
    while failed is None and job.running():
        time.sleep(POLL_S)
        failed = first_failure(job.procs)
    if failed is None:
        failed = first_failure(job.procs)
    job.stop()
    return 0 if failed is None else job.report_failure(failed)


# ---------------------------------------------------------------- elastic: restart on what is left

class Capacity:
    """How many process slots exist: ``--capacity-file`` (one integer, rewritten by a scheduler or by
    hand), read again whenever it changes; a slot whose process died is gone until it does."""

    def __init__(self, path: str | None, start: int, most: int):
        self.path, self.most = path, most
        self._stamp = None
        self.slots = min(start, most)
        self.changed()

    def changed(self) -> bool:
        """Re-read the file if it was rewritten; True when that changed the slot count."""
        if self.path is None or not os.path.isfile(self.path):
            return False
        stamp = os.stat(self.path).st_mtime_ns, os.stat(self.path).st_size
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            slots = min(int(Path(self.path).read_text().strip()), self.most)
        except ValueError:
            print(f"launch_local: warning: {self.path}: expected one integer (process slots); ignored",
                  file=sys.stderr, flush=True)
            return False
        before, self.slots = self.slots, slots
        return slots != before


def launch_elastic(args) -> int:
    """Run the job on as many processes as there are slots (``--min-processes`` .. ``--max-processes``).

    A process that dies (killed, crashed) takes its slot with it: the others are stopped and the job
    restarts on the processes left, from the last good checkpoint (train.py resumes it onto the new
    device count). A capacity change stops the job gracefully (SIGTERM: every process saves at one
    agreed step) and restarts it on the new count. A job that asks for more devices (exit code 75 and
    its request: see the module's doc) is restarted once the capacity file gives enough slots. A job
    that ends with exit code 0 is done; exit code 2 (bad input) is never retried.
    """
    with tempfile.TemporaryDirectory(prefix="launch_local.") as tmp:
        return run_elastic(args, Path(tmp) / "request.json")


def run_elastic(args, request: Path) -> int:
    """``launch_elastic``'s loop; ``request`` is where a job's processes ask for capacity."""
    capacity = Capacity(args.capacity_file, args.processes, args.max_processes or args.processes)
    current: list[Job | None] = [None]
    on_signals(lambda: current[0])
    need, why = args.min_processes, "--min-processes"  # the processes a job needs, and who said so
    restarts = 0
    while True:
        if capacity.slots < need and not wait_for_slots(capacity, args, need):
            print(f"error: launch_local: {need} processes needed ({why}), only {capacity.slots} available after "
                  f"waiting {args.wait_timeout:g} s (--wait-timeout)", file=sys.stderr, flush=True)
            return 2
        request.unlink(missing_ok=True)
        job = current[0] = Job(capacity.slots, args.devices_per_process, args.command, str(request))
        failed, resized = run_job(job, capacity, args)
        if failed is None and not resized:
            return 0
        asked = handover.read_request(request) if any(
            p.returncode == handover.NEED_CAPACITY_EXIT_CODE for p in job.procs) else None
        if asked is not None:  # the job handed waiting for capacity over to the launcher
            need = math.ceil(asked["need_devices"] / args.devices_per_process)
            why = f"{asked['reason']}; {args.devices_per_process} devices per process"
            if need > capacity.most:
                print(f"error: launch_local: {need} processes needed ({why}), at most {capacity.most} allowed "
                      "(--max-processes)", file=sys.stderr, flush=True)
                return 2
            if restarts >= args.max_restarts:
                print(f"error: launch_local: the job still asks for more devices after {restarts} restarts "
                      "(--max-restarts)", file=sys.stderr, flush=True)
                return 2
            print(f"launch_local: the job needs {asked['need_devices']} devices ({asked['reason']}): "
                  f"restarting it on {need} processes once there are slots", file=sys.stderr, flush=True)
        elif failed is not None:
            code = job.report_failure(failed)
            if code == 2 or restarts >= args.max_restarts:
                return code
            capacity.slots = len(job.procs) - 1  # the dead process's slot is gone until the capacity file says otherwise
            print(f"launch_local: restarting on {capacity.slots} processes from the last checkpoint",
                  file=sys.stderr, flush=True)
        restarts += 1


def run_job(job: Job, capacity: Capacity, args) -> tuple[int | None, bool]:
    """Wait for ``job`` to end; stop it gracefully when the capacity changes. The process that failed (None:
    none), and whether the job was stopped to resize."""
    failed, resized = None, False
    while failed is None and job.running():
        time.sleep(POLL_S)
        failed = first_failure(job.procs)
        if failed is None and capacity.changed():
            resized = True
            print(f"launch_local: capacity now {capacity.slots} processes ({args.capacity_file}): stopping "
                  f"at a checkpoint to restart on {capacity.slots}", file=sys.stderr, flush=True)
            job.stop(PREEMPT_GRACE_S)
    if failed is None and not resized:
        failed = first_failure(job.procs)
    job.stop()
    return failed, resized


def wait_for_slots(capacity: Capacity, args, need: int) -> bool:
    """Wait (up to --wait-timeout) for the capacity file to give at least ``need`` slots."""
    print(f"launch_local: waiting up to {args.wait_timeout:g} s for {need} process slots "
          f"({capacity.slots} available; {args.capacity_file or 'no --capacity-file'})", file=sys.stderr, flush=True)
    deadline = time.monotonic() + args.wait_timeout
    while time.monotonic() < deadline:
        capacity.changed()
        if capacity.slots >= need:
            return True
        time.sleep(POLL_S)
    return False


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.elastic:
        sys.exit(launch_elastic(args))
    sys.exit(launch(args.processes, args.devices_per_process, args.command))


if __name__ == "__main__":
    main()
