"""Format reward: 1.0 iff the whole response is `<think>…</think>` then `<answer>…</answer>` and nothing after.

Whitespace around and between the two blocks is allowed, contents may span lines, and each tag must appear exactly
once (a second `<answer>` hidden inside the thinking would let a model hedge). The tag names are configurable.

>>> FormatReward()(["<think>2+2</think>\\n<answer>4</answer>", "<answer>4</answer>"], [{}, {}]).total
[1.0, 0.0]
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from lmmr1.rewards.base import Reward, RewardOutput, check_lengths


class FormatReward(Reward):
    """Component `format` (1/0) for every row."""

    name = "format"

    def __init__(self, think_tag: str = "think", answer_tag: str = "answer") -> None:
        for flag, tag in (("think_tag", think_tag), ("answer_tag", answer_tag)):
            if not re.fullmatch(r"[A-Za-z][\w-]*", tag):
                raise ValueError(f"{flag}: {tag!r} is not a tag name (letters, digits, '_' or '-')")
        if think_tag == answer_tag:
            raise ValueError(f"think_tag and answer_tag must differ, both are {think_tag!r}")
        self.think_tag, self.answer_tag = think_tag, answer_tag
        t, a = re.escape(think_tag), re.escape(answer_tag)
        self._pattern = re.compile(rf"\s*<{t}>(.*?)</{t}>\s*<{a}>(.*?)</{a}>\s*", re.DOTALL)
        self._tags = [f"<{think_tag}>", f"</{think_tag}>", f"<{answer_tag}>", f"</{answer_tag}>"]

    def score(self, response: str) -> float:
        """1.0 when `response` has exactly the two blocks in order, one of each tag, nothing outside."""
        if any(response.count(tag) != 1 for tag in self._tags):
            return 0.0
        return float(self._pattern.fullmatch(response) is not None)

    def __call__(self, responses: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> RewardOutput:
        check_lengths(responses, rows)
        scores = [self.score(r) for r in responses]
        return RewardOutput(total=list(scores), components={self.name: scores})
