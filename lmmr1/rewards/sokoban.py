"""Sokoban reward: the plan in `<answer>` is played on the row's level (`env`, XSB text) with `lmmr1.envs.sokoban`.

Component `solved` is 1 iff every box ends on a goal. Optional shaped terms, each off unless its weight is set:
`boxes_on_goals` (fraction of boxes on goals at the end, weight `boxes_weight`), `moves` (plan length, cost
`move_cost` per move) and `noop_moves` (moves that changed nothing: into a wall or pushing a box into a wall/box,
penalty `noop_penalty` each). total = solved + boxes_weight*boxes_on_goals - move_cost*moves - noop_penalty*noop_moves.
A missing answer tag or a text that is not a plan scores 0 and is counted (`sokoban/answer_missing`,
`sokoban/plan_parse_failures`).

>>> SokobanReward()(["<answer>R</answer>", "<answer>L</answer>"], [{"env": "#####\\n#@$.#\\n#####"}] * 2).total
[1.0, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from lmmr1.rewards.base import Reward, RewardOutput, check_lengths, tag_content, where


@lru_cache(maxsize=4096)
def _level(xsb: str):  # noqa: ANN202 - returns lmmr1.envs.sokoban.Level, imported lazily
    from lmmr1.envs.sokoban import Level

    return Level.from_xsb(xsb)


class SokobanReward(Reward):
    """Component `solved` (plus the shaped terms whose weights are non-zero); needs the row's `env`."""

    name = "sokoban"

    def __init__(self, boxes_weight: float = 0.0, move_cost: float = 0.0, noop_penalty: float = 0.0,
                 answer_tag: str = "answer", env_key: str = "env") -> None:
        for flag, value in (("boxes_weight", boxes_weight), ("move_cost", move_cost), ("noop_penalty", noop_penalty)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{flag}: must be a finite number, got {value!r}")
        self.boxes_weight, self.move_cost, self.noop_penalty = boxes_weight, move_cost, noop_penalty
        self.answer_tag, self.env_key = answer_tag, env_key

    def _level_of(self, row: Mapping[str, Any], index: int):  # noqa: ANN202
        xsb = row.get(self.env_key)
        if not isinstance(xsb, str) or not xsb.strip():
            raise ValueError(f"{where(row, index)}: {self.env_key!r} is missing; the sokoban reward needs the level "
                             f"(XSB text in 'env' or a file in 'env_path') (datasource {row.get('datasource', '')!r})")
        try:
            return _level(xsb)
        except ValueError as e:
            raise ValueError(f"{where(row, index)}: {self.env_key}: {e}") from e

    def check_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        for i, row in enumerate(rows):
            self._level_of(row, i)

    def __call__(self, responses: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> RewardOutput:
        from lmmr1.envs.sokoban import parse_plan, play

        check_lengths(responses, rows)
        parts: dict[str, list[float]] = {"solved": [], "boxes_on_goals": [], "moves": [], "noop_moves": []}
        stats = {"sokoban/answer_missing": 0.0, "sokoban/plan_parse_failures": 0.0}
        for i, (response, row) in enumerate(zip(responses, rows, strict=True)):
            level = self._level_of(row, i)
            answer = tag_content(response, self.answer_tag)
            moves = None if answer is None else parse_plan(answer)
            if moves is None:
                stats["sokoban/answer_missing" if answer is None else "sokoban/plan_parse_failures"] += 1
                values = (0.0, 0.0, 0.0, 0.0)
            else:
                result = play(level, moves)
                values = (float(result.solved), result.boxes_on_goals / max(result.n_boxes, 1),
                          float(result.n_moves), float(result.noop_moves))
            for key, value in zip(parts, values, strict=True):
                parts[key].append(value)
        total = [s + self.boxes_weight * b - self.move_cost * m - self.noop_penalty * n
                 for s, b, m, n in zip(*parts.values(), strict=True)]
        weights = {"boxes_on_goals": self.boxes_weight, "moves": self.move_cost, "noop_moves": self.noop_penalty}
        components = {k: v for k, v in parts.items() if k == "solved" or weights[k]}
        return RewardOutput(total=total, components=components, stats=stats)
