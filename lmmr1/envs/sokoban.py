"""Sokoban: XSB levels, a move simulator, a move-optimal BFS solver, a tile renderer and a reverse-play generator.

The Sokoban task of LMM-R1 (arXiv:2503.07536) asks a model to plan the whole move sequence from one screenshot; the
reward replays the plan here. Levels use standard XSB text: `#` wall, space (or `-`/`_`) floor, `.` goal, `$` box,
`@` player, `*` box on goal, `+` player on goal. Cells are (row, col) with (0, 0) top left; cells outside the grid
count as walls. A move into a wall, or pushing a box into a wall or another box, does nothing. LMM-R1's own Sokoban
data stores each level as a gym-sokoban grid in a `.npy` file; `level_from_grid` / `read_level_text` read those.

    level = Level.from_xsb("#####\\n#@$.#\\n#####")
    play(level, parse_plan("right")).solved   # True
    solve(level)                                # ['right']
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

Pos = tuple[int, int]

DIRECTIONS: dict[str, Pos] = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
_LETTERS = {"u": "up", "d": "down", "l": "left", "r": "right"}
_ORDER = ("up", "down", "left", "right")  # fixed expansion order keeps the solver's plan deterministic
_XSB = {  # char -> (wall, goal, box, player)
    "#": (True, False, False, False),
    " ": (False, False, False, False),
    "-": (False, False, False, False),
    "_": (False, False, False, False),
    ".": (False, True, False, False),
    "$": (False, False, True, False),
    "*": (False, True, True, False),
    "@": (False, False, False, True),
    "+": (False, True, False, True),
}


@dataclass(frozen=True)
class Level:
    """An immutable Sokoban state; `from_xsb`/`to_xsb` convert to and from XSB text."""

    walls: frozenset[Pos]
    goals: frozenset[Pos]
    boxes: frozenset[Pos]
    player: Pos
    height: int
    width: int

    @classmethod
    def from_xsb(cls, text: str) -> Level:
        """Parse XSB text; raises ValueError naming the line and column of anything that is not a level."""
        lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
        while lines and not lines[0]:
            lines.pop(0)
        while lines and not lines[-1]:
            lines.pop()
        if not lines:
            raise ValueError("empty Sokoban level: no XSB rows")
        walls, goals, boxes, players = set(), set(), set(), []
        for r, line in enumerate(lines):
            for c, ch in enumerate(line):
                if ch not in _XSB:
                    raise ValueError(f"XSB line {r + 1}, column {c + 1}: unexpected character {ch!r} "
                                     "(expected one of '#', ' ', '.', '$', '*', '@', '+')")
                wall, goal, box, player = _XSB[ch]
                if wall:
                    walls.add((r, c))
                if goal:
                    goals.add((r, c))
                if box:
                    boxes.add((r, c))
                if player:
                    players.append((r, c))
        if len(players) != 1:
            raise ValueError(f"XSB level has {len(players)} players ('@' or '+'); expected exactly 1")
        if not boxes:
            raise ValueError("XSB level has no boxes ('$' or '*')")
        if len(boxes) != len(goals):
            raise ValueError(f"XSB level has {len(boxes)} boxes but {len(goals)} goals; they must be equal")
        return cls(frozenset(walls), frozenset(goals), frozenset(boxes), players[0], len(lines),
                   max(len(line) for line in lines))

    def to_xsb(self) -> str:
        """XSB text, one line per row, trailing spaces stripped, no final newline; `from_xsb` reads it back equal."""
        rows = []
        for r in range(self.height):
            chars = []
            for c in range(self.width):
                p = (r, c)
                if p in self.walls:
                    chars.append("#")
                elif p == self.player:
                    chars.append("+" if p in self.goals else "@")
                elif p in self.boxes:
                    chars.append("*" if p in self.goals else "$")
                else:
                    chars.append("." if p in self.goals else " ")
            rows.append("".join(chars).rstrip())
        # from_xsb skips blank first/last lines and takes the width from the longest line: keep floor there as `-`
        rows[0], rows[-1] = rows[0] or "-", rows[-1] or "-"
        if max(map(len, rows)) < self.width:
            rows[0] = rows[0].ljust(self.width - 1) + "-"
        return "\n".join(rows)

    @property
    def solved(self) -> bool:
        """True iff every box is on a goal."""
        return self.boxes <= self.goals

    def is_free(self, p: Pos) -> bool:
        """Inside the grid and not a wall (boxes are not considered)."""
        return 0 <= p[0] < self.height and 0 <= p[1] < self.width and p not in self.walls


# gym-sokoban's room_state codes, the cells of the `.npy` levels LMM-R1's generator writes
# (examples/data/gen_sokoban_tasks.py saves `env.unwrapped.room_state`)
GRID_CODES = {0: "#", 1: "-", 2: ".", 3: "*", 4: "$", 5: "@"}


def level_from_grid(grid: Any) -> Level:
    """The level a gym-sokoban grid holds: a 2-D array of codes 0 wall, 1 floor, 2 target, 3 box on target, 4 box,
    5 player. The grid's size is kept (floor on its edges included); ValueError names a cell that is not a code.

    >>> level_from_grid([[0, 0, 0, 0, 0], [0, 5, 4, 2, 0], [0, 0, 0, 0, 0]]).to_xsb()
    '#####\\n#@$.#\\n#####'
    """
    import numpy as np

    array = np.asarray(grid)
    if array.ndim != 2 or not array.size:
        raise ValueError(f"a Sokoban grid is a non-empty 2-D array of cell codes, got shape {array.shape}")
    if array.dtype.kind not in "iuf":
        raise ValueError(f"a Sokoban grid holds numeric cell codes 0-5, got dtype {array.dtype}")
    lines = []
    for r, row in enumerate(array.tolist()):
        cells = [GRID_CODES.get(code) for code in row]  # 4.0 finds 4; NaN and 7 find nothing
        if None in cells:
            c = cells.index(None)
            raise ValueError(f"grid row {r + 1}, column {c + 1}: {row[c]!r} is not a cell code (0 wall, 1 floor, "
                             f"2 target, 3 box on target, 4 box, 5 player)")
        lines.append("".join(cells))  # floor as `-`: from_xsb keeps every row and column, blank edges included
    return Level.from_xsb("\n".join(lines))


def read_level_text(path: str | Path) -> str:
    """XSB text of a level file: a gym-sokoban `.npy` grid (LMM-R1's Sokoban data), or else XSB text (UTF-8).

    Raises OSError when the file cannot be read and ValueError when it holds no level.
    """
    path = Path(path)
    if path.suffix.lower() != ".npy":
        return path.read_text(encoding="utf-8")
    import numpy as np

    try:
        grid = np.load(path, allow_pickle=False)  # no pickles: loading one can run code
    except (ValueError, EOFError) as e:
        raise ValueError(f"not a .npy array ({e})") from None
    if not isinstance(grid, np.ndarray):  # an .npz archive under a .npy name
        raise ValueError("not a .npy array (an .npz archive?)")
    return level_from_grid(grid).to_xsb()


@dataclass
class PlayResult:
    """Outcome of replaying a plan: the final state and what the reward needs."""

    final: Level
    boxes_on_goals: int
    n_boxes: int
    solved: bool
    noop_moves: int  # moves that changed nothing (into a wall, or pushing a box into a wall/box)
    n_moves: int


_TOKEN_EDGES = "[](){}<>'\"`.!;:"


def parse_plan(text: str) -> list[str] | None:
    """Moves from words `up/down/left/right` (any case, spaces/commas) or a LURD string; None if not a plan.

    >>> parse_plan("Up, up LEFT")
    ['up', 'up', 'left']
    >>> parse_plan("uuL")
    ['up', 'up', 'left']
    >>> parse_plan("go up") is None
    True
    """
    tokens = [t.strip(_TOKEN_EDGES).lower() for t in re.split(r"[\s,;]+", text.strip())]
    tokens = [t for t in tokens if t]
    if not tokens:
        return None
    if all(t in DIRECTIONS for t in tokens):
        return tokens
    if all(re.fullmatch(r"[udlr]+", t) for t in tokens):
        return [_LETTERS[ch] for t in tokens for ch in t]
    return None


def _direction(move: str) -> Pos:
    name = move.strip().lower()
    name = _LETTERS.get(name, name)
    if name not in DIRECTIONS:
        raise ValueError(f"unknown Sokoban move {move!r}; expected up, down, left or right")
    return DIRECTIONS[name]


def step(level: Level, player: Pos, boxes: set[Pos], move: str) -> Pos | None:
    """One move from `player` with `boxes` (updated in place on a push): the new player cell, or None when blocked."""
    dr, dc = _direction(move)
    target = (player[0] + dr, player[1] + dc)
    if not level.is_free(target):
        return None
    if target in boxes:
        beyond = (target[0] + dr, target[1] + dc)
        if not level.is_free(beyond) or beyond in boxes:
            return None
        boxes.remove(target)
        boxes.add(beyond)
    return target


def play(level: Level, moves: Sequence[str]) -> PlayResult:
    """Replay `moves` (words, any case, or single LURD letters) from `level`; blocked moves are no-ops."""
    player, boxes, noop = level.player, set(level.boxes), 0
    for move in moves:
        moved = step(level, player, boxes, move)
        if moved is None:
            noop += 1
        else:
            player = moved
    final = Level(level.walls, level.goals, frozenset(boxes), player, level.height, level.width)
    on_goals = len(final.boxes & final.goals)
    return PlayResult(final, on_goals, len(boxes), final.solved, noop, len(moves))


def _live_cells(level: Level) -> set[Pos]:
    """Cells from which a lone box can be pushed onto some goal; a box anywhere else is a dead end.

    Found by pulling boxes backwards from every goal: a box at `c` came from `c - d` if the player could stand at
    `c - 2d` to push it.
    """
    live, stack = set(level.goals), list(level.goals)
    while stack:
        r, c = stack.pop()
        for dr, dc in DIRECTIONS.values():
            prev, stand = (r - dr, c - dc), (r - 2 * dr, c - 2 * dc)
            if prev not in live and level.is_free(prev) and level.is_free(stand):
                live.add(prev)
                stack.append(prev)
    return live


def solve(level: Level, max_states: int = 200_000) -> list[str] | None:
    """Breadth-first search over (player, boxes): a move-optimal plan, [] if solved, None if none within budget.

    States are packed into one int (box bitmask * cells + player) for fast hashing; pushes onto dead cells (see
    `_live_cells`) are pruned, which never removes a solution. Ties between equally short plans break by the fixed
    expansion order up, down, left, right, so the plan is deterministic.
    """
    if level.solved:
        return []
    h, w = level.height, level.width
    cells = h * w
    steps = []  # steps[k][i]: neighbour index of cell i in direction _ORDER[k], or -1 for a wall
    for name in _ORDER:
        dr, dc = DIRECTIONS[name]
        steps.append([(r + dr) * w + c + dc if level.is_free((r + dr, c + dc)) else -1
                      for r in range(h) for c in range(w)])
    live = _live_cells(level)
    dead = [(i // w, i % w) not in live for i in range(cells)]
    off_goal = sum(1 << i for i in range(cells) if (i // w, i % w) not in level.goals)
    start = sum(1 << (r * w + c) for r, c in level.boxes) * cells + level.player[0] * w + level.player[1]
    parent: dict[int, tuple[int, int]] = {start: (-1, -1)}
    frontier = [start]
    while frontier:
        nxt = []
        for state in frontier:
            boxes, player = divmod(state, cells)
            for k in range(4):
                target = steps[k][player]
                if target < 0:
                    continue
                bit = 1 << target
                new_boxes = boxes
                if boxes & bit:
                    beyond = steps[k][target]
                    if beyond < 0 or dead[beyond] or boxes & (1 << beyond):
                        continue
                    new_boxes = boxes ^ bit | (1 << beyond)
                key = new_boxes * cells + target
                if key in parent:
                    continue
                parent[key] = (state, k)
                if new_boxes != boxes and not new_boxes & off_goal:
                    return _backtrack(parent, key)
                nxt.append(key)
            if len(parent) > max_states:
                return None
        frontier = nxt
    return None


def _backtrack(parent: dict[int, tuple[int, int]], key: int) -> list[str]:
    moves = []
    while parent[key][0] >= 0:
        key, k = parent[key]
        moves.append(_ORDER[k])
    return moves[::-1]


_COLORS = {"outside": (24, 24, 32), "wall": (96, 96, 110), "mortar": (60, 60, 72), "floor": (214, 208, 190),
           "goal": (220, 50, 50), "box": (190, 125, 45), "box_edge": (110, 65, 20), "box_on_goal": (60, 170, 70),
           "player": (40, 90, 230)}


def _inside(level: Level) -> set[Pos]:
    """Floor cells the player can reach ignoring boxes; the rest of the floor is drawn as background."""
    seen, stack = {level.player}, [level.player]
    while stack:
        r, c = stack.pop()
        for dr, dc in DIRECTIONS.values():
            p = (r + dr, c + dc)
            if p not in seen and level.is_free(p):
                seen.add(p)
                stack.append(p)
    return seen


def render(level: Level, tile: int = 16) -> Image.Image:
    """An RGB picture of the level, `tile` pixels per cell: grey walls, red goal squares, brown boxes (green when on
    a goal), a blue round player."""
    if tile < 4:
        raise ValueError(f"tile must be >= 4 pixels, got {tile}")
    image = Image.new("RGB", (level.width * tile, level.height * tile), _COLORS["outside"])
    draw = ImageDraw.Draw(image)
    inside, m = _inside(level), max(1, tile // 8)
    for r in range(level.height):
        for c in range(level.width):
            x, y, p = c * tile, r * tile, (r, c)
            box = (x, y, x + tile - 1, y + tile - 1)
            if p in level.walls:
                draw.rectangle(box, fill=_COLORS["wall"], outline=_COLORS["mortar"])
                draw.line((x, y + tile // 2, x + tile - 1, y + tile // 2), fill=_COLORS["mortar"])
                continue
            if p not in inside:
                continue
            draw.rectangle(box, fill=_COLORS["floor"])
            if p in level.goals:
                q = tile // 3
                draw.rectangle((x + q, y + q, x + tile - 1 - q, y + tile - 1 - q), fill=_COLORS["goal"])
            if p in level.boxes:
                fill = _COLORS["box_on_goal"] if p in level.goals else _COLORS["box"]
                inner = (x + m, y + m, x + tile - 1 - m, y + tile - 1 - m)
                draw.rectangle(inner, fill=fill, outline=_COLORS["box_edge"], width=m)
                draw.line(inner, fill=_COLORS["box_edge"], width=m)
                draw.line((inner[0], inner[3], inner[2], inner[1]), fill=_COLORS["box_edge"], width=m)
            elif p == level.player:
                draw.ellipse((x + 2 * m, y + 2 * m, x + tile - 1 - 2 * m, y + tile - 1 - 2 * m),
                             fill=_COLORS["player"])
    return image


_TEMPLATES = [[(0, 0)], [(0, 0), (0, 1)], [(0, 0), (1, 0)], [(0, 0), (0, 1), (0, 2)], [(0, 0), (1, 0), (2, 0)],
              [(0, 0), (0, 1), (1, 0), (1, 1)]]


def _carve_room(rng: random.Random, height: int, width: int) -> set[Pos]:
    """Connected floor inside a wall border, dug by a random walker stamping small templates (Boxoban-style rooms)."""
    interior = (height - 2) * (width - 2)
    target = int(interior * rng.uniform(0.55, 0.75))
    pos = (rng.randrange(1, height - 1), rng.randrange(1, width - 1))
    direction = rng.choice(list(DIRECTIONS.values()))
    floor = {pos}
    while len(floor) < target:
        for dr, dc in rng.choice(_TEMPLATES):
            r, c = pos[0] + dr, pos[1] + dc
            if 1 <= r < height - 1 and 1 <= c < width - 1:
                floor.add((r, c))
        if rng.random() < 0.35:
            direction = rng.choice(list(DIRECTIONS.values()))
        r, c = pos[0] + direction[0], pos[1] + direction[1]
        if 1 <= r < height - 1 and 1 <= c < width - 1:
            pos = (r, c)
    return floor


def _reverse_play(rng: random.Random, floor: set[Pos], goals: list[Pos], player: Pos,
                  steps: int) -> tuple[list[Pos], Pos, int]:
    """Walk the player randomly from the solved state, pulling boxes; every pull is a push in reverse, so the result
    is solvable. Returns (boxes, player, total box displacement)."""
    boxes = list(goals)
    for _ in range(steps):
        dr, dc = rng.choice(list(DIRECTIONS.values()))
        target = (player[0] + dr, player[1] + dc)
        if target not in floor or target in boxes:
            continue
        behind = (player[0] - dr, player[1] - dc)
        if behind in boxes and rng.random() < 0.75:
            boxes[boxes.index(behind)] = player
        player = target
    moved = sum(abs(b[0] - g[0]) + abs(b[1] - g[1]) for b, g in zip(boxes, goals))
    return boxes, player, moved


def generate_level(rng: random.Random, height: int, width: int, n_boxes: int) -> Level:
    """A random unsolved level, solvable by construction (reverse play from a solved state; Boxoban's method).

    Of a few reverse plays the one that moved the boxes farthest is kept. Raises ValueError when the size cannot
    hold the boxes.
    """
    if height < 4 or width < 4:
        raise ValueError(f"level size {height}x{width} is too small; need at least 4x4 (walls included)")
    if n_boxes < 1 or n_boxes * 2 + 2 > (height - 2) * (width - 2):
        raise ValueError(f"cannot place {n_boxes} boxes in a {height}x{width} level")
    grid = {(r, c) for r in range(height) for c in range(width)}
    for _ in range(1000):
        floor = _carve_room(rng, height, width)
        if len(floor) < n_boxes * 2 + 2:
            continue
        cells = sorted(floor)
        goals = rng.sample(cells, n_boxes)
        start = rng.choice([p for p in cells if p not in goals])
        best = max((_reverse_play(rng, floor, goals, start, steps=len(floor) * 8) for _ in range(4)),
                   key=lambda result: result[2])
        boxes, player, moved = best
        if moved == 0 or set(boxes) == set(goals):
            continue
        return Level(frozenset(grid - floor), frozenset(goals), frozenset(boxes), player, height, width)
    raise ValueError(f"could not generate a {height}x{width} level with {n_boxes} boxes in 1000 tries")
