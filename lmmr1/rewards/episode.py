"""Episode reward of multi-turn agent rollouts: the environment's step rewards, summed or the final one.

The multi-turn engine (`lmmr1.rollout.multi_turn`) records each episode in the sample's row as `_episode` (step
rewards, turns, invalid actions, solved); this reward turns that record into the sequence reward the advantage
estimators take. `mode: sum` counts every step (invalid-action penalties included); `mode: final` only the last
step's reward. Component `solved` is 1 iff the environment reported the task solved.

>>> episode = {"rewards": [-0.1, 0.0, 1.0], "solved": True}
>>> EpisodeReward()(["..."], [{"_episode": episode}]).total
[0.9]
>>> EpisodeReward(mode="final")(["..."], [{"_episode": episode}]).total
[1.0]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lmmr1.rewards.base import Reward, RewardOutput, check_lengths, where

MODES = ("sum", "final")


class EpisodeReward(Reward):
    """total = sum (or last) of the episode's step rewards; needs rows produced by the multi-turn engine."""

    name = "episode"

    def __init__(self, mode: str = "sum") -> None:
        if mode not in MODES:
            raise ValueError(f"--model.reward.init_args.mode: unknown {mode!r}; choose from {list(MODES)}")
        self.mode = mode

    def __call__(self, responses: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> RewardOutput:
        check_lengths(responses, rows)
        total, solved = [], []
        for i, row in enumerate(rows):
            episode = row.get("_episode")
            if episode is None:
                raise ValueError(f"{where(row, i)}: no episode record; the episode reward scores multi-turn rollouts "
                                 f"(--model.engine lmmr1.rollout.MultiTurnEngine)")
            steps = [float(r) for r in episode["rewards"]]
            total.append(round(sum(steps), 12) if self.mode == "sum" else (steps[-1] if steps else 0.0))
            solved.append(float(bool(episode.get("solved"))))
        return RewardOutput(total=total, components={"solved": solved})
