"""What a synthetic task generator returns, and the hash partition that keeps train/val/test problems apart.

A generator draws a `Problem` from a seeded `random.Random`; `Problem.key` is the problem's canonical identity (the
expression, the figure's parameters, the level's XSB text). The split a key belongs to is a pure function of the key
(`split_of`), so a held-out set can never contain a training problem, whatever the seeds and sizes.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

SYSTEM_PROMPT = (
    "You are a helpful assistant. First think about the reasoning process step by step, then give the final answer. "
    "Put the reasoning inside <think> </think> tags and only the final answer inside <answer> </answer> tags, i.e. "
    "<think> reasoning here </think><answer> answer here </answer>."
)

# Percent of the problem space in each split: a key's hash in [0, 100) picks its split (test first, then val).
SPLIT_SHARES = {"test": 10, "val": 10, "train": 80}


@dataclass
class Problem:
    """One generated task, before it becomes a data row."""

    key: str
    """Canonical identity of the problem; decides its split and de-duplicates a dataset."""
    question: str
    """The user's prompt text."""
    answer: str
    """The label, e.g. "$\\boxed{12}$" or a Sokoban plan "up up left"."""
    image: Image.Image | None = None
    """Picture the question refers to (saved as images/NNNNNN.png), or None for a text-only row."""
    images: list[Image.Image] = field(default_factory=list)
    """Several pictures, in the order the question refers to them (saved as images/NNNNNN_K.png); with `image` unset."""
    fields: dict[str, Any] = field(default_factory=dict)
    """Extra row fields (env, figure parameters, ...) written next to message/answer/datasource."""


Keep = Callable[[str], bool]
"""Called by a generator with a candidate's key as early as possible: False means "draw another"."""


@dataclass(frozen=True)
class Generator:
    """A task kind: its datasource name, split namespace, number of difficulty levels and sampling function."""

    datasource: str
    """`datasource` field of its rows (routes rewards)."""
    family: str
    """Split namespace: kinds sharing problems (arith, image-arith) share it, so neither leaks into the other's
    held-out split."""
    levels: int
    """Difficulty levels 1..levels."""
    sample: Callable[[random.Random, int, Keep], Problem | None]
    """(rng, level, keep) -> a Problem, or None when the candidate was rejected (by keep or a quality check)."""


def split_of(family: str, key: str) -> str:
    """The split ("train", "val" or "test") that owns a problem key: a fixed hash partition of the problem space."""
    bucket = int.from_bytes(hashlib.sha256(f"{family}\0{key}".encode()).digest()[:8], "big") % 100
    for split, share in SPLIT_SHARES.items():
        if bucket < share:
            return split
        bucket -= share
    raise AssertionError("SPLIT_SHARES must sum to 100")
