"""`lmmr1 plot RUN_DIR`: PNG training curves from a run's metrics.csv (CSV logger), stage boundaries marked.

    lmmr1 plot runs/smoke/csv/version_0            # writes runs/smoke/csv/version_0/plots/*.png
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

PANELS = {
    "reward": ("train/reward/",),
    "validation": ("val/",),
    "response_length": ("rollout/response_len_mean", "rollout/truncated_frac"),
    "entropy": ("train/entropy",),
    "kl": ("train/kl", "train/kl_coef"),
    "grad_norm": ("train/grad_norm", "train/grad_clip_threshold"),
    "loss": ("train/policy_loss", "train/kl_loss", "train/clip_frac", "train/value_loss"),
}
"""Figure name -> metric-name prefixes it plots."""


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv -> {metric: [(step, value), ...]} (empty cells skipped)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for name, cell in row.items():
                if name in ("step", "epoch") or cell in ("", None):
                    continue
                value = float(cell)
                if not math.isnan(value):
                    series.setdefault(name, []).append((step, value))
    return series


def find_metrics(run_dir: Path) -> Path:
    candidates = sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ValueError(f"{run_dir}: no metrics.csv below it (was the run logged with the CSV logger?)")
    return candidates[-1]


def stage_boundaries(series: dict[str, list[tuple[int, float]]]) -> list[int]:
    stages = series.get("train/stage", [])
    return [step for (_, a), (step, b) in zip(stages, stages[1:]) if a != b]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write one PNG per panel that has data; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_path = find_metrics(Path(run_dir))
    series = read_metrics(metrics_path)
    out = Path(out) if out else metrics_path.parent / "plots"
    out.mkdir(parents=True, exist_ok=True)
    boundaries = stage_boundaries(series)
    written = []
    for panel, prefixes in PANELS.items():
        names = sorted(n for n in series if any(n == p or (p.endswith("/") and n.startswith(p)) for p in prefixes))
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for name in names:
            steps, values = zip(*series[name])
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name)
        for step in boundaries:
            ax.axvline(step, color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel("step")
        ax.set_title(panel.replace("_", " ") + (" (dashed: curriculum stage switch)" if boundaries else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{panel}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmmr1 plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run folder (searched for the newest metrics.csv)")
    parser.add_argument("--out", default=None, help="output folder (default: <metrics dir>/plots)")
    args = parser.parse_args(argv)
    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0
