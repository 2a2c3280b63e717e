"""Multi-process start-up on JAX's multi-controller runtime (``jax.distributed``).

Every process runs the same program; this module only decides whether and how to join
the others, and must run before anything touches a JAX backend. Sources, first match wins:

1. explicit arguments (``--coordinator HOST:PORT --num-processes N --process-id I``);
2. ``auto=True``: JAX's own cluster detection (Cloud TPU pod slices, SLURM, Open MPI, GKE);
3. a SLURM job step with more than one task (``srun``): JAX's SLURM detection;
4. otherwise one process: nothing to do.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import jax
import numpy as np

from framework.config import ConfigError

# JAX aborts the whole process (a C++ fatal error with a stack trace) when joining times
# out, so it cannot be caught: our watchdog fires first and ends the process with one line.
JAX_TIMEOUT_MARGIN_S = 30
JOIN_FAILED_EXIT_CODE = 1

# The variables JAX's SLURM detection reads; all are set inside an ``srun`` step.
SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@dataclass(frozen=True)
class DistributedArgs:
    """How this process joins the others; all ``None`` and ``auto=False`` means decide from the environment."""

    coordinator: str | None = None  # "HOST:PORT" where process 0 serves the coordination service
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False  # let jax.distributed.initialize() read the cluster (TPU pod slice, SLURM, Open MPI)
    timeout_s: int = 300  # give up joining after this long, with a one-line error


@dataclass(frozen=True)
class JoinPlan:
    """The keyword arguments for ``jax.distributed.initialize``, and where they came from for error messages."""

    kwargs: dict
    coordinator: str
    source: str  # the flag or environment that asked for multiple processes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The start-up flags every multi-process script accepts."""
    g = parser.add_argument_group("multiple processes (jax.distributed)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="address of process 0's coordinator")
    g.add_argument("--num-processes", type=int, default=None, metavar="N")
    g.add_argument("--process-id", type=int, default=None, metavar="I")
    g.add_argument("--distributed-auto", action="store_true",
                   help="let JAX detect the cluster (Cloud TPU pod slices, SLURM, Open MPI)")
    g.add_argument("--join-timeout", type=int, default=300, metavar="S",
                   help="seconds to wait for all processes to join (default 300)")


def args_from_namespace(ns: argparse.Namespace) -> DistributedArgs:
    return DistributedArgs(coordinator=ns.coordinator, num_processes=ns.num_processes, process_id=ns.process_id,
                           auto=ns.distributed_auto, timeout_s=ns.join_timeout)


def plan_join(args: DistributedArgs, environ: Mapping[str, str]) -> JoinPlan | None:
    """What ``initialize`` will do, without doing it; ``None`` means a single process."""
    if args.timeout_s <= 0:
        raise ConfigError(f"--join-timeout={args.timeout_s}: expected a positive number of seconds")
    explicit = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
                "--process-id": args.process_id}
    if any(v is not None for v in explicit.values()):
        missing = [flag for flag, v in explicit.items() if v is None]
        if missing:
            raise ConfigError(f"{', '.join(missing)} missing: --coordinator, --num-processes and "
                                       "--process-id go together")
        _check_address(args.coordinator)
        if args.num_processes < 1:
            raise ConfigError(f"--num-processes={args.num_processes}: expected at least 1")
        if not 0 <= args.process_id < args.num_processes:
            raise ConfigError(f"--process-id={args.process_id}: expected 0 <= id < "
                                       f"--num-processes={args.num_processes}")
        if args.num_processes == 1:
            return None
        return JoinPlan(dict(coordinator_address=args.coordinator, num_processes=args.num_processes,
                             process_id=args.process_id), args.coordinator, "--coordinator")
    if args.auto:
        return JoinPlan({}, "chosen by JAX's cluster detection", "--distributed-auto")
    if all(v in environ for v in SLURM_STEP_VARS) and int(environ["SLURM_NTASKS"]) > 1:
        return JoinPlan(dict(cluster_detection_method="slurm"),
                        f"on the first node of SLURM_STEP_NODELIST={environ['SLURM_STEP_NODELIST']}",
                        f"SLURM_NTASKS={environ['SLURM_NTASKS']}")
    return None


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--coordinator={address!r}: expected HOST:PORT, e.g. 10.0.0.1:1234")


def initialize(args: DistributedArgs, environ: Mapping[str, str] = os.environ) -> bool:
    """Join the other processes (True) or do nothing for a single process (False).

    Call before any JAX computation. A process that has not joined within
    ``args.timeout_s`` prints one ``error:`` line naming the coordinator and exits.
    """
    plan = plan_join(args, environ)
    if plan is None:
        return False
    # CPU processes need a collectives backend to talk to each other; other platforms ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.process_id is None:
        who, hint = "this process", "did every process start?"
    elif args.process_id == 0:
        who, hint = f"process 0 of {args.num_processes}", "did every process start?"
    else:
        who, hint = f"process {args.process_id} of {args.num_processes}", "is process 0 running and reachable from here?"
    message = f"error: {who} could not join the coordinator {plan.coordinator} within {args.timeout_s} s ({hint})"
    watchdog = threading.Timer(args.timeout_s, _give_up, (message,))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**plan.kwargs, initialization_timeout=args.timeout_s + JAX_TIMEOUT_MARGIN_S)
    except ValueError as e:  # e.g. --distributed-auto where JAX detects no cluster
        raise ConfigError(f"{plan.source}: jax.distributed could not start: {e}") from None
    finally:
        watchdog.cancel()
    return True


def _give_up(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(JOIN_FAILED_EXIT_CODE)


def shutdown() -> None:
    """Leave the distributed runtime cleanly (waits for the other processes); no-op for one process."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


@contextmanager
def fail_fast() -> Iterator[None]:
    """In a multi-process run, let an error end this process at once.

    Otherwise JAX's exit handler waits at the shutdown barrier (up to 5 minutes) for
    processes that are themselves stuck waiting for this one in a collective; exiting
    now lets the launcher (or ``srun --kill-on-bad-exit``) see the failure and stop the rest.
    """
    try:
        yield
    except BaseException as e:
        if not jax.distributed.is_initialized() or (isinstance(e, SystemExit) and e.code in (0, None)):
            raise
        if isinstance(e, SystemExit):
            code = e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
        else:
            code = 130 if isinstance(e, KeyboardInterrupt) else 1
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def from_primary(values: Sequence[float]) -> list[float]:
    """Process 0's ``values`` on every process (as float32 when there are several).

    Decisions taken from what each process measures (step times, device capacity) must be the
    same everywhere, or the processes run different programs and their collectives never
    pair up. A device collective: call it from the main thread on every process.
    """
    if jax.process_count() == 1:
        return list(values)
    from jax.experimental import multihost_utils

    return [float(v) for v in np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(values, np.float32)))]


def spread_over_processes(devices: Sequence[jax.Device], n: int) -> list[jax.Device]:
    """The first ``n`` of ``devices``, as many from each process, in their given order.

    Every process must own devices of a multi-process mesh (each one drives its own), so a
    subset takes the same number from each; with one process it is ``devices[:n]``.
    """
    processes = sorted({d.process_index for d in devices})
    if len(processes) == 1:
        return list(devices[:n])
    if n % len(processes):
        raise ConfigError(f"{n} devices cannot be shared evenly by {len(processes)} processes: "
                          f"expected a multiple of {len(processes)}")
    per = n // len(processes)
    taken = {pid: [d for d in devices if d.process_index == pid][:per] for pid in processes}
    if any(len(ds) < per for ds in taken.values()):
        raise ConfigError(f"{n} devices need {per} from each of {len(processes)} processes; some have fewer")
    chosen = {d for ds in taken.values() for d in ds}
    return [d for d in devices if d in chosen]


def share_over_processes(devices: Sequence[jax.Device], n: int) -> list[jax.Device]:
    """``n`` of ``devices`` with every process owning some: as many from each as ``n`` allows, the first processes
    one more when ``n`` does not divide (4 of 3 processes x 2 devices: 2, 1, 1). For a layout that leaves devices
    idle: each process drives its own devices, and builds the rows they hold (its share of the batch, uneven too)."""
    processes = sorted({d.process_index for d in devices})
    if len(processes) == 1 or n % len(processes) == 0:
        return spread_over_processes(devices, n)
    if n < len(processes):
        raise ConfigError(f"{n} devices cannot give each of {len(processes)} processes one: every process "
                          "drives part of the mesh")
    per, extra = divmod(n, len(processes))
    own = {pid: [d for d in devices if d.process_index == pid] for pid in processes}
    taken = {pid: own[pid][:per + (i < extra)] for i, pid in enumerate(processes)}
    if any(len(taken[pid]) < per + (i < extra) for i, pid in enumerate(processes)):
        raise ConfigError(f"{n} devices need {per} or {per + 1} from each of {len(processes)} processes; some have fewer")
    chosen = {d for ds in taken.values() for d in ds}
    return [d for d in devices if d in chosen]
