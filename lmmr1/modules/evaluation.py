"""Validation settings and metrics: greedy accuracy, pass@k from n samples, format rate, length, per datasource."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L

from lmmr1.distributed import global_stats
from lmmr1.rewards.base import RewardOutput

CORRECTNESS = ("accuracy", "solved")
"""Components that say whether an answer is right, in order of preference."""


@dataclass
class EvalConfig:
    """How validation sets are evaluated (through the same rollout engine that training uses)."""

    n: int = 1
    """Samples per prompt for pass@k; 1 = greedy decoding only."""
    temperature: float = 1.0
    """Sampling temperature of the n samples (greedy accuracy always uses temperature 0)."""
    k: list[int] = field(default_factory=lambda: [1])
    """The k of pass@k, each <= n (computed with the unbiased estimator of arXiv:2107.03374)."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"--model.evaluation.n must be >= 1, got {self.n}")
        if not self.temperature >= 0 or math.isinf(self.temperature):  # `not >=` also catches NaN
            raise ValueError(f"--model.evaluation.temperature must be a finite number >= 0, got {self.temperature}")
        if any(k < 1 or k > self.n for k in self.k):
            raise ValueError(f"--model.evaluation.k: every k must be in [1, n={self.n}], got {self.k}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c of them correct) is correct: 1 - C(n-c,k)/C(n,k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def correctness(scores: RewardOutput) -> list[float]:
    """Per response 1.0 / 0.0 from the first correctness component that applies to it (NaN if none applies)."""
    out = []
    for i in range(len(scores.total)):
        value = math.nan
        for name in CORRECTNESS:
            v = scores.components.get(name, [math.nan] * len(scores.total))[i]
            if not math.isnan(v):
                value = float(v >= 1.0)
                break
        out.append(value)
    return out


def greedy_metrics(scores: RewardOutput, lengths: Sequence[int], rows: Sequence[dict[str, Any]]
                   ) -> dict[str, tuple[float, int]]:
    """Metric name -> (mean, count) over one batch of greedy responses, overall and per datasource."""
    correct = correctness(scores)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[""].append(i)
        groups[f"{row.get('datasource') or 'unknown'}/"].append(i)
    metrics = {}
    for prefix, index in groups.items():
        series = {**{name: [values[i] for i in index] for name, values in scores.components.items()},
                  "accuracy": [correct[i] for i in index],  # accuracy or solved, whichever applies to the row
                  "reward": [scores.total[i] for i in index]}
        if prefix == "":
            series["response_len"] = [float(lengths[i]) for i in index]
        for name, values in series.items():
            kept = [v for v in values if not math.isnan(v)]
            if kept:
                metrics[f"{prefix}{name}"] = (sum(kept) / len(kept), len(kept))
    return metrics


def pass_metrics(scores: RewardOutput, n: int, ks: Sequence[int]) -> dict[str, tuple[float, int]]:
    """pass@k for each k over B prompts with n consecutive samples each."""
    correct = correctness(scores)
    prompts = len(correct) // n
    metrics = {}
    for k in ks:
        values = [pass_at_k(n, int(sum(c == 1.0 for c in correct[b * n : (b + 1) * n])), k) for b in range(prompts)]
        metrics[f"pass@{k}"] = (sum(values) / len(values), len(values))
    return metrics


def eval_prefix(module: L.LightningModule, dataloader_idx: int) -> str:
    """"val/<set>" or "test/<set>": the stage and the label of the held-out set this dataloader serves."""
    sets = getattr(module.trainer.datamodule, "val", [])
    name = sets[dataloader_idx].label if dataloader_idx < len(sets) else str(dataloader_idx)
    return f"{'test' if module.trainer.testing else 'val'}/{name}"


class EvalMeans:
    """Count-weighted means of evaluation metrics over a whole held-out set and every rank.

    Ranks can see different metric names (a datasource that only one rank drew), so the sums are gathered once at the
    end of the epoch; syncing metric by metric would pair different metrics' collectives across ranks and hang.
    """

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}

    def add(self, name: str, value: float, count: int = 1) -> None:
        total = self.sums.setdefault(name, [0.0, 0.0])
        total[0] += float(value) * count
        total[1] += count

    def pop_means(self) -> dict[str, float]:
        """Global means (every rank gets the same dict), then start over. A collective: every rank must call it."""
        means = global_stats({name: (total, count) for name, (total, count) in self.sums.items()})
        self.sums = {}
        return dict(sorted(means.items()))


def log_mean(module: L.LightningModule, name: str, value: float, count: int = 1) -> None:
    """Add `count` observations with mean `value` to the module's evaluation means (`module.eval_means`)."""
    module.eval_means.add(name, value, count)


def log_eval_means(module: L.LightningModule) -> None:
    """Log the global evaluation means at the end of a validation/test epoch (same values on every rank)."""
    module.log_dict(module.eval_means.pop_means(), add_dataloader_idx=False, sync_dist=False)
