"""Combining rewards: a weighted sum of named components, and routing rows to rewards by their `datasource`.

How rewards combine is config, not code (STYLE.md R6): `WeightedSum` adds member totals with weights and keeps every
member's components; `RoutedReward` sends each row to the reward of the first pattern (fnmatch) that its datasource
matches, or of a `has:<field>` rule for a field it holds, and fills NaN into components that do not apply to a row.
`check_rows` finds uncovered datasources before training starts rather than mid-run. `MathReward` is LMM-R1's
weighting: 0.5 * format + 1.0 * accuracy.

>>> from lmmr1.rewards.format import FormatReward
>>> out = WeightedSum([FormatReward()], [0.5])(["<think>a</think><answer>1</answer>"], [{}])
>>> out.total, out.components
([0.5], {'format': [1.0]})
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import Any

from lmmr1.rewards.accuracy import AccuracyReward
from lmmr1.rewards.base import NAN, Reward, RewardOutput, check_lengths, where
from lmmr1.rewards.format import FormatReward

HAS = "has:"  # route pattern prefix: `has:env` matches rows holding an `env` field


def _finite(weight: Any, name: str) -> float:
    try:
        value = float(weight)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):  # a NaN or infinite weight turns every total into NaN or inf
        raise ValueError(f"{name}: weights must be finite numbers, got {weight!r}")
    return value


class WeightedSum(Reward):
    """total = sum_k weights[k] * rewards[k].total; components are the members' components (names must not clash)."""

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float] | None = None,
                 name: str = "weighted_sum") -> None:
        self.rewards = list(rewards)
        self.weights = [1.0] * len(self.rewards) if weights is None else [_finite(w, name) for w in weights]
        if len(self.weights) != len(self.rewards):
            raise ValueError(f"{name}: {len(self.rewards)} rewards but {len(self.weights)} weights")
        if not self.rewards:
            raise ValueError(f"{name}: needs at least one reward")
        self.name = name

    def __call__(self, responses: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> RewardOutput:
        check_lengths(responses, rows)
        total = [0.0] * len(responses)
        components: dict[str, list[float]] = {}
        stats: dict[str, float] = {}
        for reward, weight in zip(self.rewards, self.weights, strict=True):
            out = reward(responses, rows)
            total = [t + weight * x for t, x in zip(total, out.total, strict=True)]
            for key, values in out.components.items():
                if key in components:
                    raise ValueError(f"{self.name}: two rewards both produce the component {key!r}; list it once")
                components[key] = list(values)
            for key, value in out.stats.items():
                stats[key] = stats.get(key, 0.0) + value
        return RewardOutput(total=total, components=components, stats=stats)

    def check_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        for reward in self.rewards:
            reward.check_rows(rows)

    def start(self) -> None:
        for reward in self.rewards:
            reward.start()

    def close(self) -> None:
        for reward in self.rewards:
            reward.close()


class MathReward(WeightedSum):
    """LMM-R1's math reward: format_weight * format + accuracy_weight * accuracy (components `format`, `accuracy`)."""

    def __init__(self, format_weight: float = 0.5, accuracy_weight: float = 1.0, timeout: float = 5.0,
                 workers: int | None = None, think_tag: str = "think", answer_tag: str = "answer") -> None:
        super().__init__([FormatReward(think_tag, answer_tag), AccuracyReward(timeout, workers, answer_tag)],
                         [format_weight, accuracy_weight], name="math")


class RoutedReward(Reward):
    """Scores each row with the reward of the first pattern its `key` field (default `datasource`) matches.

    Patterns are shell-style (`geo*`, `sokoban`), tried in the given order except a bare `*`, which is always tried
    last so that a catch-all never shadows a specific route. A row without the field matches only `*` and `has:`
    rules. `has:<field>` matches rows where that field is present and not empty, whatever their datasource: LMM-R1's
    Sokoban rows have no datasource, so `{"has:env": "lmm_r1_sokoban", "*": "lmm_r1_math"}` routes them by their
    level (the loaders fill `env` from `env_path`).
    """

    name = "routed"

    def __init__(self, routes: Mapping[str, Reward], key: str = "datasource") -> None:
        if not routes:
            raise ValueError("routes: give at least one pattern -> reward")
        self.routes = dict(sorted(routes.items(), key=lambda kv: kv[0] == "*"))
        self.key = key

    def route(self, row: Mapping[str, Any]) -> str | None:
        """The pattern that covers `row`, or None."""
        value = str(row.get(self.key) or "")
        return next((p for p in self.routes if (row.get(p[len(HAS):]) not in (None, "") if p.startswith(HAS)
                                                else fnmatch.fnmatchcase(value, p))), None)

    def _uncovered(self, row: Mapping[str, Any], index: int) -> ValueError:
        return ValueError(f"{where(row, index)}: {self.key} {row.get(self.key)!r} matches no reward route "
                          f"{list(self.routes)}; add a route for it or a catch-all '*'")

    def check_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        groups: dict[str, list[Mapping[str, Any]]] = {}
        for i, row in enumerate(rows):
            pattern = self.route(row)
            if pattern is None:
                raise self._uncovered(row, i)
            groups.setdefault(pattern, []).append(row)
        for pattern, group in groups.items():
            self.routes[pattern].check_rows(group)

    def __call__(self, responses: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> RewardOutput:
        check_lengths(responses, rows)
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            pattern = self.route(row)
            if pattern is None:
                raise self._uncovered(row, i)
            groups.setdefault(pattern, []).append(i)
        total = [NAN] * len(responses)
        components: dict[str, list[float]] = {}
        stats: dict[str, float] = {}
        for pattern, index in groups.items():
            out = self.routes[pattern]([responses[i] for i in index], [rows[i] for i in index])
            for j, i in enumerate(index):
                total[i] = out.total[j]
            for key, values in out.components.items():
                column = components.setdefault(key, [NAN] * len(responses))
                for j, i in enumerate(index):
                    column[i] = values[j]
            for key, value in out.stats.items():
                stats[key] = stats.get(key, 0.0) + value
        return RewardOutput(total=total, components=components, stats=stats)

    def start(self) -> None:
        for reward in self.routes.values():
            reward.start()

    def close(self) -> None:
        for reward in self.routes.values():
            reward.close()
