"""Sokoban reward: solver plans solve, truncated / wall-bumping / box-cornering plans do not, shaped terms add up."""

from __future__ import annotations

import random

import pytest

from lmmr1.envs.sokoban import Level, generate_level, solve
from lmmr1.rewards import SokobanReward, build_reward

LURD = {"left": "L", "up": "U", "right": "R", "down": "D"}
CORRIDOR = "#####\n#@$.#\n#####"  # one push right solves it
ROOM = "######\n#    #\n# @$ #\n#   .#\n######"  # box at (2,3), goal at (3,4)


def A(plan: str) -> str:  # noqa: N802
    return f"<think>plan</think><answer>{plan}</answer>"


@pytest.fixture(scope="module")
def levels_and_plans():
    rng = random.Random(0)
    out = []
    while len(out) < 12:
        level = generate_level(rng, 7, 7, 1 + len(out) % 2)
        plan = solve(level)
        if plan:  # a generated level may start solved (empty plan); skip those
            out.append((level, plan))
    return out


def test_solver_plans_score_solved_in_every_plan_notation(levels_and_plans):
    reward = SokobanReward()
    responses, rows = [], []
    for level, plan in levels_and_plans:
        for text in (" ".join(plan), ", ".join(p.upper() for p in plan), "".join(LURD[p] for p in plan)):
            responses.append(A(text))
            rows.append({"env": level.to_xsb()})
    out = reward(responses, rows)
    assert out.components["solved"] == [1.0] * len(responses)
    assert out.total == [1.0] * len(responses)


def test_truncated_plans_fail(levels_and_plans):
    # BFS plans are move-optimal, so no proper prefix can solve the level
    reward = SokobanReward()
    out = reward([A(" ".join(plan[:-1])) for _, plan in levels_and_plans if len(plan) > 1],
                 [{"env": level.to_xsb()} for level, plan in levels_and_plans if len(plan) > 1])
    assert out.components["solved"] == [0.0] * len(out.total)


def test_wall_bumping_plan_fails_and_counts_noops():
    reward = SokobanReward(noop_penalty=0.1)
    out = reward([A("up up left up")], [{"env": CORRIDOR}])  # every move hits a wall
    assert out.components["solved"] == [0.0]
    assert out.components["noop_moves"] == [4.0]
    assert out.total == [pytest.approx(-0.4)]


def test_box_cornering_plan_fails():
    # D R U pushes the box up to the top wall, L U R pushes it into the top-right corner: dead, whatever follows
    cornering = "D R U L U R D D L"
    out = SokobanReward()([A(cornering)], [{"env": ROOM}])
    assert out.components["solved"] == [0.0]
    from lmmr1.envs.sokoban import play
    final = play(Level.from_xsb(ROOM), cornering.split()).final
    assert final.boxes == {(1, 4)}  # independently: the box sits in the corner, so no plan can finish the level
    assert solve(final) is None


def test_shaped_terms_follow_their_weights():
    reward = SokobanReward(boxes_weight=0.5, move_cost=0.01, noop_penalty=0.1)
    # "L R": L bumps the wall (1 no-op), R pushes the box onto the goal -> solved, 1/1 boxes, 2 moves
    out = reward([A("L R"), A("L")], [{"env": CORRIDOR}, {"env": CORRIDOR}])
    assert out.components == {"solved": [1.0, 0.0], "boxes_on_goals": [1.0, 0.0], "moves": [2.0, 1.0],
                              "noop_moves": [1.0, 1.0]}
    assert out.total == pytest.approx([1 + 0.5 - 0.02 - 0.1, 0 + 0 - 0.01 - 0.1])


def test_missing_answer_and_non_plan_are_counted():
    out = SokobanReward()(["R", A("push the box right")], [{"env": CORRIDOR}, {"env": CORRIDOR}])
    assert out.total == [0.0, 0.0]
    assert out.stats == {"sokoban/answer_missing": 1.0, "sokoban/plan_parse_failures": 1.0}


def test_check_rows_names_rows_without_a_usable_level():
    reward = SokobanReward()
    with pytest.raises(ValueError, match=r"soko.jsonl:2: 'env' is missing.*'sokoban'"):
        reward.check_rows([{"env": CORRIDOR}, {"datasource": "sokoban", "_where": "soko.jsonl:2"}])
    with pytest.raises(ValueError, match=r"soko.jsonl:5: env: "):
        reward.check_rows([{"env": "#####\n#@ x#\n#####", "_where": "soko.jsonl:5"}])


def test_builtin_sokoban_adds_format():
    reward = build_reward("sokoban")
    out = reward([A("R"), "<answer>R</answer>"], [{"env": CORRIDOR}] * 2)
    assert out.components == {"format": [1.0, 0.0], "solved": [1.0, 1.0]}
    assert out.total == [1.5, 1.0]
