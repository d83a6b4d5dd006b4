"""Arithmetic whose numbers are only in pictures: each operand is its own image, drawn the way the aligned mini LMM's
vision tower learned to read (`perception.number_image`), and the question names the operation in words.

    pictured-arith   "The first image shows a number A and the second image shows a number B. Compute A + B."
    pictured-word    a word problem whose two quantities are the pictures ("... buys <image 2> more ..."): reading
                     the numbers is not enough, the story decides the operation (+, -, × or ÷)

Levels: 1 sums and differences of numbers up to 20 (pictured-word: + and - stories); 2 up to 99 (pictured-word: every
story, products and quotients of small numbers). A problem's key is its computation (e.g. "47+8"), in the `arith`
split namespace, so a held-out pictured problem never appears in any training set of `arith`, `image-arith` or these
kinds, as text or as pictures.
"""

from __future__ import annotations

import random

from lmmr1.data.synthetic.perception import number_image
from lmmr1.data.synthetic.problem import Generator, Keep, Problem

_STYLES = 10_000
_HIGH = {1: 20, 2: 99}


def _pictures(rng: random.Random, *values: int) -> list:
    return [number_image(v, rng.randrange(_STYLES)) for v in values]


def _arith(rng: random.Random, level: int, keep: Keep) -> Problem | None:
    high = _HIGH[level]
    a, b = rng.randint(1, high), rng.randint(1, high)
    op = rng.choice("+-")
    if op == "-" and a < b:
        a, b = b, a
    expression = f"{a}{op}{b}"
    if not keep(expression):
        return None
    question = f"The first image shows a number A and the second image shows a number B. Compute A {op} B."
    return Problem(expression, question, f"$\\boxed{{{a + b if op == '+' else a - b}}}$", images=_pictures(rng, a, b),
                   fields={"difficulty": level, "expression": expression})


_STORIES = {  # operation -> (template, operand sampler); {0}/{1} mark where the first/second picture belongs
    "+": ("Maya has {0} stickers. Then she buys {1} more stickers. How many stickers does she have now?",
          lambda rng, high: (rng.randint(1, high), rng.randint(1, high))),
    "-": ("A tank holds {0} liters of water. Then {1} liters leak out. How many liters are left?",
          lambda rng, high: sorted((rng.randint(1, high), rng.randint(1, high)), reverse=True)),
    "*": ("There are {0} boxes and each box holds {1} apples. How many apples are there in total?",
          lambda rng, high: (rng.randint(2, 9), rng.randint(2, 12))),
    "/": ("{0} students are split into groups of {1} students each. How many groups are there?",
          lambda rng, high: (lambda b, q: (b * q, b))(rng.randint(2, 9), rng.randint(2, 11))),
}


def _word(rng: random.Random, level: int, keep: Keep) -> Problem | None:
    op = rng.choice("+-" if level == 1 else "+-*/")
    template, operands = _STORIES[op]
    a, b = operands(rng, _HIGH[level])
    expression = f"{a}{op}{b}"
    if not keep(expression):
        return None
    story = template.format("(first image)", "(second image)")
    question = f"{story} The numbers are shown in the images, in order."
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    return Problem(expression, question, f"$\\boxed{{{value}}}$", images=_pictures(rng, a, b),
                   fields={"difficulty": level, "expression": expression})


ARITH = Generator(datasource="pictured_arith", family="arith", levels=2, sample=_arith)
WORD = Generator(datasource="pictured_word", family="arith", levels=2, sample=_word)
