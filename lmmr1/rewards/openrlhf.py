"""OpenRLHF's remote reward protocol, both ways: POST `{"query": [...], "prompts": [...], "labels": [...]}` to the
reward URL (`--remote_rm_url`, e.g. `http://127.0.0.1:5000/get_reward`), answered by `{"rewards": [...]}`.

What the fields hold (OpenRLHF's experience maker, as LMM-R1 runs it):
- `query[i]`: sample i decoded with its special tokens: the prompt in the chat template, then the response. A server
  cuts the response out after the template's first assistant prefix (`<|im_start|>assistant\\n` for chatml), deletes
  end-of-turn markers and strips whitespace.
- `prompts[i]`: the row's input column as the data file holds it (`message`, a JSON string in LMM-R1's data);
  LMM-R1's Sokoban verifier finds the level by it (its `--dataset` maps prompts to `env_path`).
- `labels[i]`: the row's label column (`answer`), "" when the run names none (LMM-R1's Sokoban recipe).
Extra lists of numbers in the answer (LMM-R1's `format_rewards`, `acc_rewards`, `task_rewards`) are kept as
components by our client; our server sends its components the same way.

Differences from LMM-R1's servers, on inputs they mishandle: the assistant prefix is found as plain text (their phi3 and
phi4 patterns are unescaped regexes that match the first `<`), an empty response stays empty (they score the whole
query instead), and a prompt missing from `--dataset` is an error (their Sokoban server takes the most similar one).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmmr1.rewards.base import RewardOutput
from lmmr1.rewards.lmm_r1_math import clean_response
from lmmr1.rewards.remote import from_wire, to_wire


@dataclass(frozen=True)
class Template:
    """How a chat template lays out a conversation, as far as reward servers care."""

    turn: str  # one message: {role} / {Role} and {text}
    assistant: str  # what precedes the response; servers cut the response out after its first occurrence
    end: str  # what follows the response
    image: str = "<image>"  # an image item in the decoded prompt


TEMPLATES = {  # LMM-R1's verifier names (`--prompt-template`)
    "chatml": Template("<|im_start|>{role}\n{text}<|im_end|>\n", "<|im_start|>assistant\n", "<|im_end|>",
                       "<|vision_start|><|image_pad|><|vision_end|>"),
    "qwen1": Template("<｜{Role}｜>{text}", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"),
    "base": Template("{Role}: {text}\n\n", "Assistant: ", ""),
    "phi3": Template("<|{role}|>\n{text}<|end|>\n", "<|assistant|>\n", "<|end|>"),
    "phi4": Template("<|{role}|>\n{text}<|end|>\n", "<|assistant|>\n", "<|end|>"),
    "gemma3": Template("<start_of_turn>{role}\n{text}<end_of_turn>\n", "<start_of_turn>model\n", "<end_of_turn>"),
}


def template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"prompt template {name!r} is not one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def response_from_query(query: str, name: str = "chatml") -> str:
    """The response inside an OpenRLHF query: after the first assistant prefix (the whole query if there is none),
    end-of-turn markers removed, stripped.

    >>> response_from_query("<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n <answer>1</answer><|im_end|>")
    '<answer>1</answer>'
    """
    prefix = template(name).assistant
    start = query.find(prefix)
    return clean_response(query[start + len(prefix):] if start >= 0 else query)


def _messages(row: Mapping[str, Any]) -> list[Any]:
    message = row.get("message", [])
    if isinstance(message, str):
        try:
            message = json.loads(message)
        except ValueError:
            return [{"role": "user", "content": message}]
    return message if isinstance(message, list) else []


def query_for(row: Mapping[str, Any], response: str, name: str = "chatml") -> str:
    """The query OpenRLHF would send for `response` to `row`: the prompt in the template, then the response.

    >>> query_for({"message": [{"role": "user", "content": "2+2?"}]}, "<answer>4</answer>")
    '<|im_start|>user\\n2+2?<|im_end|>\\n<|im_start|>assistant\\n<answer>4</answer><|im_end|>'
    """
    layout = template(name)
    turns = []
    for message in _messages(row):
        if not isinstance(message, Mapping):
            continue
        content = message.get("content", "")
        if isinstance(content, list):
            content = "".join(layout.image if isinstance(item, Mapping) and item.get("type") == "image" else
                              str(item.get("text", "")) if isinstance(item, Mapping) else "" for item in content)
        role = str(message.get("role", "user"))
        turns.append(layout.turn.format(role=role, Role=role.capitalize(), text=content))
    return "".join(turns) + layout.assistant + response + layout.end


def prompt_of(row: Mapping[str, Any]) -> Any:
    """The row's input column as its file holds it where known (`_prompt`: `lmmr1 score` keeps it), else its
    `message` as JSON (the training loader decodes it and resolves image paths, so this string can differ from the
    file's: LMM-R1's Sokoban server then finds the level by its nearest-prompt fallback)."""
    if isinstance(row.get("_prompt"), str):
        return row["_prompt"]
    message = row.get("message", "")
    return message if isinstance(message, str) else json.dumps(message)


def request(responses: Sequence[str], rows: Sequence[Mapping[str, Any]], name: str = "chatml",
            label_key: str = "answer") -> dict[str, list[Any]]:
    """The body OpenRLHF posts for these responses to these rows."""
    return {"query": [query_for(row, response, name) for response, row in zip(responses, rows, strict=True)],
            "prompts": [prompt_of(row) for row in rows],
            "labels": [str(row.get(label_key) if row.get(label_key) is not None else "") for row in rows]}


def parse_answer(body: Any, n: int) -> RewardOutput:
    """`{"rewards": [n numbers], ...}` as a RewardOutput; other lists of n numbers become components (else the
    rewards are the one component `remote`). ValueError on anything malformed."""
    if not isinstance(body, Mapping) or "rewards" not in body:
        raise ValueError("answer is not an object with 'rewards'")
    total = from_wire(body["rewards"], n, "rewards")
    if any(math.isnan(t) for t in total):
        raise ValueError("rewards: null is not a reward")
    components = {}
    for key, values in body.items():
        if key == "rewards" or not isinstance(values, list) or len(values) != n:
            continue
        try:
            components[str(key)] = from_wire(values, n, str(key))
        except ValueError:
            continue  # a list of something else (texts, ids) is not a component
    return RewardOutput(total=total, components=components or {"remote": list(total)})


class DatasetIndex:
    """Rows of data files by their prompt, to join OpenRLHF's `prompts` to rows (levels in `env_path`, datasources)."""

    def __init__(self, paths: Sequence[str], input_key: str = "message", label_key: str = "answer") -> None:
        from pathlib import Path

        from lmmr1.data.records import _read_rows, load_rows

        self.rows: list[dict[str, Any]] = []
        self.by_prompt: dict[str, dict[str, Any]] = {}
        for path in paths:
            raw = {line: item for line, item, error in _read_rows(Path(path)) if error is None}  # prompts as written
            for row in load_rows(path, input_key=input_key, label_key=label_key, check_images=False):
                # by the prompt as written (what OpenRLHF sends), and as our client sends a loaded row's (`prompt_of`);
                # a prompt listed twice: the last row wins, as in LMM-R1's index
                self.by_prompt[self.key(raw[int(row["_where"].rpartition(":")[2])][input_key])] = row
                self.by_prompt.setdefault(prompt_of(row), row)
                self.rows.append(row)

    @staticmethod
    def key(prompt: Any) -> str:
        return prompt if isinstance(prompt, str) else json.dumps(prompt)

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, prompt: Any) -> dict[str, Any] | None:
        return self.by_prompt.get(self.key(prompt))


def rows_for(prompts: Sequence[Any] | None, labels: Sequence[Any] | None, n: int,
             index: DatasetIndex | None = None) -> list[dict[str, Any]]:
    """The row each of n requests is scored against: the indexed row of its prompt (when `index` is given), else
    `{"message": prompt}`; a non-empty label overrides the row's `answer`."""
    prompts = [None] * n if prompts is None else list(prompts)
    labels = [None] * n if labels is None else list(labels)
    if len(prompts) != n or len(labels) != n:
        raise ValueError(f"{n} queries but {len(prompts)} prompts and {len(labels)} labels")
    rows = []
    for i, (prompt, label) in enumerate(zip(prompts, labels, strict=True)):
        if index is not None:
            found = index.get(prompt)
            if found is None:
                raise ValueError(f"request item {i}: prompt is not in the server's --dataset: {str(prompt)[:200]!r}")
            row = dict(found)
        else:
            row = {"message": prompt} if prompt is not None else {}
        if label is not None and str(label) != "":
            row["answer"] = str(label)
        elif "answer" not in row and label is not None:
            row["answer"] = ""
        row.setdefault("_where", f"request item {i}")
        rows.append(row)
    return rows


def answer(out: RewardOutput) -> dict[str, Any]:
    """Our server's answer: `rewards` (the totals), plus each component as a list beside it."""
    return {"rewards": to_wire(out.total),
            **{name: to_wire(values) for name, values in out.components.items() if name != "rewards"}}
