"""The rollout-engine protocol: prompts in, n sampled completions per prompt out.

Engines know nothing about rewards or losses. The HF engine generates with the live policy; a vLLM engine holds its
own copy of the weights and receives them through `update_weights` (callbacks call these around training).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lmmr1.data.processor import PromptBatch


@dataclass
class SamplingConfig:
    """How completions are sampled."""

    n: int = 4
    """Completions per prompt (the group size G)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""
    max_new_tokens: int = 64
    """Longest response; longer ones end with finish_reason 'length'."""
    stop: list[str] = field(default_factory=list)
    """Extra stop strings besides the end-of-turn token."""
    seed: int = 0
    """Base seed; each call mixes in the training step, so a rerun reproduces the same rollouts."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"--model.sampling.n must be >= 1, got {self.n}")
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"--model.sampling.temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--model.sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"--model.sampling.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--model.sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("--model.sampling.stop: an empty stop string would end every response at once")


@dataclass
class Completion:
    """One sampled response."""

    token_ids: list[int]
    """Response tokens, including the end-of-turn token when the model produced it."""
    text: str
    """Decoded response without special tokens."""
    logprobs: list[float]
    """Engine log-probability of each sampled token (temperature-scaled distribution)."""
    finish_reason: str
    """'stop' (end-of-turn token or stop string) or 'length' (hit max_new_tokens)."""
    loss_mask: list[int] | None = None
    """Per token: 1 = sampled by the model (trained on), 0 = inserted by an environment (a multi-turn episode's
    observations); None = every token is the model's."""
    pixel_values: Tensor | None = None
    """(patches, D) images inside the response (the frames of a multi-turn episode's later turns), or None."""
    image_grid_thw: Tensor | None = None
    """(images, 3) grids of those images."""
    episode: dict[str, Any] | None = None
    """A multi-turn episode's record (step rewards, turns, invalid actions, solved); it reaches rewards and metrics
    as the sample's row field `_episode`."""

    def row_for(self, row: dict[str, Any]) -> dict[str, Any]:
        """The data row this completion is scored against: with a multi-turn episode's record as `_episode`."""
        return row if self.episode is None else {**row, "_episode": self.episode}


class RolloutEngine(ABC):
    """Generates completions; weight sync and memory hand-over are no-ops unless the engine holds its own copy."""

    def bind(self, policy, tokenizer) -> None:  # noqa: ANN001 - Policy / tokenizer, kept untyped to avoid a cycle
        """Attach the policy and tokenizer once the LightningModule is set up."""
        self.policy, self.tokenizer = policy, tokenizer

    @abstractmethod
    def generate(self, prompts: PromptBatch, sampling: SamplingConfig, *, seed: int = 0) -> list[list[Completion]]:
        """Return `sampling.n` completions for each of the B prompts, as B lists in prompt order."""

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Load new policy weights into the engine."""

    def sleep(self) -> None:
        """Release engine memory while the trainer runs."""

    def wake(self) -> None:
        """Re-acquire engine memory before a rollout."""
