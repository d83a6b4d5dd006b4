"""Math accuracy reward: the prediction is mathematically equivalent to the label (math-verify, in a process pool).

The prediction is the content of the last `<answer>…</answer>`; without an answer tag, the last `\\boxed{…}` in the
response; with neither, the row scores 0 and is counted as `accuracy/answer_missing`. Multiple-choice labels (a single
letter such as `B`, `(B)`, `$\\boxed{C}$`) are compared as letters here, since math-verify reads letters as symbols.
Everything else goes to math-verify in `VerifyPool` workers with a hard per-item timeout; an item over it scores 0 and
is counted (`accuracy/timeouts`), as is a label that does not parse (`accuracy/label_parse_failures`). A worker that
dies (killed from outside, crashed) is replaced and counted (`accuracy/worker_deaths`); its item is verified again,
and scores 0 only if it kills a second worker too (`accuracy/crashes`).

>>> last_boxed("so \\\\boxed{1} or rather \\\\boxed{\\\\frac{1}{2}}.")
'\\\\frac{1}{2}'
>>> choice_letter("(B) 12"), choice_letter("$\\\\boxed{C}$", label=True), choice_letter("12")
('B', 'C', None)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from lmmr1.rewards.base import Reward, RewardOutput, check_lengths, tag_content, where
from lmmr1.rewards.verify_pool import CRASH, LABEL_PARSE_FAILURE, TIMEOUT, PoolRun, VerifyPool

_BRACE = re.compile(r"[{}]")
_WRAPPERS = re.compile(r"^\\(?:boxed|text|textbf|mathrm|mathbf)\{(.*)\}$", re.DOTALL)
_LABEL_LETTER = re.compile(r"^\(?([A-J])\)?\.?$")
_PRED_LETTER = re.compile(r"^\(?([A-Ja-j])\)?(?:$|[.:)]|\s)")


def last_boxed(text: str) -> str | None:
    """Content of the last closed `\\boxed{…}` (balanced braces), or None when there is none."""
    # One pass pairs every brace (a rescan from each unclosed \\boxed{ was quadratic: seconds for a response that
    # repeats "\\boxed{"); then the last \\boxed{ whose brace closes wins.
    closing, stack = {}, []
    for match in _BRACE.finditer(text):
        if match.group() == "{":
            stack.append(match.start())
        elif stack:
            closing[stack.pop()] = match.start()
    start = text.rfind("\\boxed{")
    while start != -1:
        brace = start + len("\\boxed")
        if brace in closing:
            return text[brace + 1:closing[brace]].strip()
        start = text.rfind("\\boxed{", 0, start)
    return None


def extract_prediction(response: str, answer_tag: str = "answer") -> str | None:
    """The text to grade: last `<answer>` content, else last `\\boxed{}` content, else None."""
    answer = tag_content(response, answer_tag)
    return answer if answer is not None else last_boxed(response)


def _unwrap(text: str) -> str:
    text = text.strip().strip("$").strip()
    while (match := _WRAPPERS.match(text)) is not None:
        text = match.group(1).strip()
    return text


def choice_letter(text: str, label: bool = False) -> str | None:
    """The multiple-choice letter a text names, upper-cased, or None. Labels must be just the letter (`B`, `(B)`,
    `\\boxed{B}`); predictions may add the option text after it (`(B) 12`, `B. 12`)."""
    text = _unwrap(text)
    match = (_LABEL_LETTER if label else _PRED_LETTER).match(text)
    return match.group(1).upper() if match else None


class AccuracyReward(Reward):
    """Component `accuracy` (1/0) for every row; needs the row's `answer` (the label)."""

    name = "accuracy"

    def __init__(self, timeout: float = 5.0, workers: int | None = None, answer_tag: str = "answer",
                 label_key: str = "answer") -> None:
        self.timeout, self.workers, self.answer_tag, self.label_key = timeout, workers, answer_tag, label_key
        self.pool = VerifyPool(workers=workers, timeout=timeout)  # processes start on first call, not here

    def check_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        for i, row in enumerate(rows):
            label = row.get(self.label_key)
            if not isinstance(label, str) or not label.strip():
                ds = row.get("datasource", "")
                raise ValueError(f"{where(row, i)}: {self.label_key!r} is missing or empty; the accuracy reward "
                                 f"needs a label (datasource {ds!r})")

    def __call__(self, responses: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> RewardOutput:
        check_lengths(responses, rows)
        scores = [0.0] * len(responses)
        stats = {"accuracy/timeouts": 0.0, "accuracy/label_parse_failures": 0.0, "accuracy/answer_missing": 0.0,
                 "accuracy/crashes": 0.0, "accuracy/worker_deaths": 0.0}
        jobs, job_rows = [], []
        for i, (response, row) in enumerate(zip(responses, rows, strict=True)):
            label = str(row.get(self.label_key) or "")
            prediction = extract_prediction(response, self.answer_tag)
            if prediction is None:
                stats["accuracy/answer_missing"] += 1
            elif (letter := choice_letter(label, label=True)) is not None:
                scores[i] = float(choice_letter(prediction) == letter)
            elif not label.strip():
                stats["accuracy/label_parse_failures"] += 1
            else:
                jobs.append((label, prediction))
                job_rows.append(i)
        run = self.pool.run(jobs) if jobs else PoolRun([], [], 0)
        stats["accuracy/worker_deaths"] = float(run.worker_deaths)
        counters = {TIMEOUT: "accuracy/timeouts", CRASH: "accuracy/crashes",
                    LABEL_PARSE_FAILURE: "accuracy/label_parse_failures"}
        for i, (score, status) in zip(job_rows, run.results, strict=True):
            scores[i] = score
            if status in counters:
                stats[counters[status]] += 1
        return RewardOutput(total=list(scores), components={self.name: scores}, stats=stats)

    def start(self) -> None:
        self.pool.start()

    def close(self) -> None:
        self.pool.close()
