"""Sokoban environment: XSB parsing, plan parsing, simulation rules, solver optimality (against a slow reference
BFS built only on `play`), rendering and reverse-play generation."""

from __future__ import annotations

import random

import pytest

from lmmr1.envs.sokoban import Level, generate_level, parse_plan, play, render, solve

ALL_CHARS = """\
#######
#.  $ #
#* $+ #
#  . $#
#######"""
# Row 3 has goal '.' at (3, 3). Goals: (1,1) (2,1) (2,4) (3,3) = 4; boxes: (1,4) (2,1) (2,3) (3,5) = 4.


def test_from_xsb_reads_every_cell_kind():
    level = Level.from_xsb(ALL_CHARS)
    assert (level.height, level.width) == (5, 7)
    assert level.player == (2, 4)  # '+' is the player on a goal
    assert level.goals == {(1, 1), (2, 1), (2, 4), (3, 3)}
    assert level.boxes == {(1, 4), (2, 1), (2, 3), (3, 5)}
    assert (0, 0) in level.walls and (4, 6) in level.walls and (1, 3) not in level.walls


def test_xsb_round_trip_and_normalization():
    text = "\n\n  ####\n###  #\n#@$.#\n#####   \n\n"
    level = Level.from_xsb(text)
    assert level.to_xsb() == "  ####\n###  #\n#@$.#\n#####"
    assert Level.from_xsb(ALL_CHARS).to_xsb() == ALL_CHARS
    assert Level.from_xsb(level.to_xsb()) == level
    assert Level.from_xsb("#####\r\n#@$.#\r\n#####") == Level.from_xsb("#####\n#@$.#\n#####")
    assert Level.from_xsb("#####\n#@$.#\n#####") == Level.from_xsb("#####\n#@$.#\n#####".replace(" ", "-"))


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty"),
    ("#####\n#@$x#\n#####", "line 2, column 4: unexpected character 'x'"),
    ("######\n#@$.@#\n######", "2 players"),
    ("#####\n# $.#\n#####", "0 players"),
    ("#####\n#@ .#\n#####", "no boxes"),
    ("######\n#@$$.#\n######", "2 boxes but 1 goals"),
])
def test_from_xsb_errors_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        Level.from_xsb(text)


@pytest.mark.parametrize(("text", "plan"), [
    ("up, Down LEFT right", ["up", "down", "left", "right"]),  # words, any case, commas and spaces
    ("up,up,,left", ["up", "up", "left"]),
    ("uuLDr", ["up", "up", "left", "down", "right"]),  # LURD string, any case
    ("u d l r", ["up", "down", "left", "right"]),  # LURD letters separated
    ("[up, left].", ["up", "left"]),  # brackets and a final period around a word list
    ("  RIGHT\n", ["right"]),
    ("", None),  # nothing is not a plan
    ("go up", None),  # a non-move word
    ("up 3 left", None),
    ("upward", None),
    ("ulx", None),  # not all LURD letters
])
def test_parse_plan(text, plan):
    assert parse_plan(text) == plan


CORRIDOR = """\
#######
#@ $ .#
#######"""


def test_play_pushes_and_solves():
    level = Level.from_xsb(CORRIDOR)
    result = play(level, ["right", "right", "right"])  # walk to the box, push it twice onto the goal at (1, 5)
    assert result.solved and result.final.solved
    assert result.final.boxes == {(1, 5)} and result.final.player == (1, 4)
    assert (result.boxes_on_goals, result.n_boxes, result.noop_moves, result.n_moves) == (1, 1, 0, 3)


def test_play_counts_noops_into_walls_and_blocked_pushes():
    level = Level.from_xsb(CORRIDOR)
    # up: wall; left: wall; right x4: the 4th would push the box (now on the goal) into the east wall
    result = play(level, ["up", "left", "right", "right", "right", "right"])
    assert result.noop_moves == 3 and result.n_moves == 6
    assert result.final.player == (1, 4) and result.solved
    two_boxes = Level.from_xsb("########\n#@$$ ..#\n########")
    blocked = play(two_boxes, ["right"])  # pushing a box into another box does nothing
    assert blocked.noop_moves == 1 and blocked.final == two_boxes
    assert blocked.boxes_on_goals == 0 and not blocked.solved


def test_play_accepts_letters_and_rejects_unknown_moves():
    level = Level.from_xsb(CORRIDOR)
    assert play(level, ["R", "r", "Right"]).solved
    with pytest.raises(ValueError, match="unknown Sokoban move 'jump'"):
        play(level, ["right", "jump"])


def _reference_distance(level: Level, limit: int = 200_000) -> int | None:
    """Slow, obviously-correct BFS over whole Level states using only `play` (no pruning, no bit tricks)."""
    frontier, seen, depth = [level], {level}, 0
    while frontier and len(seen) < limit:
        if any(state.solved for state in frontier):
            return depth
        nxt = []
        for state in frontier:
            for move in ("up", "down", "left", "right"):
                after = play(state, [move]).final
                if after not in seen:
                    seen.add(after)
                    nxt.append(after)
        frontier, depth = nxt, depth + 1
    return None


@pytest.mark.parametrize("seed", range(6))
def test_solve_is_move_optimal_against_reference_bfs(seed):
    rng = random.Random(seed)
    level = generate_level(rng, 6 + seed % 2, 6 + seed % 3, 1 + seed % 2)
    plan = solve(level)
    assert plan is not None and play(level, plan).solved
    assert len(plan) == _reference_distance(level)


def test_solve_edge_cases():
    assert solve(Level.from_xsb("####\n#@*#\n####")) == []  # already solved
    corner = Level.from_xsb("#####\n#$ .#\n#@  #\n#####")  # box in a corner can never move
    assert solve(corner) is None
    assert solve(Level.from_xsb(CORRIDOR)) == ["right", "right", "right"]
    hard = generate_level(random.Random(7), 10, 10, 3)
    assert solve(hard, max_states=10) is None  # the budget is honoured


def test_solve_10x10_three_boxes_within_a_state_budget():
    """Dead-cell pruning keeps 10x10 three-box levels small: each is solved within 40,000 stored states (today's
    solver needs 227 to 31,316 on these five), counted by the solver's own budget, not the wall clock."""
    rng = random.Random(123)
    for _ in range(5):
        level = generate_level(rng, 10, 10, 3)
        plan = solve(level, max_states=40_000)
        assert plan is not None and play(level, plan).solved


@pytest.mark.parametrize(("height", "width", "boxes"), [(6, 6, 1), (8, 7, 2), (10, 10, 3)])
def test_generate_level_is_valid_deterministic_and_solvable(height, width, boxes):
    level = generate_level(random.Random(42), height, width, boxes)
    assert level == generate_level(random.Random(42), height, width, boxes)
    assert (level.height, level.width) == (height, width)
    assert len(level.boxes) == len(level.goals) == boxes and not level.solved
    border = {(r, c) for r in range(height) for c in range(width) if r in (0, height - 1) or c in (0, width - 1)}
    assert border <= level.walls
    assert level.player not in level.walls | level.boxes
    assert Level.from_xsb(level.to_xsb()) == level
    plan = solve(level)
    assert plan and play(level, plan).solved


def test_generate_level_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="too small"):
        generate_level(random.Random(0), 3, 8, 1)
    with pytest.raises(ValueError, match="cannot place 5 boxes"):
        generate_level(random.Random(0), 5, 5, 5)


def test_render_draws_each_cell_where_it_is():
    level = Level.from_xsb("#######\n#@$ *.#\n#######")
    tile = 20
    image = render(level, tile=tile)
    assert image.size == (7 * tile, 3 * tile) and image.mode == "RGB"

    def center(r: int, c: int) -> tuple[int, int, int]:  # a little above the middle: off a box's diagonal cross
        return image.getpixel((c * tile + tile // 2, r * tile + tile // 3 + 1))

    def dominant(rgb: tuple[int, int, int]) -> str:
        return "rgb"[max(range(3), key=lambda i: rgb[i])]

    assert dominant(center(1, 1)) == "b"  # the player is blue
    assert dominant(center(1, 4)) == "g"  # a box on a goal is green
    assert dominant(center(1, 5)) == "r"  # an empty goal is red
    box, floor, wall = center(1, 2), center(1, 3), center(0, 0)
    assert len({box, floor, wall}) == 3 and box[0] > box[2]  # a brown box, distinct from floor and wall
    with pytest.raises(ValueError, match="tile"):
        render(level, tile=2)
