"""The reward protocol: a batch of responses and their data rows in, a `RewardOutput` (total + named parts) out.

Every reward in `lmmr1/rewards/` is a plain class with constructor arguments (no closures), so it pickles to worker
processes and LightningCLI can build it from YAML `class_path`/`init_args`. Rewards never log and hold no tensors; the
training loop logs `total`, each component's mean (`train/reward/<name>`) and the `stats` counters.

>>> out = RewardOutput(total=[1.0, 0.5], components={"format": [1.0, float("nan")]}, stats={"x/count": 1.0})
>>> out.component_means()
{'format': 1.0}
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

NAN = float("nan")


@dataclass
class RewardOutput:
    """Scores of one batch of N responses."""

    total: list[float]  # (N,) weighted total per response
    components: dict[str, list[float]]  # name -> (N,); NaN where a component does not apply to that row
    stats: dict[str, float] = field(default_factory=dict)  # batch counters, e.g. {"accuracy/timeouts": 1.0}

    def __post_init__(self) -> None:
        for name, values in self.components.items():
            assert len(values) == len(self.total), f"component {name!r}: {len(values)} values for {len(self.total)}"

    def component_means(self) -> dict[str, float]:
        """Mean of each component over the rows where it applies (NaN rows skipped); NaN if it applies to none."""
        means = {}
        for name, values in self.components.items():
            kept = [v for v in values if not math.isnan(v)]
            means[name] = sum(kept) / len(kept) if kept else NAN
        return means

    def row(self, i: int) -> dict[str, float]:
        """The components that apply to row i (the `rewards` field written by `lmmr1 score`)."""
        return {name: values[i] for name, values in self.components.items() if not math.isnan(values[i])}


class Reward(ABC):
    """Scores a batch. Subclasses set `name` and implement `__call__`; `check_rows`, `start` and `close` are
    optional."""

    name: str = "reward"

    @abstractmethod
    def __call__(self, responses: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> RewardOutput:
        """Score `responses[i]` against `rows[i]` (the data row it answers)."""

    def check_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Called once before training with every training row; raises ValueError naming a row this reward cannot
        score (no route covers its datasource, or it lacks a field this reward needs)."""

    def start(self) -> None:
        """Start worker processes now, so that their start-up (imports) overlaps other work instead of the first call;
        without it they start on first use."""

    def close(self) -> None:
        """Release worker processes or connections; the reward may still be called afterwards (they restart)."""


def where(row: Mapping[str, Any], index: int) -> str:
    """How an error message names a row: its `_where` ("file:row") when loaded from a file, else its batch index."""
    return str(row.get("_where", f"row {index}"))


def tag_content(response: str, tag: str) -> str | None:
    """Content of the last `<tag>…</tag>` in the response (stripped), or None when there is none.

    >>> tag_content("<think>a</think><answer> 42 </answer>", "answer")
    '42'
    """
    # The same matches as re.findall(r"<tag>(.*?)</tag>", DOTALL), found in linear time: the regex rescans to the end
    # from every unclosed <tag>, so a response repeating "<answer>" took seconds to score.
    open_tag, close_tag, position, content = f"<{tag}>", f"</{tag}>", 0, None
    while (start := response.find(open_tag, position)) != -1:
        start += len(open_tag)
        end = response.find(close_tag, start)
        if end == -1:
            break
        content, position = response[start:end], end + len(close_tag)
    return content.strip() if content is not None else None


def check_lengths(responses: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """Raise when a batch has a different number of responses and rows (a caller bug, named plainly)."""
    if len(responses) != len(rows):
        raise ValueError(f"reward called with {len(responses)} responses but {len(rows)} rows")
