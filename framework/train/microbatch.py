"""The micro-batch follows device memory (memory tiers, framework/memory): one concern of the Trainer, in its
own file (a mixin of ``Trainer``).

The global batch never changes, so neither do the losses: a smaller micro-batch means more gradient
accumulation. ``train.micro_batch: auto`` starts at the largest micro-batch whose compiled step fits the
budget; before each step, free memory under ``memory.headroom_bytes`` shrinks it, and
``memory.regrow_after_steps`` steps with room grow it back. A step that runs out of device memory
(RESOURCE_EXHAUSTED) is retried smaller: at dispatch, from the same state (``Trainer.step``); when the
failure surfaces at ``device_get`` in the loop the donated state is gone, so the loop stops
(``StepOutOfMemory``) and the run restarts at the smaller micro-batch from its latest checkpoint, or from
its first state (``Trainer._fit``). Every process adopts the same, smallest, micro-batch any of them asks for
(``agree_micro_batch``: the distributed client's key-value store, which works when a device collective would
wait on a failed step).
"""
from __future__ import annotations

import dataclasses
import itertools
import sys

import jax
import numpy as np

from framework import memory
from framework.config import Config, ConfigError


def with_grad_accum(cfg: Config, grad_accum: int) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=grad_accum))


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is XLA's allocation failure (a step, or a buffer it needs, did not fit)."""
    return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


class StepOutOfMemory(Exception):
    """Step ``step`` ran out of device memory after its (donated) state was handed over: the loop cannot go on
    from it, the run restarts at a smaller micro-batch (``Trainer._fit``)."""

    def __init__(self, step: int, where: str):
        super().__init__(f"step {step + 1} ran out of device memory (RESOURCE_EXHAUSTED at {where})")
        self.step, self.where = step, where


_agreements = itertools.count()  # the same sequence number on every process: each call is one agreement
AGREE_TIMEOUT_MS = 300_000


def agree_micro_batch(micro: int) -> int:
    """The smallest of the micro-batches every process proposes (each its own ``micro``); ``micro`` with one process.

    Through the distributed client's key-value store, not a device collective: a process whose step failed may
    have left a collective the others still wait in. Every process calls it once per out-of-memory retry."""
    if jax.process_count() == 1:
        return micro
    from jax._src import distributed

    client, n = distributed.global_state.client, next(_agreements)
    client.key_value_set(f"meshpilot/micro_batch/{n}/{jax.process_index()}", str(micro))
    return min(int(client.blocking_key_value_get(f"meshpilot/micro_batch/{n}/{p}", AGREE_TIMEOUT_MS))
               for p in range(jax.process_count()))


class MicroBatchControl:
    """The Trainer's micro-batch: which sizes can run, the largest that fits, and following free memory."""

    _largest_micro: int  # the micro-batch the run started with: growing back stops there
    _roomy_steps: int  # steps in a row with free memory above the headroom

    @property
    def micro_batch(self) -> int:
        return self.cfg.train.global_batch // self.cfg.train.grad_accum

    def _micro_batch_candidates(self) -> list[int]:
        """Micro-batch sizes that divide the global batch and split over the data-parallel devices, largest first."""
        t = self.cfg.train
        dp = self.layout.data_parallel
        candidates = [m for m in range(t.global_batch, 0, -1) if t.global_batch % m == 0
                      and m % t.pipeline_microbatches == 0 and m % (dp * self.layout.pipeline_microbatches) == 0]
        if not candidates:
            raise ConfigError(f"train.global_batch={t.global_batch} has no micro-batch divisible by the data-parallel size {dp}")
        return candidates

    def _step_bytes(self, micro: int) -> int:
        """Device bytes of the step compiled for micro-batch ``micro`` (compiled now if it was not)."""
        needs = self._compiled_needs(self.cfg.train.global_batch // micro)
        return sum(memory.device_bytes_by_category(needs, self.placement).values())

    def _auto_grad_accum(self) -> int:
        """Compile the step for each micro-batch (largest first) and keep the first whose device bytes fit the budget."""
        t, budget = self.cfg.train, self.layout.memory_budget
        tried = []
        for micro in self._micro_batch_candidates():
            need = self._step_bytes(micro)
            tried.append(f"{micro}: {need:,} B")
            if need <= budget:
                if jax.process_index() == 0:
                    print(f"train.micro_batch=auto: micro-batch {micro} x grad_accum {t.global_batch // micro} "
                          f"(step needs {need:,} B per device, budget {budget:,} B)", flush=True)
                return t.global_batch // micro
        raise ConfigError(
            f"train.micro_batch=auto: no micro-batch fits memory.device_budget_bytes={budget:,} "
            f"(device bytes per micro-batch size: {'; '.join(tried)})"
        )

    def _follow_memory(self, state) -> None:
        """Before a step: shrink the micro-batch when free memory is under the headroom; grow it back
        (up to the one the run started with) after ``memory.regrow_after_steps`` steps with room for it."""
        headroom, regrow = self.cfg.memory.headroom_bytes, self.cfg.memory.regrow_after_steps
        free = None if headroom is None else self.memory_monitor.read(self.devices).free
        if free is not None and jax.process_count() > 1:  # every process decides on the tightest one
            from jax.experimental import multihost_utils

            free = int(np.min(multihost_utils.process_allgather(np.int64(free))))
        if free is None:
            return
        if free < headroom:
            self._roomy_steps = 0
            self._shrink_micro_batch(state, f"free device memory {free:,} B is under memory.headroom_bytes={headroom:,}")
            return
        self._roomy_steps += 1
        larger = [m for m in self._micro_batch_candidates() if self.micro_batch < m <= self._largest_micro]
        if regrow and larger and self._roomy_steps >= regrow:
            extra = self._step_bytes(larger[-1]) - self._step_bytes(self.micro_batch)
            if free - extra >= headroom:
                self._set_micro_batch(int(jax.device_get(state.step)), larger[-1],
                                      f"free device memory {free:,} B for {self._roomy_steps} steps covers "
                                      f"memory.headroom_bytes={headroom:,} and the {extra:,} B more it needs")

    def _shrink_micro_batch(self, state, why: str) -> bool:
        smaller = [m for m in self._micro_batch_candidates() if m < self.micro_batch]
        if smaller:
            self._set_micro_batch(int(jax.device_get(state.step)), smaller[0], why)
        return bool(smaller)

    def _shrink_after_oom(self, step: int, why: str) -> bool:
        """After step index ``step`` ran out of memory: the next smaller micro-batch, the smallest any process asks
        for; False when this one is the smallest (on every process: all of them then raise)."""
        smaller = [m for m in self._micro_batch_candidates() if m < self.micro_batch]
        micro = agree_micro_batch(smaller[0] if smaller else self.micro_batch)
        shrinks = micro < self.micro_batch
        if shrinks:
            self._set_micro_batch(step, micro, why)
        return shrinks

    def _set_micro_batch(self, step: int, micro: int, why: str) -> None:
        old, old_accum = self.micro_batch, self.cfg.train.grad_accum
        self.cfg = with_grad_accum(self.cfg, self.cfg.train.global_batch // micro)
        self.layout.current, self._roomy_steps = None, 0
        if jax.process_index() == 0:
            print(f"memory: step {step + 1}: micro-batch {old} -> {micro} (grad_accum {old_accum} "
                  f"-> {self.cfg.train.grad_accum}, same global batch): {why}", file=sys.stderr, flush=True)
