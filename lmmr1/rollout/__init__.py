"""Rollout engines behind one protocol (`RolloutEngine`): Hugging Face generate on CPU/GPU, vLLM on GPU."""

from lmmr1.rollout.base import Completion, RolloutEngine, SamplingConfig
from lmmr1.rollout.hf import HFEngine

__all__ = ["Completion", "HFEngine", "RolloutEngine", "SamplingConfig"]
