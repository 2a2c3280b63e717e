"""Memory tiers, computation on the host: the optimizer update where pinned_host state lives (ZeRO-Offload).

With ``memory.opt_state: pinned_host`` the update runs on the host (``compute_on("device_host")``):
the gradients and parameters travel to host memory, the optimizer state never comes to the device,
and only the new parameters travel back. With ``memory.grads: pinned_host`` the gradients go to host
memory as each micro-batch produces them and are accumulated there. The checks read the program
lowered for a GPU, where the placement is real (on CPU host and device are one memory).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax
from jax.experimental.compute_on import compute_on

HOST_COMPUTE = '_xla_compute_type = "host"'  # the placement jax gives a compute_on("device_host") call and its ops


def on_host(fn: Callable) -> Callable:
    """``fn`` as one host computation; its array arguments must already be in pinned_host."""
    def run(*args):
        with compute_on("device_host"):
            return jax.jit(fn)(*args)

    return run


# ------------------------------------------------------------------ the check, on the program lowered for a GPU


@dataclasses.dataclass
class HostUpdateCheck:
    """Where the program lowered for a GPU keeps, and computes on, the step's pinned_host arguments."""

    host_calls: int  # calls of functions placed on the host (``_xla_compute_type = "host"``)
    host_ops: int  # operations inside those functions (they run in the host call)
    unannotated: list[str]  # names of those operations that carry no host annotation of their own
    host_args: int  # arguments of the step in pinned_host
    read_on_device: int  # of those, the ones some operation other than a host computation reads


_ARG = re.compile(r"%arg(\d+): [^{]*\{([^}]*)\}")
_OP = re.compile(r"^\s*(?:(%[\w#:]+) = )?\"?([a-z_]+\.[a-z_]+)")
_VALUE = re.compile(r"%[\w]+")


def _functions(text: str) -> dict[str, list[str]]:
    """Function name -> its lines (the signature first), for a module's top-level functions."""
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r"^  func\.func \w+ @\"?([^\"(]+)\"?\(", line)
        if m:
            name = m.group(1)
            out[name] = [line]
        elif name is not None:
            out[name].append(line)
            if line == "  }":
                name = None
    return out


def _host_call(line: str) -> bool:
    return " call @" in line and HOST_COMPUTE in line


def _passes_through(line: str) -> bool:
    """Ops that keep a value where it is: sharding constraints, and placements into pinned_host."""
    return "sdy.sharding_constraint" in line or ("annotate_device_placement" in line and '"pinned_host"' in line)


def check_host_update(hlo_text: str) -> HostUpdateCheck:
    """Count, in a lowered module's text, the host computations and what reads the pinned_host arguments.

    A pinned_host argument is followed through sharding constraints and placements into
    pinned_host; any other reader than a host computation or the return (a move to device
    memory, arithmetic on the device) counts it as read on the device.
    """
    functions = _functions(hlo_text)
    main = functions["main"]
    calls = [line for body in functions.values() for line in body if _host_call(line)]
    host_fns = {re.search(r"call @\"?([^\"(]+)\"?\(", line).group(1) for line in calls}
    ops = [m.group(2) for f in host_fns for line in functions[f][1:] if (m := _OP.match(line))
           and m.group(2) not in ("func.return", "stablehlo.constant")]
    unannotated = sorted({op for f in host_fns for line in functions[f][1:] if (m := _OP.match(line))
                          and (op := m.group(2)) not in ("func.return", "stablehlo.constant") and "_xla_compute_type" not in line})
    host_args = [f"%arg{i}" for i, attrs in _ARG.findall(main[0]) if 'memory_kind = "pinned_host"' in attrs]
    read_on_device = 0
    for arg in host_args:
        values, on_device = {arg}, False
        for line in main[1:]:
            m = _OP.match(line)
            if m is None or not values & set(_VALUE.findall(line.split("=", 1)[-1] if m.group(1) else line)):
                continue
            if _passes_through(line) and m.group(1):
                values.add(m.group(1))
            elif not (_host_call(line) or m.group(2) == "func.return"):
                on_device = True
        read_on_device += on_device
    return HostUpdateCheck(len(calls), len(ops), unannotated, len(host_args), read_on_device)
