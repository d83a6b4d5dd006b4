"""Number guessing with feedback: a text-only environment, proof that the agent protocol is not Sokoban-shaped.

The row's `answer` is a secret integer in [`low`, `high`] (row fields, default 1..100). Each turn the model guesses
one integer (in `<answer>` or as the turn's last integer); the environment answers "Higher." / "Lower." /
"Correct!" (reward `solved_reward`, the episode ends). A turn without an integer gets INVALID_FEEDBACK and
-`invalid_penalty`. Binary search solves 1..100 in at most 7 guesses.

    env = GuessNumber()
    env.reset({"answer": "37"})
    env.step("<answer>50</answer>").observation.text   # 'Lower.'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from lmmr1.envs.environment import Environment, Observation, Step

INVALID_FEEDBACK = "Invalid guess: answer with one integer, e.g. <answer>50</answer>."


class GuessNumber(Environment):
    name = "guess"

    def __init__(self, invalid_penalty: float = 0.1, solved_reward: float = 1.0, answer_tag: str = "answer") -> None:
        self.invalid_penalty, self.solved_reward, self.answer_tag = invalid_penalty, solved_reward, answer_tag
        self.secret = self.low = self.high = 0

    def reset(self, row: Mapping[str, Any]) -> Observation:
        try:
            self.secret = int(str(row.get("answer", "")).strip())
        except ValueError:
            raise ValueError(f"{row.get('_where', 'row')}: answer {row.get('answer')!r} is not an integer; the "
                             f"guessing game needs the secret number there") from None
        self.low, self.high = int(row.get("low", 1)), int(row.get("high", 100))
        return Observation(f"Guess the integer between {self.low} and {self.high}.")

    def step(self, action: str) -> Step:
        from lmmr1.rewards.base import tag_content

        answer = tag_content(action, self.answer_tag)
        numbers = re.findall(r"-?\d+", action if answer is None else answer)
        if not numbers:
            return Step(Observation(INVALID_FEEDBACK), -self.invalid_penalty, False, {"invalid": True, "solved": False})
        guess = int(numbers[-1])
        if guess == self.secret:
            return Step(Observation("Correct!"), self.solved_reward, True, {"invalid": False, "solved": True})
        return Step(Observation("Higher." if guess < self.secret else "Lower."), 0.0, False,
                    {"invalid": False, "solved": False})
