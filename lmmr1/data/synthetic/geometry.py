"""Geometry problems drawn with PIL, with exact answers from sympy (the MGT stage's figure-reading tasks).

Figures carry their numbers as labels in the image; the question names what is asked. Shapes by level:
1 rectangles (area/perimeter), triangles with two labeled angles (the third), right triangles with integer sides;
2 right triangles (hypotenuse as a surd), circles given the radius (area/circumference in terms of π), cylinders
(volume); 3 cones (slant height/volume), cylinders, circles given the diameter. A row's `figure` field holds the
shape, what is asked and the labeled values, so answers can be recomputed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import sympy
from PIL import Image, ImageDraw

from lmmr1.data.synthetic.problem import Generator, Keep, Problem
from lmmr1.data.synthetic.render import dashed_line, label

SIZE = 224
_INK = (0, 0, 0)
Point = tuple[float, float]
Figure = tuple[dict, str, sympy.Expr, Image.Image]  # (parameters, question, exact answer, picture)
_TRIPLES = [(3, 4), (5, 12), (8, 15), (7, 24), (20, 21), (6, 8), (9, 12), (12, 16), (15, 20), (10, 24)]


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    return image, ImageDraw.Draw(image)


def _fit(points: list[Point], margin: float = 38) -> list[Point]:
    """Scale and center math coordinates (y up) into the image (y down), keeping proportions."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    span = max(max(xs) - min(xs), max(ys) - min(ys), 1e-9)
    scale = (SIZE - 2 * margin) / span
    dx = (SIZE - (max(xs) - min(xs)) * scale) / 2
    dy = (SIZE - (max(ys) - min(ys)) * scale) / 2
    return [(dx + (x - min(xs)) * scale, SIZE - dy - (y - min(ys)) * scale) for x, y in points]


def _away(point: Point, center: Point, distance: float) -> Point:
    """`point` moved `distance` pixels away from `center`."""
    vx, vy = point[0] - center[0], point[1] - center[1]
    norm = math.hypot(vx, vy) or 1.0
    return point[0] + vx / norm * distance, point[1] + vy / norm * distance


def _mid(a: Point, b: Point) -> Point:
    return (a[0] + b[0]) / 2, (a[1] + b[1]) / 2


def _clamp_ratio(x: float, y: float, limit: float = 2.5) -> tuple[float, float]:
    """Drawing proportions: very thin figures are widened (the labels, not the pixels, carry the numbers)."""
    return max(x, y / limit), max(y, x / limit)


def right_triangle(rng: random.Random, level: int) -> Figure:
    if level == 1:
        a, b = rng.choice(_TRIPLES)
        a, b = (a, b) if rng.random() < 0.5 else (b, a)
    else:
        a, b = rng.randint(1, 15), rng.randint(1, 15)
    image, draw = _canvas()
    wa, wb = _clamp_ratio(a, b)
    c, bb, aa = _fit([(0, 0), (wb, 0), (0, wa)])
    draw.polygon([c, bb, aa], outline=_INK, width=2)
    draw.line((c[0] + 12, c[1], c[0] + 12, c[1] - 12, c[0], c[1] - 12), fill=_INK, width=1)  # right-angle mark
    centroid = ((c[0] + bb[0] + aa[0]) / 3, (c[1] + bb[1] + aa[1]) / 3)
    label(draw, (c[0] - 16, (c[1] + aa[1]) / 2), str(a))
    label(draw, ((c[0] + bb[0]) / 2, c[1] + 14), str(b))
    label(draw, _away(_mid(aa, bb), centroid, 16), "?")
    question = ("The figure shows a right triangle with the lengths of its two legs labeled. What is the length of "
                "the hypotenuse (marked ?)? Give the exact value.")
    return {"shape": "right_triangle", "ask": "hypotenuse", "leg_a": a, "leg_b": b}, question, \
        sympy.sqrt(a**2 + b**2), image


def rectangle(rng: random.Random, level: int) -> Figure:
    w, h = rng.randint(2, 20), rng.randint(2, 20)
    ask = rng.choice(["area", "perimeter"])
    image, draw = _canvas()
    dw, dh = _clamp_ratio(w, h)
    p0, p1, p2, p3 = _fit([(0, 0), (dw, 0), (dw, dh), (0, dh)])
    draw.polygon([p0, p1, p2, p3], outline=_INK, width=2)
    label(draw, ((p0[0] + p1[0]) / 2, p0[1] + 14), str(w))
    label(draw, (p1[0] + 16, (p1[1] + p2[1]) / 2), str(h))
    question = f"The figure shows a rectangle with its side lengths labeled. What is its {ask}?"
    answer = sympy.Integer(w * h) if ask == "area" else sympy.Integer(2 * (w + h))
    return {"shape": "rectangle", "ask": ask, "width": w, "height": h}, question, answer, image


def triangle_angles(rng: random.Random, level: int) -> Figure:
    while True:
        a, b = (rng.randrange(20, 105, 5), rng.randrange(20, 105, 5)) if level == 1 else \
            (rng.randint(15, 110), rng.randint(15, 110))
        if a + b <= 160:
            break
    ra, rb = math.radians(a), math.radians(b)
    side = math.sin(rb) / math.sin(ra + rb)  # law of sines, base of length 1
    p, q, r = _fit([(0, 0), (1, 0), (side * math.cos(ra), side * math.sin(ra))])
    image, draw = _canvas()
    draw.polygon([p, q, r], outline=_INK, width=2)
    centroid = ((p[0] + q[0] + r[0]) / 3, (p[1] + q[1] + r[1]) / 3)
    for vertex, text in ((p, f"{a}°"), (q, f"{b}°"), (r, "?")):
        label(draw, _away(vertex, centroid, -26), text)
    question = ("The figure shows a triangle with two of its angles labeled in degrees. What is the measure of the "
                "third angle (marked ?), in degrees?")
    return {"shape": "triangle", "ask": "third_angle", "angle_a": a, "angle_b": b}, question, \
        sympy.Integer(180 - a - b), image


def circle(rng: random.Random, level: int) -> Figure:
    given = "diameter" if level >= 3 else "radius"
    value = rng.randint(1, 15) if given == "radius" else rng.randint(2, 25)
    ask = rng.choice(["area", "circumference"])
    radius = sympy.Integer(value) if given == "radius" else sympy.Rational(value, 2)
    image, draw = _canvas()
    c, big = (SIZE / 2, SIZE / 2), 78
    draw.ellipse((c[0] - big, c[1] - big, c[0] + big, c[1] + big), outline=_INK, width=2)
    draw.ellipse((c[0] - 2, c[1] - 2, c[0] + 2, c[1] + 2), fill=_INK)
    start = (c[0] - big, c[1]) if given == "diameter" else c
    draw.line((start, (c[0] + big, c[1])), fill=_INK, width=2)
    label(draw, ((start[0] + c[0] + big) / 2, c[1] - 12), str(value))
    question = (f"The figure shows a circle with its {given} labeled. What is its {ask}? Give the exact value in "
                "terms of π.")
    answer = sympy.pi * radius**2 if ask == "area" else 2 * sympy.pi * radius
    return {"shape": "circle", "ask": ask, given: value}, question, answer, image


def _solid(r: int, h: int) -> tuple[float, float, float]:
    """Pixel (radius, ellipse half-height, height) of a cone/cylinder drawing."""
    dr, dh = _clamp_ratio(r, h, limit=2.0)
    scale = min(62 / dr, 130 / dh)
    return dr * scale, dr * scale * 0.3, dh * scale


def cylinder(rng: random.Random, level: int) -> Figure:
    r, h = rng.randint(1, 10), rng.randint(1, 20)
    rx, ry, height = _solid(r, h)
    image, draw = _canvas()
    cx, top = SIZE / 2, (SIZE - height) / 2
    bottom = top + height
    draw.ellipse((cx - rx, top - ry, cx + rx, top + ry), outline=_INK, width=2)
    draw.arc((cx - rx, bottom - ry, cx + rx, bottom + ry), 0, 180, fill=_INK, width=2)
    draw.line((cx - rx, top, cx - rx, bottom), fill=_INK, width=2)
    draw.line((cx + rx, top, cx + rx, bottom), fill=_INK, width=2)
    dashed_line(draw, (cx, top), (cx + rx, top))
    label(draw, (cx + rx / 2, top - 9), f"r = {r}", size=13, boxed=True)
    label(draw, (cx + rx + 6, (top + bottom) / 2), f"h = {h}", size=13, anchor="lm")
    question = ("The figure shows a cylinder with its radius r and height h labeled. What is its volume? Give the "
                "exact value in terms of π.")
    return {"shape": "cylinder", "ask": "volume", "radius": r, "height": h}, question, sympy.pi * r**2 * h, image


def cone(rng: random.Random, level: int) -> Figure:
    r, h = rng.randint(1, 12), rng.randint(1, 16)
    ask = rng.choice(["slant_height", "volume"])
    rx, ry, height = _solid(r, h)
    image, draw = _canvas()
    cx, base = SIZE / 2, (SIZE + height) / 2
    apex = (cx, base - height)
    draw.ellipse((cx - rx, base - ry, cx + rx, base + ry), outline=_INK, width=2)
    draw.line((apex, (cx - rx, base)), fill=_INK, width=2)
    draw.line((apex, (cx + rx, base)), fill=_INK, width=2)
    dashed_line(draw, apex, (cx, base))
    dashed_line(draw, (cx, base), (cx + rx, base))
    label(draw, (cx + rx / 2, base + ry + 10), f"r = {r}", size=13)
    label(draw, (cx, base - height * 0.4), f"h = {h}", size=13, boxed=True)
    if ask == "slant_height":
        label(draw, _away(_mid(apex, (cx + rx, base)), (cx, base), 18), "?")
        question = ("The figure shows a right circular cone with its base radius r and height h labeled. What is "
                    "its slant height (marked ?)? Give the exact value.")
        answer = sympy.sqrt(r**2 + h**2)
    else:
        question = ("The figure shows a right circular cone with its base radius r and height h labeled. What is "
                    "its volume? Give the exact value in terms of π.")
        answer = sympy.pi * r**2 * h / 3
    return {"shape": "cone", "ask": ask, "radius": r, "height": h}, question, answer, image


SHAPES: dict[int, list[Callable[[random.Random, int], Figure]]] = {
    1: [rectangle, triangle_angles, right_triangle],
    2: [right_triangle, circle, cylinder],
    3: [cone, cylinder, circle],
}


def _sample(rng: random.Random, level: int, keep: Keep) -> Problem | None:
    figure, question, answer, image = rng.choice(SHAPES[level])(rng, level)
    key = "|".join(f"{k}={figure[k]}" for k in sorted(figure))
    if not keep(key):
        return None
    return Problem(key, question, f"$\\boxed{{{sympy.latex(answer)}}}$", image=image,
                   fields={"difficulty": level, "figure": figure})


GENERATOR = Generator(datasource="geometry", family="geometry", levels=3, sample=_sample)
