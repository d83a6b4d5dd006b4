"""Sokoban played step by step: the model moves, sees the new frame, and moves again (multi-turn agent rollouts).

Each model turn is parsed for moves, from its `<answer>` tag when it has one, else from the whole turn (words
`up/down/left/right` or LURD letters, as `parse_plan` reads them); at most `max_moves_per_turn` are taken. The
observation after every turn is the new frame plus one line of feedback:

- moves taken:   "Moved up right. Boxes on goals: 1/2."  (blocked moves are named: "up (blocked)")
- solved:        "Moved right. Boxes on goals: 2/2. Solved!"  (the episode ends, reward `solved_reward`)
- invalid turn:  INVALID_FEEDBACK (nothing moves, reward -`invalid_penalty`, the episode goes on)

Two optional shaping terms (both 0 by default) add to a turn's reward, so that episodes that never solve the level
still score differently and a group baseline has something to compare:

- `progress_reward` x (the summed box-to-nearest-goal distance before the turn - after it): potential-based shaping
  (Ng, Harada & Russell 1999, "Policy invariance under reward transformations"); over an episode the terms telescope
  to progress_reward x (initial - final distance), so they cannot change which plans are optimal.
- `format_reward` x the share of the turn's words that are moves (read like the moves themselves): a dense signal
  for a model that does not yet write moves at all (an untrained or tiny random model writes a move word now and then,
  long before a whole turn parses); a turn of pure moves earns it in full, every turn, so keep it small beside
  `solved_reward`.

    env = SokobanGame()
    env.reset({"env": "#####\\n#@$.#\\n#####"})
    env.step("<answer>right</answer>").done   # True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lmmr1.envs.environment import Environment, Observation, Step
from lmmr1.envs.sokoban import Level, parse_plan, render, step

INVALID_FEEDBACK = ("Invalid action: no moves found. Answer with moves such as <answer>up</answer> or "
                    "<answer>left down</answer>.")
IMAGE_SIDE = 160  # pixels on the longer side, as the single-turn data renders its frames


class SokobanGame(Environment):
    """A level from the row's `env` (XSB text); reward `solved_reward` on the move that solves it."""

    name = "sokoban"

    def __init__(self, max_moves_per_turn: int = 0, invalid_penalty: float = 0.1, solved_reward: float = 1.0,
                 progress_reward: float = 0.0, format_reward: float = 0.0, images: bool = True,
                 image_side: int = IMAGE_SIDE, answer_tag: str = "answer", env_key: str = "env") -> None:
        """
        Args:
            max_moves_per_turn: moves taken from one turn, the rest ignored (0 = all of them).
            invalid_penalty: subtracted for a turn with no parsable move.
            solved_reward: reward of the step that puts the last box on a goal.
            progress_reward: per cell of summed box-to-goal distance a turn removes (potential-based shaping; 0 = off).
            format_reward: times the share of a turn's words that are moves (format shaping; 0 = off).
            images: show the new frame after each turn (False: the level as XSB text instead).
            image_side: frame size in pixels on the longer side.
            answer_tag: moves are read from the last `<answer_tag>` of a turn when it has one.
            env_key: row field holding the level.
        """
        if max_moves_per_turn < 0:
            raise ValueError(f"max_moves_per_turn must be >= 0 (0 = no limit), got {max_moves_per_turn}")
        self.max_moves_per_turn, self.invalid_penalty, self.solved_reward = max_moves_per_turn, invalid_penalty, \
            solved_reward
        self.progress_reward, self.format_reward = progress_reward, format_reward
        self.images, self.image_side, self.answer_tag, self.env_key = images, image_side, answer_tag, env_key
        self.level: Level | None = None

    def _observation(self, text: str) -> Observation:
        assert self.level is not None
        if not self.images:
            return Observation(f"{text}\n{self.level.to_xsb()}".strip())
        frame = render(self.level, tile=max(4, self.image_side // max(self.level.height, self.level.width)))
        return Observation(text, [frame])

    def reset(self, row: Mapping[str, Any]) -> Observation:
        xsb = row.get(self.env_key)
        if not isinstance(xsb, str) or not xsb.strip():
            raise ValueError(f"{row.get('_where', 'row')}: {self.env_key!r} is missing; the Sokoban game needs the "
                             f"level as XSB text")
        self.level = Level.from_xsb(xsb)
        return self._observation(f"Boxes on goals: {self._on_goals()}.")

    def _on_goals(self) -> str:
        assert self.level is not None
        return f"{len(self.level.boxes & self.level.goals)}/{len(self.level.boxes)}"

    def step(self, action: str) -> Step:
        from lmmr1.rewards.base import tag_content

        assert self.level is not None, "reset() first"
        answer = tag_content(action, self.answer_tag)
        text = action if answer is None else answer
        moves = parse_plan(text)
        shaping = self.format_reward * move_share(text) if self.format_reward else 0.0
        if moves is None:
            return Step(self._observation(INVALID_FEEDBACK), shaping - self.invalid_penalty, False,
                        {"invalid": True, "solved": False, "moves": 0, "noop_moves": 0, "shaping": shaping})
        distance = box_distance(self.level)
        if self.max_moves_per_turn:
            moves = moves[: self.max_moves_per_turn]
        level, player, boxes, words, noop = self.level, self.level.player, set(self.level.boxes), [], 0
        for move in moves:
            moved = step(level, player, boxes, move)
            words.append(move if moved is not None else f"{move} (blocked)")
            noop += moved is None
            player = player if moved is None else moved
            if boxes <= level.goals:  # moves after the solving one are ignored
                break
        self.level = Level(level.walls, level.goals, frozenset(boxes), player, level.height, level.width)
        solved = self.level.solved
        shaping += self.progress_reward * (distance - box_distance(self.level))
        text = f"Moved {' '.join(words)}. Boxes on goals: {self._on_goals()}." + (" Solved!" if solved else "")
        return Step(self._observation(text), (self.solved_reward if solved else 0.0) + shaping, solved,
                    {"invalid": False, "solved": solved, "moves": len(words), "noop_moves": noop, "shaping": shaping})


def box_distance(level: Level) -> int:
    """Summed Manhattan distance of each box to its nearest goal (walls ignored): the progress potential.

    >>> box_distance(Level.from_xsb("######\\n#@$ .#\\n######"))
    2
    """
    return sum(min(abs(br - gr) + abs(bc - gc) for gr, gc in level.goals) for br, bc in level.boxes)


def move_share(text: str) -> float:
    """Share of the whitespace-separated words of `text` that read as moves on their own (as `parse_plan` reads them).

    >>> move_share("up 660 right and")
    0.5
    """
    words = text.split()
    return sum(parse_plan(w) is not None for w in words) / len(words) if words else 0.0
