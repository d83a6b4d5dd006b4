"""Fuzzing the Sokoban plan parser, the XSB parser, the simulator and the Sokoban reward (hypothesis).

Properties: any text parses to a plan (a non-empty list of up/down/left/right) or None, and every way of writing a
plan that DESIGN.md allows (words in any case separated by spaces/commas, LURD strings) parses back to it; any text
is a Level or a ValueError, a Level reads back equal from its own XSB, and a random grid reads back cell for cell;
each move of `play` either moves the player one cell (pushing at most one box) or changes nothing and is counted as a
no-op; the reward's components stay in their documented ranges and the total is their documented sum.
"""

from __future__ import annotations

import math

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lmmr1.envs.sokoban import DIRECTIONS, Level, parse_plan, play, solve
from lmmr1.rewards import SokobanReward, build_reward

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MOVES = list(DIRECTIONS)
XSB_CHARS = list("#  .$*@+-_")


# ---- plan parser -----------------------------------------------------------------------------------------------------
@settings(FUZZ, max_examples=300)
@given(st.text(max_size=40) | st.lists(st.sampled_from([*MOVES, "U", "d", "lr", "UP", ",", " ", ";", "\n", "[", "]",
                                                        ".", "go", "3", "upward"]), max_size=12).map("".join))
def test_parse_plan_never_raises(text):
    plan = parse_plan(text)
    assert plan is None or (plan and all(move in DIRECTIONS for move in plan))


@st.composite
def written_plans(draw: st.DrawFn) -> tuple[list[str], str]:
    """(moves, one way of writing them that DESIGN.md allows)."""
    moves = draw(st.lists(st.sampled_from(MOVES), min_size=1, max_size=20))
    cased = [draw(st.sampled_from([m, m.upper(), m.capitalize()])) for m in moves]
    if draw(st.booleans()):  # words separated by spaces and/or commas, maybe in brackets with a final period
        text = ""
        for i, word in enumerate(cased):
            text += word if i == len(cased) - 1 else word + draw(st.sampled_from([" ", ",", ", ", " ,", "\n", ",,"]))
        if draw(st.booleans()):
            text = f"[{text}]."
    else:  # a LURD string, any case, maybe cut into chunks
        letters = [draw(st.sampled_from([m[0], m[0].upper()])) for m in moves]
        cuts = sorted(draw(st.sets(st.integers(1, len(letters) - 1), max_size=3))) if len(letters) > 1 else []
        chunks = ["".join(letters[a:b]) for a, b in zip([0, *cuts], [*cuts, len(letters)], strict=True)]
        text = draw(st.sampled_from([" ", ", ", ","])).join(chunks)
    return moves, draw(st.sampled_from(["", " ", "\n"])) + text + draw(st.sampled_from(["", " ", "\n"]))


@settings(FUZZ, max_examples=200)
@given(written_plans())
def test_parse_plan_reads_every_documented_notation(case):
    moves, text = case
    assert parse_plan(text) == moves


# ---- XSB parser ------------------------------------------------------------------------------------------------------
def _check_level(level: Level) -> None:
    cells = {(r, c) for r in range(level.height) for c in range(level.width)}
    assert level.walls | level.goals | level.boxes | {level.player} <= cells
    assert not (level.walls & (level.goals | level.boxes | {level.player}))
    assert level.player not in level.boxes
    assert len(level.boxes) == len(level.goals) >= 1
    assert Level.from_xsb(level.to_xsb()) == level  # the XSB it writes reads back as the same level


@settings(FUZZ, max_examples=300)
@given(st.text(alphabet=st.sampled_from([*XSB_CHARS, "\n", "\r", "\t", "x", "é", "\x00"]), max_size=60)
       | st.text(max_size=30))
@example("---\n#@$.#")  # a floor row on top was dropped by to_xsb/from_xsb: the round trip moved the level
@example("#@$.-")  # a floor column on the right was dropped the same way
def test_from_xsb_gives_a_level_or_a_value_error(text):
    try:
        level = Level.from_xsb(text)
    except ValueError as e:
        assert str(e)
        return
    _check_level(level)


@st.composite
def grids(draw: st.DrawFn) -> tuple[str, frozenset, frozenset, frozenset, tuple[int, int]]:
    """(XSB text of a random valid grid, walls, goals, boxes, player) in the text's coordinates."""
    h, w = draw(st.integers(1, 6)), draw(st.integers(2, 7))
    cells = [(r, c) for r in range(h) for c in range(w)]
    player = draw(st.sampled_from(cells))
    n = draw(st.integers(1, min(3, len(cells) - 1)))
    boxes = draw(st.lists(st.sampled_from([p for p in cells if p != player]), min_size=n, max_size=n, unique=True))
    goals = draw(st.lists(st.sampled_from(cells), min_size=n, max_size=n, unique=True))
    occupied = {player, *boxes, *goals}
    free = [p for p in cells if p not in occupied]
    walls = draw(st.sets(st.sampled_from(free))) if free else set()
    floor = draw(st.sampled_from([" ", "-", "_"]))
    rows = []
    for r in range(h):
        row = ""
        for c in range(w):
            p = (r, c)
            row += ("#" if p in walls else ("+" if p in goals else "@") if p == player
                    else ("*" if p in goals else "$") if p in boxes else "." if p in goals else floor)
        rows.append(row + draw(st.sampled_from(["", " ", "  "])))
    return (draw(st.sampled_from(["\n", "\r\n"])).join(rows), frozenset(walls), frozenset(goals), frozenset(boxes),
            player)


@settings(FUZZ, max_examples=200)
@given(grids())
def test_from_xsb_reads_a_random_grid_cell_for_cell(grid):
    text, walls, goals, boxes, player = grid
    lines = text.replace("\r\n", "\n").split("\n")
    top = next(i for i, line in enumerate(lines) if line.strip())  # blank leading lines are skipped
    shift = lambda cells: frozenset((r - top, c) for r, c in cells)  # noqa: E731
    level = Level.from_xsb(text)
    assert (level.walls, level.goals, level.boxes) == (shift(walls), shift(goals), shift(boxes))
    assert level.player == (player[0] - top, player[1])
    _check_level(level)


# ---- simulator and solver --------------------------------------------------------------------------------------------
@settings(FUZZ, max_examples=100)
@given(grids(), st.lists(st.sampled_from([*MOVES, "U", "d", "L", "r", " Up "]), max_size=25))
def test_each_move_moves_one_cell_or_is_a_counted_noop(grid, moves):
    level = Level.from_xsb(grid[0])
    before = play(level, [])
    for k in range(1, len(moves) + 1):
        after = play(level, moves[:k])
        dr, dc = DIRECTIONS[{"u": "up", "d": "down", "l": "left", "r": "right"}.get(moves[k - 1].strip().lower(),
                                                                                    moves[k - 1].strip().lower())]
        old, new = before.final, after.final
        target = (old.player[0] + dr, old.player[1] + dc)
        if after.noop_moves == before.noop_moves + 1:  # nothing changed, and something blocked the move
            assert (new.player, new.boxes) == (old.player, old.boxes)
            beyond = (target[0] + dr, target[1] + dc)
            assert not level.is_free(target) or (target in old.boxes
                                                 and (not level.is_free(beyond) or beyond in old.boxes))
        else:
            assert after.noop_moves == before.noop_moves and new.player == target and level.is_free(target)
            pushed = {target} if target in old.boxes else set()
            assert new.boxes == (old.boxes - pushed) | {(target[0] + dr, target[1] + dc) for _ in pushed}
        assert after.n_moves == k and after.solved == (new.boxes <= level.goals)
        assert after.boxes_on_goals == len(new.boxes & level.goals) and after.n_boxes == len(level.boxes)
        before = after


@settings(FUZZ, max_examples=100)
@given(grids())
def test_solver_plans_solve_the_level(grid):
    level = Level.from_xsb(grid[0])
    plan = solve(level, max_states=300)
    assert plan is None or (play(level, plan).solved and (plan == []) == level.solved)


# ---- reward ----------------------------------------------------------------------------------------------------------
weights = st.floats(0, 5, allow_subnormal=False)


@settings(FUZZ, max_examples=100)
@given(grids(), st.lists(written_plans().map(lambda c: c[1]) | st.text(max_size=10), min_size=1, max_size=4),
       st.sampled_from(["<think>p</think><answer>{}</answer>", "<answer>{}</answer>", "{}", "<answer>{}"]),
       weights, weights, weights)
def test_sokoban_reward_components_in_range_and_total_as_documented(grid, answers, template, boxes_weight,
                                                                     move_cost, noop_penalty):
    reward = SokobanReward(boxes_weight=boxes_weight, move_cost=move_cost, noop_penalty=noop_penalty)
    responses = [template.replace("{}", a) for a in answers]
    rows = [{"env": grid[0]}] * len(responses)
    out = reward(responses, rows)
    parts = {k: out.components.get(k, [0.0] * len(responses)) for k in ("solved", "boxes_on_goals", "moves",
                                                                        "noop_moves")}
    assert set(out.components) == {"solved"} | {k for k, w in (("boxes_on_goals", boxes_weight),
                                                               ("moves", move_cost), ("noop_moves", noop_penalty)) if w}
    for i in range(len(responses)):
        s, b, m, n = (parts[k][i] for k in ("solved", "boxes_on_goals", "moves", "noop_moves"))
        assert s in (0.0, 1.0) and 0.0 <= b <= 1.0 and m == int(m) >= 0 and 0 <= n <= m
        assert math.isclose(out.total[i], s + boxes_weight * b - move_cost * m - noop_penalty * n, abs_tol=1e-9)
        assert out.total[i] <= 1 + boxes_weight + 1e-9
    assert out.stats["sokoban/answer_missing"] + out.stats["sokoban/plan_parse_failures"] <= len(responses)
    preset = build_reward("sokoban")(responses, rows)  # 0.5 * format + 1.0 * solved
    assert all(0.0 <= t <= 1.5 for t in preset.total)
