"""The compiled step builder: one placement's jitted train and eval steps, compiled per micro-batch count on
first use and kept, so that returning to a micro-batch (or, through the layout, to a mesh) costs no compile.
Every compile is handed to ``on_compiled`` (``logging.dump_hlo``: framework/train/artifacts.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax


class CompiledSteps:
    """The jitted steps of one layout and placement; ``compiled(grad_accum)`` compiles once per micro-batch count."""

    def __init__(self, train_step: Callable, eval_step: Callable, abstract_inputs: Callable,
                 on_compiled: Callable[[int, jax.stages.Compiled], None] | None = None):
        self.train_step = train_step  # jitted: (state, batch) -> (state, metrics[, gradients for the nvme update])
        self.eval_step = eval_step  # jitted: (params, batch) -> metrics
        self._abstract_inputs = abstract_inputs  # (global_batch, seq_len, grad_accum) -> (state, batch) ShapeDtypeStructs
        self._on_compiled = on_compiled  # (grad_accum, compiled train step), once per compile
        self._compiled: dict[int, jax.stages.Compiled] = {}
        self.ran: set[int] = set()  # micro-batch counts whose compiled step has run in this process

    def lower(self, global_batch: int, seq_len: int, grad_accum: int, platform: str | None = None):
        """The train step lowered for ``grad_accum`` micro-batches; for another ``platform`` (e.g. ``cuda``) to read its program."""
        args = self._abstract_inputs(global_batch, seq_len, grad_accum)
        if platform is not None:
            return self.train_step.trace(*args).lower(lowering_platforms=(platform,))
        return self.train_step.lower(*args)

    def compiled(self, global_batch: int, seq_len: int, grad_accum: int) -> jax.stages.Compiled:
        if grad_accum not in self._compiled:
            self._compiled[grad_accum] = self.lower(global_batch, seq_len, grad_accum).compile()
            if self._on_compiled is not None:
                self._on_compiled(grad_accum, self._compiled[grad_accum])
        return self._compiled[grad_accum]


def enable_compilation_cache(path: str) -> None:
    """Persist compiled executables under ``path``: a restarted or repeated run skips compilation.

    Every compile is cached (no minimum compile time), since the user asked for the cache.
    """
    jax.config.update("jax_compilation_cache_dir", str(Path(path).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
