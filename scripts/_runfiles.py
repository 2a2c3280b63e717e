"""What a run dir holds, read back for the scripts that draw it (plot.py, report.py); one-line errors for bad files."""
from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    from framework.config import ConfigError

    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise ConfigError(f"{path}:{i}: not a JSON object") from None
    return records


def read_json(path: Path, expected: str) -> dict | None:
    """``path`` as JSON (None when absent); a file that is not is one line naming what it should hold."""
    from framework.config import ConfigError

    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError:
        raise ConfigError(f"{path}: not JSON (expected {expected})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected {expected}")
    return data


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training step records, evaluation records) of RUN_DIR/metrics.jsonl; an error when it is not a run's."""
    from framework.config import ConfigError

    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"{metrics}: not found (expected a run directory written by scripts/train.py)")
    logged = read_jsonl(metrics)
    records = [r for r in logged if "loss" in r]  # training steps; evaluation records carry eval_* keys instead
    if not records:
        raise ConfigError(f"{metrics}: no records")
    return records, [r for r in logged if "eval_loss" in r]


def mesh_changes(records: list[dict]) -> list[tuple[int, dict]]:
    """(step, new mesh) wherever the mesh differs from the previous record's."""
    out = []
    for prev, rec in zip(records, records[1:]):
        if rec.get("mesh") != prev.get("mesh"):
            out.append((rec["step"], rec.get("mesh")))
    return out
