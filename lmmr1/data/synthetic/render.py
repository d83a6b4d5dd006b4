"""Drawing helpers for synthetic images: PIL's built-in font, centered labels, wrapped text cards, dashed lines.

Only PIL's embedded default font is used (`ImageFont.load_default(size=...)`, Pillow >= 10.1), so rendering works
offline and gives the same pixels on every machine with the same Pillow. That font lacks a few math glyphs, which
`printable` replaces with ASCII.
"""

from __future__ import annotations

import functools
import math
import random

from PIL import Image, ImageDraw, ImageFont

_ASCII = {"×": "*", "÷": "/", "π": "pi", "−": "-", "²": "^2", "√": "sqrt"}  # glyphs the default font lacks


@functools.lru_cache(maxsize=16)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """PIL's embedded font at `size` pixels."""
    return ImageFont.load_default(size=size)


def printable(text: str) -> str:
    """`text` with characters the default font cannot draw replaced by ASCII."""
    return "".join(_ASCII.get(ch, ch) for ch in text)


def label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int = 15,
          fill: tuple[int, int, int] = (20, 40, 160), anchor: str = "mm", boxed: bool = False) -> None:
    """Draw `text` at `xy` (centered by default; PIL anchors); `boxed` clears a white box behind it first."""
    if boxed:
        left, top, right, bottom = draw.textbbox(xy, printable(text), font=font(size), anchor=anchor)
        draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=(255, 255, 255))
    draw.text(xy, printable(text), font=font(size), fill=fill, anchor=anchor)


def dashed_line(draw: ImageDraw.ImageDraw, start: tuple[float, float], end: tuple[float, float],
                fill: tuple[int, int, int] = (0, 0, 0), width: int = 1, dash: float = 5.0) -> None:
    """A dashed straight line (PIL has none)."""
    length = math.dist(start, end)
    n = max(1, int(length // (2 * dash)))
    for i in range(n):
        t0, t1 = (2 * i) * dash / length, min(1.0, (2 * i + 1) * dash / length)
        draw.line((start[0] + (end[0] - start[0]) * t0, start[1] + (end[1] - start[1]) * t0,
                   start[0] + (end[0] - start[0]) * t1, start[1] + (end[1] - start[1]) * t1), fill=fill, width=width)


def wrap(text: str, size: int, max_width: float) -> list[str]:
    """Greedy word wrap to `max_width` pixels; paragraphs (newlines) are kept."""
    lines = []
    for paragraph in printable(text).split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}".strip()
            if line and font(size).getlength(candidate) > max_width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def text_card(text: str, rng: random.Random, width: int = 224, size: int = 16) -> Image.Image:
    """`text` wrapped onto a light card `width` pixels wide; height grows with the text, a multiple of 28 pixels
    (the Qwen2-VL patch grid), at least 112. Background, ink and offset vary with `rng` so the images differ."""
    margin = 12
    lines = wrap(text, size, width - 2 * margin)
    line_height = size + 6
    height = max(112, math.ceil((len(lines) * line_height + 2 * margin) / 28) * 28)
    background = tuple(rng.randint(225, 255) for _ in range(3))
    ink = tuple(rng.randint(0, 70) for _ in range(3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    top = (height - len(lines) * line_height) / 2 + rng.randint(-3, 3)
    for i, line in enumerate(lines):
        draw.text((margin + rng.randint(0, 3), top + i * line_height), line, font=font(size), fill=ink)
    return image
