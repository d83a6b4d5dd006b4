"""Text arithmetic problems in five difficulty levels, with exact integer answers ("$\\boxed{42}$").

Levels grow along the axes LMM-R1's FRE stage relies on (digits, operations, multi-step reasoning):
1 one + or - on single digits; 2 one +, - or × on two-digit numbers; 3 two operations with precedence;
4 two-step word problems; 5 three operations with ÷ and parentheses. Every intermediate value is a non-negative
integer. A row's `expression` field holds the computation in Python syntax (e.g. "(12+7)*3") for checking.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from fractions import Fraction

from lmmr1.data.synthetic.problem import Generator, Keep, Problem

Node = int | tuple[str, "Node", "Node"]

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_SHOW = {"+": " + ", "-": " - ", "*": " × ", "/": " ÷ "}
# level -> (operations, operand range, operator set); level 4 is the word problems
_MAX_VALUE = 9999  # keeps level 3/5 products readable
_LEVELS = {1: (1, (1, 9), "+-"), 2: (1, (10, 99), "+-*"), 3: (2, (2, 30), "+-*"), 5: (3, (2, 40), "+-*/")}


def _tree(rng: random.Random, n_ops: int, low: int, high: int, ops: str) -> Node:
    if n_ops == 0:
        return rng.randint(low, high)
    left = rng.randint(0, n_ops - 1)
    return rng.choice(ops), _tree(rng, left, low, high, ops), _tree(rng, n_ops - 1 - left, low, high, ops)


def _value(node: Node) -> Fraction | None:
    """Exact value, or None if any sub-expression is negative, fractional or divides by zero."""
    if isinstance(node, int):
        return Fraction(node)
    op, a, b = node
    x, y = _value(a), _value(b)
    if x is None or y is None or (op == "/" and y == 0):
        return None
    v = {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else x}[op]
    return v if v >= 0 and v.denominator == 1 else None


def _show(node: Node, symbols: dict[str, str], parent: str | None = None, right: bool = False) -> str:
    """Infix text with only the parentheses precedence needs."""
    if isinstance(node, int):
        return str(node)
    op, a, b = node
    text = _show(a, symbols, op) + symbols[op] + _show(b, symbols, op, right=True)
    if parent is not None and (_PRECEDENCE[op] < _PRECEDENCE[parent]
                               or (right and _PRECEDENCE[op] == _PRECEDENCE[parent] and parent in "-/")):
        text = f"({text})"
    return text


@dataclass
class Arith:
    """A generated arithmetic problem in its two readable forms."""

    key: str  # canonical identity, e.g. "12+7*3" or "word2:24/4*3"
    expression: str  # Python syntax, evaluates to the answer
    text: str  # what the user reads: "12 + 7 × 3" or the word problem
    value: int
    word: bool


def _word(rng: random.Random) -> tuple[int, str, str]:
    """(template index, expression, text) of a two-step word problem."""
    t = rng.randrange(6)
    if t == 0:
        a, b = rng.randint(2, 9), rng.randint(4, 12)
        c = rng.randint(1, a * b - 1)
        return t, f"{a}*{b}-{c}", (f"A baker bakes {a} trays of {b} muffins each and sells {c} muffins. "
                                   "How many muffins are left?")
    if t == 1:
        a, b, c = rng.randint(3, 60), rng.randint(2, 9), rng.randint(3, 12)
        return t, f"{a}+{b}*{c}", (f"Maya has {a} stickers. She buys {b} packs with {c} stickers in each pack. "
                                   "How many stickers does she have now?")
    if t == 2:
        b, k, c = rng.randint(2, 6), rng.randint(3, 9), rng.randint(2, 8)
        return t, f"{b * k}/{b}*{c}", (f"A class of {b * k} students is split into groups of {b}. Each group gets "
                                       f"{c} markers. How many markers are handed out?")
    if t == 3:
        a, b, c, d = rng.randint(2, 9), rng.randint(1, 5), rng.randint(2, 6), rng.randint(2, 9)
        return t, f"{a}*{c}+{b}*{d}", (f"A notebook costs {a} dollars and a pen costs {b} dollars. How much do {c} "
                                       f"notebooks and {d} pens cost in total, in dollars?")
    if t == 4:
        b, c = rng.randint(2, 9), rng.randint(2, 8)
        a = rng.randint(b * c + 1, b * c + 80)
        return t, f"{a}-{b}*{c}", (f"A tank holds {a} liters of water. {b} liters leak out every hour for {c} hours. "
                                   "How many liters are left?")
    a, b, c = rng.randint(5, 30), rng.randint(2, 7), rng.randint(1, 25)
    return t, f"{a}*{b}+{c}", (f"Sam reads {a} pages on each of {b} days and then {c} more pages. "
                               "How many pages has he read in total?")


def _word_value(expression: str) -> int:
    """Value of a word problem's expression: products/quotients of two numbers joined by one + or -."""
    total, sign = 0, 1
    for term in re.split(r"([+-])", expression):
        if term in "+-":
            sign = 1 if term == "+" else -1
            continue
        numbers, ops = re.split(r"[*/]", term), re.findall(r"[*/]", term)
        value = Fraction(int(numbers[0]))
        for op, number in zip(ops, numbers[1:]):
            value = value * int(number) if op == "*" else value / int(number)
        total += sign * value
    assert total.denominator == 1 and total >= 0, expression
    return int(total)


def draw(rng: random.Random, level: int) -> Arith:
    """One arithmetic problem of the given level (1..5)."""
    if level == 4:
        t, expression, text = _word(rng)
        return Arith(f"word{t}:{expression}", expression, text, _word_value(expression), True)
    n_ops, (low, high), ops = _LEVELS[level]
    while True:  # rejection: every intermediate value must be a non-negative integer
        node = _tree(rng, n_ops, low, high, ops)
        value = _value(node)
        if value is not None and value <= _MAX_VALUE:
            expression = _show(node, {op: op for op in _PRECEDENCE})
            return Arith(expression, expression, _show(node, _SHOW), int(value), False)


def _sample(rng: random.Random, level: int, keep: Keep) -> Problem | None:
    problem = draw(rng, level)
    if not keep(problem.key):
        return None
    question = problem.text if problem.word else f"Compute {problem.text}."
    return Problem(problem.key, question, f"$\\boxed{{{problem.value}}}$",
                   fields={"difficulty": level, "expression": problem.expression})


GENERATOR = Generator(datasource="arith", family="arith", levels=5, sample=_sample)
