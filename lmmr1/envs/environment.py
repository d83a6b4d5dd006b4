"""The environment protocol of multi-turn agent rollouts: `reset(row) -> Observation`, `step(action) -> Step`.

An environment is one episode's state. The multi-turn engine (`lmmr1.rollout.multi_turn`) clones a configured
prototype per episode, resets it on the episode's data row, feeds it each model turn as text and appends the returned
observation (text and/or images) to the conversation as the next user turn, until `done` or a turn / token budget.
The prompt of the first turn is the data row's own message; `reset`'s observation is what a driver without data rows
(a benchmark, an interactive loop) would show first.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class Observation:
    """What the environment shows the model: text, images (shown before the text), or both."""

    text: str = ""
    images: list[Image.Image] = field(default_factory=list)


@dataclass
class Step:
    """The environment's answer to one model turn."""

    observation: Observation
    reward: float
    """This step's reward; the episode reward (sum or final step) is formed by `lmmr1.rewards.episode`."""
    done: bool
    info: dict[str, Any] = field(default_factory=dict)
    """Per-step facts; `invalid` (bool) and `solved` (bool) are counted into the per-turn metrics."""


class Environment(ABC):
    """One episode of an interactive task; configure a prototype, the engine calls `clone()` once per episode."""

    name: str = "environment"

    @abstractmethod
    def reset(self, row: Mapping[str, Any]) -> Observation:
        """Start the episode the data row describes; raises ValueError naming the row if it describes none."""

    @abstractmethod
    def step(self, action: str) -> Step:
        """Apply the model's turn (its decoded text) and say what happened."""

    def clone(self) -> Environment:
        """A fresh copy of this (configured, not yet reset) prototype."""
        return copy.deepcopy(self)
