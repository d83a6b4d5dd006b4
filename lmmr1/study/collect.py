"""One finished `lmmr1 fit` / `lmmr1 validate` run folder -> the numbers a study keeps (from the CSV logger's
metrics.csv, read by lmmr1.plots): held-out greedy accuracy per set at the last validation, and per-step training
curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmmr1.plots import find_metrics, read_metrics

CURVES = {"reward": "train/reward/total", "accuracy": "train/reward/accuracy", "format": "train/reward/format",
          "response_len": "rollout/response_len_mean", "step_time": "train/step_time"}
"""Study curve name -> the metric it reads."""


def held_out(series: dict[str, list[tuple[int, float]]], sets: list[str]) -> dict[str, float]:
    """The last logged greedy accuracy of each held-out set (`val/<set>/accuracy`); a set never validated is an
    error, so a study cannot silently report a missing number."""
    out = {}
    for name in sets:
        values = series.get(f"val/{name}/accuracy")
        if not values:
            raise ValueError(f"no val/{name}/accuracy in the run's metrics (was it validated?)")
        out[name] = values[-1][1]
    return out


def collect_run(run_dir: str | Path, sets: list[str]) -> dict[str, Any]:
    """{"eval": {set: accuracy}, "curves": {name: [[step, value], ...]}} of one run folder. Steps are 1-based: the
    value logged after RL step k is at step k."""
    series = read_metrics(find_metrics(Path(run_dir)))
    curves = {name: [[step + 1, value] for step, value in series.get(metric, [])] for name, metric in CURVES.items()}
    return {"eval": held_out(series, sets), "curves": {k: v for k, v in curves.items() if v}}
