"""Plug-in rewards: a user function named `path/to/file.py:fn` or `package.module:fn`.

Two calling conventions are accepted, chosen from the function's parameter names:
- lmmr1: `fn(responses: list[str], rows: list[dict]) -> list[float] | list[dict[str, float]]`; a list of floats becomes
  one component named after the plug-in, a list of dicts becomes one component per key (total = the `total` key if
  present, else the sum of the values).
- LMM-R1 / OpenRLHF: `reward_func(queries, prompts, labels) -> Tensor | list[float]`, so existing reward files work
  unchanged. Here `queries` are the response texts, `prompts` the user message as text and `labels` the `answer`s.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "r.py")
>>> _ = open(path, "w").write("def length(responses, rows):\\n    return [len(r) / 10 for r in responses]\\n")
>>> PluginReward(f"{path}:length")(["abcde"], [{}]).components
{'length': [0.5]}
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lmmr1.rewards.base import Reward, RewardOutput, check_lengths

_LMM_R1_PARAMS = {"queries", "prompts", "labels"}


def load_function(target: str) -> Callable:
    """Import `file.py:fn` (a path, relative to the working directory) or `package.module:fn`."""
    module_name, sep, fn_name = target.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise ValueError(f"plug-in {target!r}: expected 'path/to/file.py:function' or 'package.module:function'")
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = os.path.abspath(module_name)
        if not os.path.isfile(path):
            raise ValueError(f"plug-in {target!r}: file {path} does not exist")
        unique = "lmmr1_plugin_" + hashlib.sha1(path.encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(unique, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"plug-in {target!r}: cannot import {module_name!r}: {e}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"plug-in {target!r}: {module_name} has no function {fn_name!r}")
    return fn


def prompt_text(row: Mapping[str, Any]) -> str:
    """The user turn(s) of the row's `message` as plain text (image items dropped), for LMM-R1 style `prompts`."""
    message = row.get("message", "")
    if isinstance(message, str):
        try:
            message = json.loads(message)
        except json.JSONDecodeError:
            return message
    texts = []
    for turn in message if isinstance(message, list) else []:
        if not isinstance(turn, Mapping) or turn.get("role", "user") != "user":
            continue
        content = turn.get("content", "")
        if isinstance(content, str):
            texts.append(content)
        else:
            texts.extend(str(item.get("text", "")) for item in content if isinstance(item, Mapping)
                         and item.get("type") == "text")
    return "\n".join(texts)


class PluginReward(Reward):
    """Wraps a user function; `style` is "auto" (by parameter names), "lmmr1" or "lmm-r1"."""

    def __init__(self, target: str, name: str | None = None, style: str = "auto", label_key: str = "answer") -> None:
        if style not in ("auto", "lmmr1", "lmm-r1"):
            raise ValueError(f"style: {style!r} is not one of ['auto', 'lmmr1', 'lmm-r1']")
        self.target, self.style, self.label_key = target, style, label_key
        self.name = name or target.rpartition(":")[2]
        self._fn = load_function(target)  # fail at build time, not at the first step

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_fn"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fn = load_function(self.target)

    def _is_lmm_r1(self) -> bool:
        if self.style != "auto":
            return self.style == "lmm-r1"
        params = set(inspect.signature(self._fn).parameters)
        return _LMM_R1_PARAMS <= params or self.target.endswith(":reward_func")

    def __call__(self, responses: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> RewardOutput:
        check_lengths(responses, rows)
        if self._is_lmm_r1():
            labels = [str(row.get(self.label_key, "")) for row in rows]
            raw = self._fn(list(responses), [prompt_text(row) for row in rows], labels)
        else:
            raw = self._fn(list(responses), list(rows))
        return self._to_output(raw, len(responses))

    def _to_output(self, raw: Any, n: int) -> RewardOutput:
        if isinstance(raw, RewardOutput):
            return raw
        if hasattr(raw, "tolist"):
            raw = raw.tolist()
        if not isinstance(raw, list | tuple) or len(raw) != n:
            got = f"{len(raw)} values" if isinstance(raw, list | tuple) else type(raw).__name__
            raise ValueError(f"plug-in {self.target}: returned {got} for {n} responses; expected a list of {n} "
                             f"floats or of {n} dicts")
        if all(isinstance(x, Mapping) for x in raw):
            keys = sorted({k for x in raw for k in x if k != "total"})
            components = {k: [self._number(x.get(k, math.nan), k) for x in raw] for k in keys}
            total = [self._number(x["total"], "total") if "total" in x
                     else sum(v for k, v in x.items() if not math.isnan(self._number(v, k))) for x in raw]
            return RewardOutput(total=total, components=components)
        scores = [self._number(x, self.name) for x in raw]
        return RewardOutput(total=list(scores), components={self.name: scores})

    def _number(self, value: Any, key: str) -> float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"plug-in {self.target}: {key!r} value {value!r} is not a number") from None
