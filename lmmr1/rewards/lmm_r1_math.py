"""`lmm_r1_math`: LMM-R1's math reward (its remote verifier `math_verifier.py`), rule for rule, beside our `math`.

How the reference scores one response (after removing end-of-turn markers and stripping surrounding whitespace, as its
server does when it cuts the response out of the query):
- format (weight 0.5): the response is `<think>…</think><answer>…</answer>` exactly: it starts with `<think>`, ends
  with `</answer>`, nothing stands between `</think>` and `<answer>`, the thinking holds no `</think>`, the answer no
  `</answer>`, and `<think>` and `<answer>` each occur once. Our `format` also allows whitespace between the blocks.
- accuracy (weight 1.0): math-verify on the whole response (not only the answer block): LaTeX extraction with
  `\\boxed{}` tried first and an anchor required, no "nits" or malformed-operator fixes, first match; the label is
  wrapped in `$…$` unless it starts with `$`, and compared as `verify(response, label)`, in that order.
Components `format` and `accuracy` (0/1), total = format_weight·format + accuracy_weight·accuracy.

One deliberate difference: a label math-verify extracts nothing from scores 0 and is counted
(`accuracy/label_parse_failures`); the reference scores it 1.0, which rewards every answer to a broken label.
math-verify runs in `VerifyPool` workers with a hard per-item timeout, as for `accuracy`.

>>> reference_format("<think>a</think><answer>1</answer>"), reference_format("<think>a</think> <answer>1</answer>")
(True, False)
>>> clean_response("  <think>a</think><answer>1</answer><|im_end|>\\n")
'<think>a</think><answer>1</answer>'
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from lmmr1.rewards.base import Reward, RewardOutput, check_lengths, where
from lmmr1.rewards.verify_pool import CRASH, LABEL_PARSE_FAILURE, OK, TIMEOUT, PoolRun, VerifyPool

# end-of-turn markers the reference deletes from a response (Qwen/ChatML, DeepSeek, GPT-style, Gemma)
END_MARKERS = ("<|im_end|>", "<｜end▁of▁sentence｜>", "<|endoftext|>", "<end_of_turn>")
_VERIFIER = f"{__name__}:verify_reference"


def clean_response(text: str) -> str:
    """The response as the reference verifies it: end-of-turn markers removed, surrounding whitespace stripped."""
    for marker in END_MARKERS:
        text = text.replace(marker, "")
    return text.strip()


def reference_format(text: str) -> bool:
    """LMM-R1's format rule on a cleaned response (see the module docstring)."""
    if text.count("<think>") != 1 or text.count("<answer>") != 1 or not text.startswith("<think>"):
        return False
    think_end = text.find("</think>", len("<think>"))  # the thinking may not hold `</think>`: the first one ends it
    answer = think_end + len("</think>")
    if think_end < 0 or not text.startswith("<answer>", answer):
        return False
    answer_end = text.find("</answer>", answer + len("<answer>"))  # likewise the first `</answer>` ends the answer
    return answer_end >= 0 and answer_end + len("</answer>") == len(text)


def wrap_label(label: str) -> str:
    """The label as the reference parses it: in `$…$` unless it already starts with `$`."""
    return label if label.startswith("$") else f"${label}$"


@functools.lru_cache(maxsize=1024)
def _parse_label(label: str) -> list:
    from math_verify import LatexExtractionConfig, parse

    return parse(label, extraction_config=[LatexExtractionConfig()], extraction_mode="first_match",
                 parsing_timeout=None)


def verify_reference(label: str, response: str) -> tuple[float, str]:
    """(score, status) of a cleaned response against a wrapped label, with the reference's math-verify settings; runs
    in a `VerifyPool` worker (no timeout of its own)."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify

    gold = _parse_label(label)
    if not gold:
        return 0.0, LABEL_PARSE_FAILURE  # the deliberate difference: the reference returns 1.0 here
    normalization = NormalizationConfig(nits=False, malformed_operators=False, basic_latex=True, boxed="all",
                                        units=True)
    config = LatexExtractionConfig(normalization_config=normalization, boxed_match_priority=0,
                                   try_extract_without_anchor=False)
    prediction = parse(response, extraction_config=[config], extraction_mode="first_match", parsing_timeout=None)
    try:
        return float(verify(prediction, gold, timeout_seconds=None)), OK  # argument order as in the reference
    except Exception:  # noqa: BLE001 - the reference scores a failed comparison 0
        return 0.0, OK


class LmmR1MathReward(Reward):
    """Components `format` and `accuracy`; needs the row's label (`answer`). See the module docstring."""

    name = "lmm_r1_math"

    def __init__(self, format_weight: float = 0.5, accuracy_weight: float = 1.0, timeout: float = 5.0,
                 workers: int | None = None, label_key: str = "answer") -> None:
        for flag, value in (("format_weight", format_weight), ("accuracy_weight", accuracy_weight)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{flag}: must be a finite number, got {value!r}")
        self.format_weight, self.accuracy_weight = float(format_weight), float(accuracy_weight)
        self.timeout, self.workers, self.label_key = timeout, workers, label_key
        self.pool = VerifyPool(workers=workers, timeout=timeout, verifier=_VERIFIER)  # started on first use

    def check_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        for i, row in enumerate(rows):
            label = row.get(self.label_key)
            if not isinstance(label, str) or not label.strip():
                raise ValueError(f"{where(row, i)}: {self.label_key!r} is missing or empty; {self.name} needs a "
                                 f"label (a Sokoban row needs a route to lmm_r1_sokoban, e.g. 'has:env')")

    def __call__(self, responses: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> RewardOutput:
        check_lengths(responses, rows)
        texts = [clean_response(response) for response in responses]
        formats = [float(reference_format(text)) for text in texts]
        jobs = [(wrap_label(str(row.get(self.label_key) or "")), text) for text, row in zip(texts, rows, strict=True)]
        run = self.pool.run(jobs) if jobs else PoolRun([], [], 0)
        accuracy = [score for score, _ in run.results]
        statuses = [status for _, status in run.results]
        stats = {"accuracy/timeouts": float(statuses.count(TIMEOUT)), "accuracy/crashes": float(statuses.count(CRASH)),
                 "accuracy/label_parse_failures": float(statuses.count(LABEL_PARSE_FAILURE)),
                 "accuracy/worker_deaths": float(run.worker_deaths)}
        total = [self.format_weight * f + self.accuracy_weight * a for f, a in zip(formats, accuracy, strict=True)]
        return RewardOutput(total=total, components={"format": formats, "accuracy": accuracy}, stats=stats)

    def start(self) -> None:
        self.pool.start()

    def close(self) -> None:
        self.pool.close()
