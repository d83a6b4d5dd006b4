"""`lmmr1 score`: score a file of responses offline with any reward.

    lmmr1 score --reward math --input rows.jsonl --output scored.jsonl
    lmmr1 score --reward configs/rewards/mixed.yaml --input rows.jsonl --output scored.jsonl --on-bad-row skip

Each input row (JSONL, a JSON list, or Parquet; read like data files, `lmmr1.data.records`) holds `response` plus the
data fields the reward needs: `answer`, `datasource`, `env` or `env_path` (relative to the input file's folder),
`message` (a list or a JSON string); null counts as absent. Each row is written back unchanged plus `reward` (the
total) and `rewards` (the components that apply). A row is bad when a field is malformed or the reward cannot score it
(e.g. no `answer` for the accuracy reward). With `--on-bad-row error` (the default) every bad row is reported as
`file:row: field: what is wrong`, all at once, and nothing is written; with `--on-bad-row skip` bad rows are left out
of the output and counted, as the data loader does (`data.on_bad_row`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmmr1.data.records import DataError, _read_rows  # one reader and one bad-row report for data and scored files
from lmmr1.rewards.base import Reward, RewardOutput
from lmmr1.rewards.remote import RequestRefused, RewardServerError

ON_BAD_ROW = ("error", "skip")
_OPTIONAL = ("answer", "datasource", "env", "env_path", "message")  # null = absent (Parquet stores absent as null)


def _scoring_row(item: Any, at: str, folder: str) -> tuple[dict[str, Any], list[str]]:
    """The row as the reward sees it (`_where`, decoded `message`, `env` read from `env_path`) and its problems."""
    if not isinstance(item, dict):
        return {}, ["row is not a JSON object"]
    row = {k: v for k, v in item.items() if not (k in _OPTIONAL and v is None)}
    row["_where"], problems = at, []
    if not isinstance(row.get("response"), str):
        problems.append("response: missing" if row.get("response") is None else "response: not a string")
    for key in ("datasource", "env"):
        if key in row and not isinstance(row[key], str):
            problems.append(f"{key}: not a string")
    if "answer" in row:
        if isinstance(row["answer"], int | float) and not isinstance(row["answer"], bool):
            row["answer"] = str(row["answer"])
        elif not isinstance(row["answer"], str):
            problems.append("answer: not a string")
    if isinstance(row.get("message"), str):
        row["_prompt"] = row["message"]  # the string OpenRLHF would send a reward server as `prompts`
        try:
            row["message"] = json.loads(row["message"])
        except (RecursionError, ValueError) as e:  # JSONDecodeError, or an integer beyond the int/str digit limit
            problems.append(f"message: not valid JSON ({getattr(e, 'msg', None) or 'nested too deeply or too long'})")
    if "env_path" in row and "env" not in row:
        from lmmr1.envs.sokoban import read_level_text

        env_file = os.path.join(folder, str(row["env_path"]))
        try:
            row["env"] = read_level_text(env_file)  # XSB text, or a .npy grid (LMM-R1's Sokoban data) as XSB
        except (OSError, ValueError) as e:  # ValueError: not UTF-8, or not a level grid
            problems.append(f"env_path: cannot read {env_file}: {getattr(e, 'strerror', None) or e}")
    return row, problems


def reward_problems(reward: Reward, rows: Sequence[dict[str, Any]]) -> dict[int, str]:
    """{index: problem} for each row `reward.check_rows` rejects. check_rows names only the first bad row, so a
    rejected batch is bisected: k bad rows among n cost about 2·k·log2(n) checks, and one check when none is bad."""
    try:
        reward.check_rows(rows)
        return {}
    except RequestRefused:  # a wrong token or size limit is not a row's problem: it fails the whole run
        raise
    except ValueError as e:
        if len(rows) == 1:
            return {0: str(e)}
    half = len(rows) // 2
    found = reward_problems(reward, rows[:half])
    found.update({half + i: p for i, p in reward_problems(reward, rows[half:]).items()})
    return found


@dataclass
class ScoringInput:
    """The good rows of an input file, and what was wrong with the others."""

    originals: list[dict[str, Any]]  # rows as read, written back with the scores
    rows: list[dict[str, Any]]  # the same rows as the reward sees them
    problems: list[str]  # `file:row: field: problem`, one per entry
    bad: int  # rows left out
    total: int  # rows in the file


def load_rows(path: str, reward: Reward | None = None, on_bad_row: str = "error") -> ScoringInput:
    """The rows of `path` to score. A row is bad when a field is malformed or `reward` (if given) rejects it in
    `check_rows`. With on_bad_row="error" any bad row raises DataError listing each problem as `file:row: field:
    problem` (the data loader's report); with "skip" bad rows are left out and their problems returned."""
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"--on-bad-row must be one of {list(ON_BAD_ROW)}, got {on_bad_row!r}")
    folder = os.path.dirname(os.path.abspath(path))
    entries = []  # (original, scoring row, problems)
    for n, item, error in _read_rows(Path(path)):
        at = f"{path}:{n}"
        row, problems = ({}, [error]) if error is not None else _scoring_row(item, at, folder)
        entries.append((item, row, [f"{at}: {p}" for p in problems]))
    if reward is not None:
        good = [e for e in entries if not e[2]]
        for i, problem in reward_problems(reward, [row for _, row, _ in good]).items():
            good[i][2].append(problem)  # check_rows messages start with the row's `_where` (file:row) already
    problems = [p for _, _, row_problems in entries for p in row_problems]
    kept = [e for e in entries if not e[2]]
    bad = len(entries) - len(kept)
    if bad and on_bad_row == "error":
        raise DataError(problems, header=f"{path}: {bad} of {len(entries)} rows are bad (--on-bad-row skip leaves them "
                                         f"out):")
    return ScoringInput([e[0] for e in kept], [e[1] for e in kept], problems, bad, len(entries))


def score_rows(reward: Reward, rows: list[dict[str, Any]], batch_size: int = 256, check: bool = True) -> RewardOutput:
    """Check (unless `check` is False: `load_rows` did) then score `rows` (each holding `response`) in batches; one
    RewardOutput for all of them."""
    if check:
        reward.check_rows(rows)
    total: list[float] = []
    components: dict[str, list[float]] = {}
    stats: dict[str, float] = {}
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        out = reward([r["response"] for r in batch], batch)
        for key in components.keys() - out.components.keys():
            components[key].extend([math.nan] * len(batch))
        for key, values in out.components.items():
            components.setdefault(key, [math.nan] * len(total)).extend(values)
        total.extend(out.total)
        for key, value in out.stats.items():
            stats[key] = stats.get(key, 0.0) + value
    return RewardOutput(total=total, components=components, stats=stats)


def main(argv: list[str]) -> int:
    """Entry point of `lmmr1 score`; returns 0, or 2 with the problems on stderr."""
    from lmmr1.rewards.build import build_reward

    parser = argparse.ArgumentParser(prog="lmmr1 score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward", required=True, help="built-in name (format, accuracy, math, sokoban, lmm_r1_math, "
                                                        "lmm_r1_sokoban, lmm_r1), plug-in file.py:fn or "
                                                        "package.module:fn, YAML config, or server URL")
    parser.add_argument("--input", required=True, help="JSONL, .json list or .parquet rows holding `response`")
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--on-bad-row", choices=ON_BAD_ROW, default="error",
                        help="error: report every bad row and write nothing (default); skip: leave bad rows out of "
                             "the output and report how many and why")
    args = parser.parse_args(argv)
    reward = None
    try:
        reward = build_reward(args.reward)
        data = load_rows(args.input, reward, args.on_bad_row)
        if data.bad:  # --on-bad-row skip
            header = f"{args.input}: skipped {data.bad} of {data.total} rows (--on-bad-row skip):"
            print(f"lmmr1 score: {DataError(data.problems, header)}", file=sys.stderr)
            if not data.rows:
                raise ValueError(f"{args.input}: all {data.total} rows are bad; nothing to score")
        out = score_rows(reward, data.rows, args.batch_size, check=False)
    except (ValueError, RewardServerError) as e:  # bad rows, config, a reward server that is gone: no traceback
        print(f"lmmr1 score: error:\n{e}", file=sys.stderr)
        return 2
    finally:
        if reward is not None:
            reward.close()
    with open(args.output, "w", encoding="utf-8") as f:
        for i, original in enumerate(data.originals):
            total = out.total[i]
            record = {**original, "reward": None if math.isnan(total) else total, "rewards": out.row(i)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    means = ", ".join(f"{k}={v:.4f}" for k, v in out.component_means().items())
    mean_total = sum(out.total) / len(out.total) if out.total else math.nan
    skipped = f" ({data.bad} bad rows skipped)" if data.bad else ""
    print(f"scored {len(data.rows)} rows{skipped} -> {args.output}: reward={mean_total:.4f} {means} {out.stats}",
          file=sys.stderr)
    return 0
