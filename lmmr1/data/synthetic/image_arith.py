"""The arithmetic problems of `arith`, rendered into an image that the question refers to (perception + reasoning).

It shares the `arith` split namespace, so an image problem held out for evaluation never appears as text in training.
"""

from __future__ import annotations

import random

from lmmr1.data.synthetic.arith import draw
from lmmr1.data.synthetic.problem import Generator, Keep, Problem
from lmmr1.data.synthetic.render import text_card


def _sample(rng: random.Random, level: int, keep: Keep) -> Problem | None:
    problem = draw(rng, level)
    if not keep(problem.key):
        return None
    if problem.word:
        image = text_card(problem.text, rng, size=15)
        question = "Solve the word problem shown in the image."
    else:
        image = text_card(f"{problem.text} = ?", rng, size=20)
        question = "Compute the value of the expression shown in the image."
    return Problem(problem.key, question, f"$\\boxed{{{problem.value}}}$", image=image,
                   fields={"difficulty": level, "expression": problem.expression})


GENERATOR = Generator(datasource="image_arith", family="arith", levels=5, sample=_sample)
