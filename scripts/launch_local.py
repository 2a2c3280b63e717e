#!/usr/bin/env python
"""Run a script as P cooperating JAX processes on this machine, each with D emulated CPU devices.

    python scripts/launch_local.py --processes 2 --devices-per-process 4 -- scripts/train.py --config configs/tiny_lm.yaml

Each process gets ``--coordinator 127.0.0.1:PORT --num-processes P --process-id I`` right
after the script path; its output is forwarded line by line as ``[pI] ...``. If one process
fails, the others are terminated and the launcher exits non-zero naming the process.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

TERMINATE_GRACE_S = 5  # JAX's preemption notifier catches SIGTERM in joined processes, so SIGKILL follows
PREEMPT_GRACE_S = 300  # the launcher itself signalled: time for the processes to save a checkpoint
POLL_S = 0.1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, required=True, metavar="P")
    p.add_argument("--devices-per-process", type=int, default=1, metavar="D")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT.py [args ...]")
    args = p.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if args.processes < 1:
        p.exit(2, f"error: --processes={args.processes}: expected at least 1\n")
    if args.devices_per_process < 1:
        p.exit(2, f"error: --devices-per-process={args.devices_per_process}: expected at least 1\n")
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


def forward(proc: subprocess.Popen, prefix: str, lock: threading.Lock) -> None:
    for line in proc.stdout:
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


def launch(processes: int, devices: int, command: list[str]) -> int:
    address = f"127.0.0.1:{free_port()}"
    script, rest = command[0], command[1:]
    env = process_env(devices)
    lock = threading.Lock()
    procs, forwarders = [], []
    for i in range(processes):
        argv = [sys.executable, "-u", script, "--coordinator", address, "--num-processes", str(processes),
                "--process-id", str(i), *rest]
        # Own session per process: terminating it also reaches anything it started.
        p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             errors="replace", bufsize=1, start_new_session=True)
        procs.append(p)
        t = threading.Thread(target=forward, args=(p, f"[p{i}]", lock), daemon=True)
        t.start()
        forwarders.append(t)

    print(f"launch_local: coordinator {address}; " + ", ".join(f"p{i} pid {p.pid}" for i, p in enumerate(procs)),
          file=sys.stderr, flush=True)

    def on_signal(signum, _frame):
        # preempted: pass the signal on; the processes agree on a step, save it and exit (train.py: 0 / 130)
        terminate(procs, PREEMPT_GRACE_S, signal.Signals(signum))
        for t in forwarders:
            t.join(timeout=5)
        codes = [p.returncode for p in procs]
        sys.exit(next((c if c > 0 else 128 - c for c in codes if c), 0))

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    failed = None
    while failed is None and any(p.poll() is None for p in procs):
        time.sleep(POLL_S)
        failed = first_failure(procs)
    if failed is None:
        failed = first_failure(procs)
    if failed is not None:
        terminate(procs)
    for t in forwarders:
        t.join(timeout=5)
    if failed is None:
        return 0
    code = procs[failed].returncode
    print(f"error: process p{failed} (pid {procs[failed].pid}) {describe_exit(code)}; "
          f"terminated the other {processes - 1}", file=sys.stderr, flush=True)
    return code if code > 0 else 128 - code


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.exit(launch(args.processes, args.devices_per_process, args.command))


if __name__ == "__main__":
    main()
