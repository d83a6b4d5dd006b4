"""Synthetic task generators: `make(kind, n, seed, out)` writes `out/data.jsonl` (+ `out/images/*.png`).

    lmmr1 data make geometry --n 200 --seed 0 --out data/geometry
    lmmr1 data make geometry --n 50 --seed 0 --out data/geometry-val --split val

Output is a pure function of (kind, n, seed, difficulty, split): the same arguments give byte-identical files. Every
problem key belongs to exactly one split by a fixed hash partition (`problem.split_of`), so train, val and test sets
never share a problem, and rows within one file are distinct. Rows follow the LMM-R1 row format: a system prompt
asking for <think>/<answer>, the user's question (with its image first, referenced by a relative path), the label in
`answer`, `datasource`, `difficulty`, `problem` (the key) and per-kind fields (`expression`, `figure`, `env`,
`optimal_moves`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from lmmr1.data.synthetic import arith, geometry, image_arith, perception, pictured, sokoban
from lmmr1.data.synthetic.problem import SPLIT_SHARES, SYSTEM_PROMPT, Generator, split_of

GENERATORS: dict[str, Generator] = {
    "arith": arith.GENERATOR,
    "image-arith": image_arith.GENERATOR,
    "geometry": geometry.GENERATOR,
    "sokoban": sokoban.GENERATOR,
    "sokoban-agent": sokoban.AGENT_GENERATOR,
    "pictured-arith": pictured.ARITH,
    "pictured-word": pictured.WORD,
    "numbers": perception.NUMBERS,
    "shapes": perception.SHAPES_GENERATOR,
}
_NAMES = {"easy": 0.0, "medium": 0.5, "hard": 1.0}  # fraction of the way from level 1 to the top level


def levels_of(kind: str, difficulty: str | int | None) -> list[int]:
    """The difficulty levels a request draws from: None = all, an int or "2", a range "1-3", or easy/medium/hard."""
    top = GENERATORS[kind].levels
    if difficulty is None or difficulty == "mixed":
        return list(range(1, top + 1))
    text = str(difficulty).strip().lower()
    if text in _NAMES:
        return [1 + round(_NAMES[text] * (top - 1))]
    low, _, high = text.partition("-")
    if low.isdigit() and (not high or high.isdigit()):
        levels = list(range(int(low), int(high or low) + 1))
        if levels and 1 <= levels[0] and levels[-1] <= top:
            return levels
    raise ValueError(f"--difficulty {difficulty!r} is not valid for {kind}: use 1..{top}, a range like 1-{top}, "
                     f"easy, medium, hard or mixed")


def _kind(kind: str) -> str:
    name = kind.replace("_", "-")
    if name not in GENERATORS:
        raise ValueError(f"unknown synthetic data kind {kind!r}; choose from {sorted(GENERATORS)}")
    return name


def make(kind: str, n: int, seed: int, out: str | Path, *, difficulty: str | int | None = None,
         split: str = "train") -> Path:
    """Generate `n` distinct problems of `kind` for `split` into the folder `out`; returns the data.jsonl path.

    Raises ValueError for unknown kinds, splits or difficulties, and when the requested difficulty holds fewer than
    `n` distinct problems of this split.
    """
    kind = _kind(kind)
    if split not in SPLIT_SHARES:
        raise ValueError(f"--split {split!r} is not valid; choose from {sorted(SPLIT_SHARES)}")
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    generator, levels = GENERATORS[kind], levels_of(kind, difficulty)
    rng = random.Random(f"lmmr1:{kind}:{seed}:{split}:{','.join(map(str, levels))}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()

    def keep(key: str) -> bool:
        return key not in seen and split_of(generator.family, key) == split

    rows: list[dict[str, Any]] = []
    draws, budget = 0, 1000 + 200 * n
    while len(rows) < n:
        if draws == budget:
            raise ValueError(f"{kind}: only {len(rows)} distinct {split} problems found in {budget} draws at "
                             f"difficulty {difficulty}; ask for fewer rows (--n) or a wider --difficulty")
        draws += 1
        problem = generator.sample(rng, rng.choice(levels), keep)
        if problem is None:
            continue
        seen.add(problem.key)
        content: Any = problem.question
        if problem.image is not None or problem.images:
            (out / "images").mkdir(exist_ok=True)
            pictures = {f"images/{len(rows):06d}.png": problem.image} if problem.image is not None else {
                f"images/{len(rows):06d}_{k}.png": image for k, image in enumerate(problem.images)}
            for ref, image in pictures.items():
                image.save(out / ref, format="PNG")
            content = [*({"type": "image", "image": ref} for ref in pictures),
                       {"type": "text", "text": problem.question}]
        rows.append({"message": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}],
                     "answer": problem.answer, "datasource": generator.datasource, "problem": problem.key,
                     **problem.fields})
    path = out / "data.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


__all__ = ["GENERATORS", "SYSTEM_PROMPT", "levels_of", "make", "split_of"]
