"""`lmmr1 score`: score a file of responses offline with any reward.

    lmmr1 score --reward math --input rows.jsonl --output scored.jsonl
    lmmr1 score --reward configs/rewards/mixed.yaml --input rows.jsonl --output scored.jsonl

Each input row (JSONL, or a JSON list) holds `response` plus the data fields the reward needs: `answer`, `datasource`,
`env` or `env_path` (relative to the input file's folder), `message` (a list or a JSON string). Each row is written
back unchanged plus `reward` (the total) and `rewards` (the components that apply). Bad rows are reported as
`file:row: field: what is wrong`, all at once, and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

from lmmr1.rewards.base import Reward, RewardOutput


def _read(path: str) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from e
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of rows")
            return data
        rows = []
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((n, ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})")))
        return rows


def load_rows(path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(original rows, scoring rows) from `path`; scoring rows carry `_where`, a decoded `message` and `env` read
    from `env_path`. Raises ValueError listing every bad row as `file:row: field: problem`."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: input file does not exist")
    raw = _read(path)
    numbered = raw if raw and isinstance(raw[0], tuple) else list(enumerate(raw, start=1))
    folder = os.path.dirname(os.path.abspath(path))
    originals, rows, errors = [], [], []
    for n, item in numbered:
        at = f"{path}:{n}"
        if isinstance(item, Exception):
            errors.append(str(item))
            continue
        if not isinstance(item, dict):
            errors.append(f"{at}: row is not a JSON object")
            continue
        row, problems = dict(item, _where=at), []
        if not isinstance(row.get("response"), str):
            problems.append("response: missing" if "response" not in row else "response: not a string")
        for key in ("datasource", "env"):
            if key in row and not isinstance(row[key], str):
                problems.append(f"{key}: not a string")
        if "answer" in row:
            if isinstance(row["answer"], int | float) and not isinstance(row["answer"], bool):
                row["answer"] = str(row["answer"])
            elif not isinstance(row["answer"], str):
                problems.append("answer: not a string")
        if isinstance(row.get("message"), str):
            try:
                row["message"] = json.loads(row["message"])
            except json.JSONDecodeError as e:
                problems.append(f"message: not valid JSON ({e.msg})")
        if "env_path" in row and "env" not in row:
            env_file = os.path.join(folder, str(row["env_path"]))
            if os.path.isfile(env_file):
                with open(env_file, encoding="utf-8") as f:
                    row["env"] = f.read()
            else:
                problems.append(f"env_path: file {env_file} does not exist")
        errors.extend(f"{at}: {p}" for p in problems)
        originals.append(item)
        rows.append(row)
    if errors:
        raise ValueError("\n".join(errors))
    return originals, rows


def score_rows(reward: Reward, rows: list[dict[str, Any]], batch_size: int = 256) -> RewardOutput:
    """Check then score `rows` (each holding `response`) in batches; one RewardOutput for all of them."""
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
    parser.add_argument("--reward", required=True, help="built-in name (format, accuracy, math, sokoban), plug-in "
                                                        "file.py:fn or package.module:fn, YAML config, or server URL")
    parser.add_argument("--input", required=True, help="JSONL (or .json list) rows holding `response`")
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    reward = None
    try:
        originals, rows = load_rows(args.input)
        reward = build_reward(args.reward)
        out = score_rows(reward, rows, args.batch_size)
    except ValueError as e:
        print(f"lmmr1 score: error:\n{e}", file=sys.stderr)
        return 2
    finally:
        if reward is not None:
            reward.close()
    with open(args.output, "w", encoding="utf-8") as f:
        for i, original in enumerate(originals):
            total = out.total[i]
            record = {**original, "reward": None if math.isnan(total) else total, "rewards": out.row(i)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    means = ", ".join(f"{k}={v:.4f}" for k, v in out.component_means().items())
    mean_total = sum(out.total) / len(out.total) if out.total else math.nan
    print(f"scored {len(originals)} rows -> {args.output}: reward={mean_total:.4f} {means} {out.stats}",
          file=sys.stderr)
    return 0
