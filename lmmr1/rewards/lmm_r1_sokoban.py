"""`lmm_r1_sokoban`: LMM-R1's Sokoban reward (its remote verifier `sokoban_verifier.py`), replayed on our simulator.

The rules, as the reference applies them to one response (end-of-turn markers removed, whitespace stripped):
1. Format gate: `<think>`, `</think>`, `<answer>`, `</answer>` each appear exactly once, and the answer split on
   commas gives only the words left/right/up/down (any case, spaces around each). A response failing it scores 0.
2. Environment return: the actions are played in gym-sokoban's rules (a step costs 0.1, pushing a box onto a target
   earns 1, off one costs 1, covering every target earns 10 and ends the episode), at most the first 50 of them; the
   reward is the best cumulative sum over the steps played, and never below 0 (the sum before the first step).
3. Bonuses: n actions earn 0.05·n below 20, else 1 − 0.2·((n − 20)/30)² (long plans go negative); the thinking earns
   0.001 per space-separated word longer than one character, at most 200 words. When a run of 1-5 words repeats back
   to back more than 7 times in the answer, the action bonus becomes min(0, bonus − 0.2).
4. total = return + 0.5 + action bonus + thinking bonus, clipped to [-10, 10] (OpenRLHF's `--reward_clip_range`,
   which the reference trainer applies to every reward).
Components: `format` (the gate, 0/1), `solved` (every box on a target within the actions played), `env_return`,
`action_bonus`, `thinking_bonus` (0 where the gate fails).

Deliberate differences, where the reference's loader breaks its own rules (levels LMM-R1's generator writes never
hit them: gym-sokoban accepts a generated level only with every box off target and the player off target): a box that
starts on a target (grid code 3) is a box on a target here; the reference turns that cell into a wall-less box source
that refills whenever the player steps off it. A level whose grid has more boxes than targets is refused when it is
loaded (the target under the player cannot be recovered from a grid).

>>> row = {"env": "#####\\n#@$.#\\n#####"}
>>> LmmR1SokobanReward()(["<think>push it</think><answer>Right</answer>"], [row]).total  # 10.9 + 0.5 + .05 + .002
[10.0]
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from lmmr1.rewards.base import Reward, RewardOutput, check_lengths, where
from lmmr1.rewards.lmm_r1_math import clean_response

ACTIONS = ("left", "right", "up", "down")
MAX_ACTIONS = 50  # actions played; the rest only count towards the action bonus
STEP_PENALTY, BOX_ON_TARGET, BOX_OFF_TARGET, ALL_ON_TARGETS = -0.1, 1.0, -1.0, 10.0  # gym-sokoban's SokobanEnv
FORMAT_BONUS = 0.5
_WORDS = re.compile(r"\b\w[\w']*\b")


@lru_cache(maxsize=4096)
def _level(xsb: str):  # noqa: ANN202 - returns lmmr1.envs.sokoban.Level
    from lmmr1.envs.sokoban import Level

    return Level.from_xsb(xsb)


def _between(text: str, start: str, end: str) -> str:
    """The text after the first `start` up to the next `end` (the whole rest when there is none)."""
    return text.partition(start)[2].partition(end)[0]


def actions_of(text: str) -> list[str] | None:
    """The lowered comma-separated actions of a response that passes the format gate, else None.

    >>> actions_of("<think>t</think><answer> Left, UP </answer>"), actions_of("<think>t</think><answer>L R</answer>")
    (['left', 'up'], None)
    """
    if any(text.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return None
    actions = [action.strip().lower() for action in _between(text, "<answer>", "</answer>").split(",")]
    return actions if all(action in ACTIONS for action in actions) else None


def repeats(text: str, times: int = 7, longest: int = 5) -> bool:
    """True when a run of 1..`longest` words occurs more than `times` times in a row, each occurrence starting right
    where the previous one ended (an occurrence overlapping the previous one restarts its count, as in the reference).

    >>> repeats("up, " * 8), repeats("up, " * 7), repeats("up, down, " * 8)
    (True, False, True)
    """
    words = _WORDS.findall(text.lower())
    for k in range(1, longest + 1):
        last: dict[tuple[str, ...], tuple[int, int]] = {}  # k words -> (start of last occurrence, run length)
        for start in range(len(words) - k + 1):
            gram = tuple(words[start:start + k])
            previous, run = last.get(gram, (-1, 0))
            run = run + 1 if previous == start - k else 1
            last[gram] = (start, run)
            if run > times:
                return True
    return False


def action_bonus(actions_text: str, n: int) -> float:
    """Bonus for the number of actions n, with the repetition penalty applied to `actions_text`."""
    bonus = n * 0.05 if n < 20 else 20 * 0.05 - ((n - 20) / 30) ** 2 * 0.2
    return min(0.0, bonus - 0.2) if repeats(actions_text) else bonus


def thinking_bonus(thinking: str) -> float:
    """0.001 per word (split on single spaces) longer than one character, at most 200 words."""
    words = [word for word in thinking.split(" ") if len(word) > 1]
    return min(len(words), 200) * 0.001


def env_return(level: Any, actions: Sequence[str], max_actions: int = MAX_ACTIONS) -> tuple[float, bool]:
    """(best cumulative gym-sokoban reward over the steps played, solved) for `actions` from `level`."""
    from lmmr1.envs.sokoban import step

    player, boxes = level.player, set(level.boxes)
    on_targets = len(boxes & level.goals)
    total = best = 0.0
    for action in actions[:max_actions]:
        moved = step(level, player, boxes, action)
        player = player if moved is None else moved
        reward = STEP_PENALTY
        now = len(boxes & level.goals)
        if now != on_targets:
            reward += BOX_ON_TARGET if now > on_targets else BOX_OFF_TARGET
        on_targets = now
        solved = boxes <= level.goals
        if solved:
            reward += ALL_ON_TARGETS
        total += reward
        best = max(best, total)
        if solved:
            return best, True
    return best, False


class LmmR1SokobanReward(Reward):
    """LMM-R1's Sokoban reward (see the module docstring); needs the row's level in `env` (XSB) or `env_path`."""

    name = "lmm_r1_sokoban"

    def __init__(self, max_actions: int = MAX_ACTIONS, clip: float = 10.0, env_key: str = "env") -> None:
        if isinstance(max_actions, bool) or not isinstance(max_actions, int) or max_actions < 1:
            raise ValueError(f"max_actions: must be an integer >= 1, got {max_actions!r}")
        if isinstance(clip, bool) or not isinstance(clip, int | float) or not clip > 0:
            raise ValueError(f"clip: must be a number > 0 (totals are clipped to [-clip, clip]), got {clip!r}")
        self.max_actions, self.clip, self.env_key = max_actions, float(clip), env_key

    def _level_of(self, row: Mapping[str, Any], index: int):  # noqa: ANN202
        from lmmr1.envs.sokoban import read_level_text

        xsb = row.get(self.env_key)
        try:
            if not isinstance(xsb, str) or not xsb.strip():
                if not isinstance(row.get("env_path"), str):
                    raise ValueError(f"{self.env_key!r} is missing; {self.name} needs the level (XSB text in "
                                     f"'{self.env_key}', or a .npy grid or XSB file in 'env_path')")
                xsb = read_level_text(row["env_path"])
            return _level(xsb)
        except (OSError, ValueError) as e:
            raise ValueError(f"{where(row, index)}: {getattr(e, 'strerror', None) or e}") from e

    def check_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        for i, row in enumerate(rows):
            self._level_of(row, i)

    def score(self, response: str, level: Any) -> dict[str, float]:
        """The components and `total` for one response on `level`."""
        text = clean_response(response)
        actions = actions_of(text)
        if actions is None:
            return {"total": 0.0, "format": 0.0, "solved": 0.0, "env_return": 0.0, "action_bonus": 0.0,
                    "thinking_bonus": 0.0}
        best, solved = env_return(level, actions, self.max_actions)
        parts = {"format": 1.0, "solved": float(solved), "env_return": best,
                 "action_bonus": action_bonus(_between(text, "<answer>", "</answer>").strip(), len(actions)),
                 "thinking_bonus": thinking_bonus(_between(text, "<think>", "</think>").strip())}
        total = best + FORMAT_BONUS + parts["action_bonus"] + parts["thinking_bonus"]
        return {"total": max(-self.clip, min(self.clip, total)), **parts}

    def __call__(self, responses: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> RewardOutput:
        check_lengths(responses, rows)
        scores = [self.score(response, self._level_of(row, i)) for i, (response, row) in
                  enumerate(zip(responses, rows, strict=True))]
        components = {key: [s[key] for s in scores] for key in ("format", "solved", "env_return", "action_bonus",
                                                                 "thinking_bonus")}
        stats = {"lmm_r1_sokoban/format_failures": float(sum(s["format"] == 0.0 for s in scores))}
        return RewardOutput(total=[s["total"] for s in scores], components=components, stats=stats)
