"""Sokoban planning tasks: plan every move from one screenshot (LMM-R1's agent task, arXiv:2503.07536).

Levels come from reverse play (`lmmr1.envs.sokoban.generate_level`), are checked by the BFS solver, which also gives
the move-optimal plan stored as the answer ("up up left"). Rows carry the level as XSB text in `env` (the reward
replays the model's plan there) and its optimal length in `optimal_moves`. Kind `sokoban-agent` asks for step-by-step
play instead (multi-turn rollouts, `lmmr1.envs.sokoban_game`: a few moves per turn, the new frame after each turn),
on the same levels. Difficulty levels:
1 one box, 6x6-7x7; 2 two boxes, 7x7-8x8; 3 three boxes, 9x9-10x10 (sizes include the outer walls).
"""

from __future__ import annotations

import random
from functools import partial

from lmmr1.data.synthetic.problem import Generator, Keep, Problem
from lmmr1.envs.sokoban import generate_level, render, solve

# level -> (n boxes, smallest side, largest side, fewest moves an optimal plan must need)
LEVELS = {1: (1, 6, 7, 4), 2: (2, 7, 8, 8), 3: (3, 9, 10, 12)}
IMAGE_SIDE = 160  # pixels on the longer side of the level picture

QUESTION = (
    "The image shows a Sokoban puzzle. You are the blue circle; brown squares are boxes, red squares are goals and "
    "grey cells are walls. Each move goes one cell up, down, left or right; walking into a box pushes it one cell "
    "if the cell behind it is free, and boxes cannot be pulled. Find a sequence of moves that pushes every box onto "
    "a goal (a box on a goal turns green). Answer with the complete move sequence, e.g. "
    "<answer>up left left down</answer>."
)

AGENT_QUESTION = (
    "The image shows a Sokoban puzzle. You are the blue circle; brown squares are boxes, red squares are goals and "
    "grey cells are walls. Each move goes one cell up, down, left or right; walking into a box pushes it one cell "
    "if the cell behind it is free, and boxes cannot be pulled. Push every box onto a goal (a box on a goal turns "
    "green). Play step by step: each turn, give your next move or moves, e.g. <answer>up</answer> or "
    "<answer>left left</answer>; you will then see the new screen."
)


def _sample(rng: random.Random, level: int, keep: Keep, question: str = QUESTION) -> Problem | None:
    n_boxes, low, high, min_moves = LEVELS[level]
    height, width = rng.randint(low, high), rng.randint(low, high)
    board = generate_level(rng, height, width, n_boxes)
    xsb = board.to_xsb()
    if not keep(xsb):
        return None
    plan = solve(board)
    if plan is None or len(plan) < min_moves:  # unsolved within the BFS budget, or too easy for this level
        return None
    image = render(board, tile=IMAGE_SIDE // max(height, width))
    return Problem(xsb, question, " ".join(plan), image=image,
                   fields={"difficulty": level, "env": xsb, "optimal_moves": len(plan)})


GENERATOR = Generator(datasource="sokoban", family="sokoban", levels=len(LEVELS), sample=_sample)
AGENT_GENERATOR = Generator(datasource="sokoban_agent", family="sokoban", levels=len(LEVELS),
                            sample=partial(_sample, question=AGENT_QUESTION))
