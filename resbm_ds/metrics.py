"""A run's metrics.jsonl: written by the trainer on rank 0 (one row per logged step, one per
evaluation), read by the trainer's summary and the benchmarks."""
from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir) -> tuple[list[dict], list[dict]]:
    """(training rows, which have `loss`; evaluation rows, which have `val_loss`) of a run."""
    rows = [json.loads(r) for r in (Path(run_dir) / METRICS_FILE).read_text().splitlines() if r.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


class Metrics:
    """metrics.jsonl (rank 0) plus DeepSpeed's monitor (TensorBoard/CSV) for the same scalars."""

    def __init__(self, path: Path, engine, resumed_step: int, enabled: bool):
        self.path, self.engine, self.enabled = path, engine, enabled
        if enabled and path.exists():   # drop rows past the checkpoint we resumed from
            rows = [r for r in path.read_text().splitlines()
                    if r and json.loads(r).get("step", 0) <= resumed_step]
            path.write_text("".join(r + "\n" for r in rows))

    def log(self, row: dict):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None and monitor.enabled:
            monitor.write_events([(f"resbm/{k}", float(v), row["step"]) for k, v in row.items()
                                  if k != "step" and isinstance(v, (int, float))])
