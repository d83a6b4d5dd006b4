"""Rollout engines behind one protocol (`RolloutEngine`): Hugging Face generate on CPU/GPU, vLLM on GPU, and the
multi-turn engine that drives either against an environment."""

from lmmr1.rollout.base import Completion, RolloutEngine, SamplingConfig
from lmmr1.rollout.hf import HFEngine
from lmmr1.rollout.multi_turn import MultiTurnEngine

__all__ = ["Completion", "HFEngine", "MultiTurnEngine", "RolloutEngine", "SamplingConfig"]
