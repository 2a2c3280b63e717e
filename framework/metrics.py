"""Step metrics: metrics.jsonl on resume, a progress bar; and the numbers a benchmark (and each logged step)
reports: model FLOPs per step, device peaks, MFU, step timings.

What leaves the loop goes through the trackers (framework/trackers/: metrics.jsonl, TensorBoard, wandb). Only
process 0 writes; on other processes the bar and the trackers do nothing, so the loop never branches on it.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import jax

from framework.fileio import atomic_write

METRICS_FILE = "metrics.jsonl"  # one JSON object per logged step (framework/trackers/jsonl.py writes it)


def drop_records_after(run_dir: str | Path | None, step: int) -> int:
    """On resume from ``step``: forget logged steps after it, which are about to be trained again.

    Returns the newest step logged before (0 when none; on process 0 only, which reads the file).
    """
    path = Path(run_dir) / METRICS_FILE if run_dir is not None else None
    if path is None or not path.is_file() or jax.process_index() != 0:
        return 0
    kept, newest = [], 0
    for line in path.read_text().splitlines():
        try:
            logged = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):  # a line cut short by a killed process
            continue
        newest = max(newest, logged)
        if logged <= step:
            kept.append(line + "\n")
    text = "".join(kept)
    if text != path.read_text():
        atomic_write(path, text)  # a kill here leaves the file as it was, not cut short
    return newest


class ProgressBar:
    """tqdm bar with loss and throughput; silent on processes other than 0 or when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self._bar = None
        if enabled and jax.process_index() == 0:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, record: dict) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ---------------------------------------------------------------- FLOPs, peaks, MFU, timing

# Dense (no sparsity) bf16 peak FLOP/s of one chip, from the vendors' data sheets. Matched
# against ``jax.Device.device_kind`` in order, so more specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / HBM3
    ("H200", 989e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports itself as "TPU v5"
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
)


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device, or None when unknown (CPU: no meaningful peak)."""
    for name, peak in PEAK_BF16_FLOPS:
        if name.lower() in device_kind.lower():
            return peak
    return None


@dataclass(frozen=True)
class ModelFlops:
    """Training FLOPs of one optimizer step of a decoder LM (forward + backward).

    ``6 * matmul_params * tokens + 12 * n_layers * d_model * seq_len * tokens``:
    2 FLOPs per multiply-add, times 3 for forward + backward (the backward pass does two
    matmuls per forward one). ``matmul_params`` is every parameter except the input
    embedding lookups (token table when untied, position table), which are gathers, not
    matmuls, and are excluded as is customary; a tied token table counts once, as the
    output projection. The attention term is QK^T and AV over the full seq_len x seq_len
    score matrix (PaLM's convention: causal masking is not discounted). Remat recompute
    is not counted (this is model FLOPs, not hardware FLOPs).
    """

    matmul_params: int
    tokens: int
    n_layers: int
    d_model: int
    seq_len: int

    FORMULA = "6 * matmul_params * tokens + 12 * n_layers * d_model * seq_len * tokens"

    @property
    def dense(self) -> float:
        return 6.0 * self.matmul_params * self.tokens

    @property
    def attention(self) -> float:
        return 12.0 * self.n_layers * self.d_model * self.seq_len * self.tokens

    @property
    def total(self) -> float:
        return self.dense + self.attention


def active_param_count(cfg, param_count: int) -> int:
    """Parameters each token runs through: of a mixture-of-experts layer (``model.moe``) only its ``top_k`` routed
    experts count (the router and shared experts always do); a dense model's are all of ``param_count``."""
    m, e = cfg.model, cfg.model.moe
    if not e.n_experts:
        return param_count
    moe_layers = sum((i + 1) % e.every == 0 for i in range(m.n_layers))
    per_expert = 3 * m.d_model * (e.d_expert_mlp or m.d_mlp)  # SwiGLU: gate, up, down
    return param_count - moe_layers * (e.n_experts - e.top_k) * per_expert


def model_flops(cfg, param_count: int) -> ModelFlops:
    """FLOPs per step of the config's transformer with ``param_count`` parameters in all (MoE: the active ones)."""
    param_count = active_param_count(cfg, param_count)
    m, t = cfg.model, cfg.train
    tied = m.tie_embeddings if m.tie_embeddings is not None else m.style == "gpt"
    lookups = 0 if tied else m.vocab_size * m.d_model
    if m.style == "gpt":
        lookups += m.max_seq_len * m.d_model
    return ModelFlops(param_count - lookups, t.global_batch * t.seq_len, m.n_layers, m.d_model, t.seq_len)


def mfu(flops_per_step: float, step_seconds: float, n_devices: int, device_kind: str) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' summed bf16 peak."""
    peak = peak_flops(device_kind)
    if peak is None or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (peak * n_devices)


def summarize(seconds: list[float]) -> dict:
    """median / min / max / mean of a list of durations (seconds)."""
    xs = sorted(seconds)
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "mean": statistics.fmean(xs)}


class StepClock:
    """Per-step timings of an asynchronously dispatched loop, without blocking on the step in flight.

    Call ``data_ready()`` when the batch is in hand, ``dispatched()`` when the step call
    returned, then ``previous_done(result)`` which blocks on the *previous* step's result
    (as the Trainer fetches metrics one step late). If the previous step is still running
    when the next one has been dispatched, the device had the next step queued before it
    finished the previous one: no idle gap between them. The intervals between completions
    are the step times the device delivered.
    """

    def __init__(self):
        self.data_s: list[float] = []
        self.dispatch_s: list[float] = []
        self.wait_s: list[float] = []
        self.done_at: list[float] = []
        self.queued_behind: list[bool] = []  # next step dispatched while the previous still ran
        self.cpu_s = 0.0  # process CPU time (all threads) from start() to the last completion
        self._t = time.perf_counter()
        self._cpu0 = time.process_time()

    def start(self) -> None:
        self._t = time.perf_counter()
        self._cpu0 = time.process_time()

    def data_ready(self) -> None:
        now = time.perf_counter()
        self.data_s.append(now - self._t)
        self._t = now

    def dispatched(self) -> None:
        now = time.perf_counter()
        self.dispatch_s.append(now - self._t)
        self._t = now

    def previous_done(self, result) -> None:
        self.queued_behind.append(not all(x.is_ready() for x in jax.tree.leaves(result)))
        jax.block_until_ready(result)
        now = time.perf_counter()
        self.wait_s.append(now - self._t)
        self.done_at.append(now)
        self.cpu_s = time.process_time() - self._cpu0
        self._t = now

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.done_at, self.done_at[1:])]

    def report(self) -> dict:
        """Step time stats and the host's share: data wait, dispatch, and steps with no device gap."""
        host = [d + p for d, p in zip(self.data_s, self.dispatch_s)]
        return {
            "step_s": summarize(self.step_times()),
            "host_data_s": summarize(self.data_s)["median"],
            "host_dispatch_s": summarize(self.dispatch_s)["median"],
            "host_work_s": summarize(host)["median"],
            "host_wait_s": summarize(self.wait_s)["median"],
            # CPU seconds the whole process spent per step: on a shared CPU machine, far less
            # sensitive to other processes' load than wall time
            "cpu_s_per_step": self.cpu_s / len(self.done_at),
            # the last step has no successor; the fraction is over the steps that do
            "gap_free_fraction": sum(self.queued_behind[:-1]) / max(len(self.queued_behind) - 1, 1),
        }
