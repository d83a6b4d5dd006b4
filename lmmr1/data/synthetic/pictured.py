"""Arithmetic whose first number is only in a picture: drawn the way the aligned mini LMM's vision tower learned to
read (`perception.number_image`), called A in the question; the second number is in the text.

    pictured-arith   "The image shows a number A. Compute A + 7."
    pictured-word    "The image shows a number A. Maya has A stickers. Then she buys 7 more stickers. How many ...?":
                     reading the number is not enough, the story decides the operation (+, -, × or ÷)

One picture, not one per operand: the mini LMM's two-layer tower was aligned on single pictures and, shown two, reads
the first and hardly ever the second (0 of 100 pictured problems right before RL); with one picture it reads A in
~80% of the problems and the task starts neither at 0 nor near 1.
Levels: 1 numbers up to 20 (pictured-word: + and - stories); 2 up to 99 (pictured-word: every story, products and
quotients of small numbers). A problem's key is its computation (e.g. "47+8"), in the `arith` split namespace, so a
held-out pictured problem never appears in any training set of `arith`, `image-arith` or these kinds, as text or as
a picture.
"""

from __future__ import annotations

import random

from lmmr1.data.synthetic.perception import number_image
from lmmr1.data.synthetic.problem import Generator, Keep, Problem

_STYLES = 10_000
_HIGH = {1: 20, 2: 99}


def _picture(rng: random.Random, value: int) -> list:
    return [number_image(value, rng.randrange(_STYLES))]


def _arith(rng: random.Random, level: int, keep: Keep) -> Problem | None:
    high = _HIGH[level]
    a, b = rng.randint(1, high), rng.randint(1, high)
    op = rng.choice("+-")
    if op == "-" and a < b:
        a, b = b, a
    expression = f"{a}{op}{b}"
    if not keep(expression):
        return None
    question = f"The image shows a number A. Compute A {op} {b}."
    return Problem(expression, question, f"$\\boxed{{{a + b if op == '+' else a - b}}}$", images=_picture(rng, a),
                   fields={"difficulty": level, "expression": expression})


_STORIES = {  # operation -> (template, operand sampler); A is the pictured number, {b} the one in the text
    "+": ("Maya has A stickers. Then she buys {b} more stickers. How many stickers does she have now?",
          lambda rng, high: (rng.randint(1, high), rng.randint(1, high))),
    "-": ("A tank holds A liters of water. Then {b} liters leak out. How many liters are left?",
          lambda rng, high: sorted((rng.randint(1, high), rng.randint(1, high)), reverse=True)),
    "*": ("There are A boxes and each box holds {b} apples. How many apples are there in total?",
          lambda rng, high: (rng.randint(2, 9), rng.randint(2, 12))),
    "/": ("A students are split into groups of {b} students each. How many groups are there?",
          lambda rng, high: (lambda b, q: (b * q, b))(rng.randint(2, 9), rng.randint(2, 11))),
}


def _word(rng: random.Random, level: int, keep: Keep) -> Problem | None:
    op = rng.choice("+-" if level == 1 else "+-*/")
    template, operands = _STORIES[op]
    a, b = operands(rng, _HIGH[level])
    expression = f"{a}{op}{b}"
    if not keep(expression):
        return None
    question = f"The image shows a number A. {template.format(b=b)}"
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    return Problem(expression, question, f"$\\boxed{{{value}}}$", images=_picture(rng, a),
                   fields={"difficulty": level, "expression": expression})


ARITH = Generator(datasource="pictured_arith", family="arith", levels=2, sample=_arith)
WORD = Generator(datasource="pictured_word", family="arith", levels=2, sample=_word)
