"""Perception tasks for vision alignment: read the number in an image, or name the shape in it.

The answers are plain text ("347", "triangle"), the targets of the SFT stage that teaches a fresh vision tower to talk
to a frozen language model. Numbers: level = digit count (1-3). Shapes: level 1 outlines, level 2 filled shapes.
A key is the content plus a rendering style (size, position, colours), so the same number appears in several
pictures and held-out splits hold pictures that training never saw.
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

from lmmr1.data.synthetic.problem import Generator, Keep, Problem
from lmmr1.data.synthetic.render import font

NUMBER_SIZE = (168, 28)  # 12 x 2 patches of 14 px -> one row of 6 image tokens after Qwen2-VL's 2 x 2 merge
CELL = 28  # pixels per image token
SHAPE_SIZE = 56  # 2 x 2 image tokens
SHAPES = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6, "circle": 0}
_STYLES = 10_000


def _colours(rng: random.Random) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A light background and a dark ink."""
    return tuple(rng.randint(200, 255) for _ in range(3)), tuple(rng.randint(0, 90) for _ in range(3))


def number_image(value: int, style: int) -> Image.Image:
    """`value` drawn with PIL's embedded font in the style numbered `style` (size, colours, position) on a row of
    28-px cells, a digit in every other cell: each digit falls in its own image token with an empty one after it,
    which a small tower trained on a CPU can learn in minutes."""
    rng = random.Random(f"number-style:{style}")
    background, ink = _colours(rng)
    image = Image.new("RGB", NUMBER_SIZE, background)
    draw = ImageDraw.Draw(image)
    size = rng.randint(18, 24)
    digits = str(value)
    cells = NUMBER_SIZE[0] // CELL
    first = rng.randint(0, cells - (2 * len(digits) - 1))
    dx, dy = rng.uniform(-2, 2), rng.uniform(-2, 2)
    for k, digit in enumerate(digits):
        draw.text(((first + 2 * k + 0.5) * CELL + dx, NUMBER_SIZE[1] / 2 + dy), digit, font=font(size), fill=ink,
                  anchor="mm")
    return image


def shape_image(shape: str, filled: bool, style: int) -> Image.Image:
    """A regular polygon (or circle) named `shape`, outlined or filled, in the style numbered `style`."""
    rng = random.Random(f"shape-style:{style}")
    background, ink = _colours(rng)
    image = Image.new("RGB", (SHAPE_SIZE, SHAPE_SIZE), background)
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(16, 24)
    cx, cy = (SHAPE_SIZE / 2 + rng.uniform(-3, 3) for _ in range(2))
    sides = SHAPES[shape]
    if sides == 0:
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        draw.ellipse(box, fill=ink if filled else None, outline=ink, width=3)
    else:
        turn = rng.uniform(-0.15, 0.15) + (math.pi / 4 if sides == 4 else -math.pi / 2)
        points = [(cx + radius * math.cos(turn + 2 * math.pi * k / sides),
                   cy + radius * math.sin(turn + 2 * math.pi * k / sides)) for k in range(sides)]
        draw.polygon(points, fill=ink if filled else None, outline=ink, width=3)
    return image


def _number(rng: random.Random, level: int, keep: Keep) -> Problem | None:
    value = rng.randint(0 if level == 1 else 10 ** (level - 1), 10**level - 1)
    style = rng.randrange(_STYLES)
    key = f"{value}/{style}"
    if not keep(key):
        return None
    return Problem(key, "What number is shown in the image?", str(value), image=number_image(value, style),
                   fields={"difficulty": level, "digits": level})


def _shape(rng: random.Random, level: int, keep: Keep) -> Problem | None:
    shape, style = rng.choice(sorted(SHAPES)), rng.randrange(_STYLES)
    key = f"{shape}/{level}/{style}"
    if not keep(key):
        return None
    return Problem(key, "What shape is shown in the image?", shape, image=shape_image(shape, level == 2, style),
                   fields={"difficulty": level, "shape": shape})


NUMBERS = Generator(datasource="read_number", family="read_number", levels=3, sample=_number)
SHAPES_GENERATOR = Generator(datasource="name_shape", family="name_shape", levels=2, sample=_shape)
