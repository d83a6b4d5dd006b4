"""LMM-R1's own rewards, rule for rule: `lmm_r1_math` (format table, weights, the one deliberate difference) and
`lmm_r1_sokoban` (format gate, gym return, bonuses, repetition penalty, 50-action cap, clipping), each expected value
derived by hand from the reference's rules (openrlhf/models/remote_rm/{math,sokoban}_verifier.py in TideDra/lmm-r1)."""

from __future__ import annotations

import pytest

from lmmr1.envs.sokoban import level_from_grid
from lmmr1.rewards import FormatReward, build_reward
from lmmr1.rewards.lmm_r1_math import clean_response, reference_format
from lmmr1.rewards.lmm_r1_sokoban import LmmR1SokobanReward, repeats

FORMAT_CASES = [  # (response as generated, LMM-R1 format, our `format`)
    ("<think>a</think><answer>1</answer>", 1, 1),  # the shape itself
    ("  <think>a</think><answer>1</answer>\n", 1, 1),  # the reference server strips the response it cuts out
    ("<think>a</think><answer>1</answer><|im_end|>", 1, 0),  # LMM-R1 deletes end-of-turn markers (ours never sees
    #                                                           them: engines decode without special tokens)
    ("<think>\nline\nline</think><answer>\n1</answer>", 1, 1),  # blocks span lines
    ("<think></think><answer></answer>", 1, 1),  # empty blocks pass the format rule
    ("<think>a</think> <answer>1</answer>", 0, 1),  # whitespace between the blocks: anchored, ours allows it
    ("<think>a</think>\n<answer>1</answer>", 0, 1),  # a newline between the blocks, likewise
    ("<think>a</think>so<answer>1</answer>", 0, 0),  # text between the blocks
    ("Sure. <think>a</think><answer>1</answer>", 0, 0),  # text before <think>
    ("<think>a</think><answer>1</answer> Done.", 0, 0),  # text after </answer>
    ("<think>a<think>b</think><answer>1</answer>", 0, 0),  # <think> twice
    ("<think>a</think><answer>1</answer><answer>2</answer>", 0, 0),  # <answer> twice
    ("<think>a</think></think><answer>1</answer>", 0, 0),  # </think> twice: the first one ends the thinking
    ("<think>a</think><answer>1</answer></answer>", 0, 0),  # </answer> twice: the first one must end the text
    ("<think>a</answer>b</think><answer>1</answer>", 1, 0),  # a stray </answer> inside the thinking passes the rule
    ("<answer>1</answer>", 0, 0),  # no thinking
    ("<think>a</think>", 0, 0),  # no answer
]


@pytest.mark.parametrize(("response", "lmm_r1", "ours"), FORMAT_CASES)
def test_lmm_r1_math_format_table(response, lmm_r1, ours):
    assert reference_format(clean_response(response)) == bool(lmm_r1)
    assert FormatReward().score(response) == ours  # the two rules side by side


@pytest.mark.timeout(60)
def test_lmm_r1_math_weights_whole_response_and_unparseable_label():
    reward = build_reward({"reward": "lmm_r1_math", "options": {"lmm_r1_math": {"workers": 1}}})
    cases = [  # (response, label, format, accuracy)
        ("<think>6*10</think><answer>The answer is $\\boxed{60}$</answer>", "$\\boxed{60}$", 1, 1),  # 0.5 + 1.0
        ("<think>6*10</think> <answer>$\\boxed{60}$</answer>", "$\\boxed{60}$", 0, 1),  # right, badly formatted
        ("<think>x</think><answer>$\\boxed{61}$</answer>", "60", 1, 0),  # label wrapped as $60$: wrong answer
        ("the answer is $\\boxed{60}$", "60", 0, 1),  # accuracy reads the whole response, tags or not
        ("<think>x</think><answer>60</answer>", "60", 1, 0),  # a bare number has no anchor: nothing extracted
        ("<think>x</think><answer>$\\boxed{60}$</answer>", "$\\boxed{}$", 1, 0),  # label extracts nothing: 0 (ref 1)
    ]
    out = reward([c[0] for c in cases], [{"answer": c[1]} for c in cases])
    assert out.components["format"] == [float(c[2]) for c in cases]
    assert out.components["accuracy"] == [float(c[3]) for c in cases]
    assert out.total == [0.5 * c[2] + 1.0 * c[3] for c in cases]
    assert out.stats["accuracy/label_parse_failures"] == 1.0  # the deliberate difference is counted, not hidden
    with pytest.raises(ValueError, match="needs a label"):
        reward.check_rows([{"answer": ""}])
    reward.close()


# Level A, a gym-sokoban grid (0 wall, 1 floor, 2 target, 4 box, 5 player):  ######
#                                                                           #@ $.#
#                                                                           ######
CORRIDOR = [[0, 0, 0, 0, 0, 0], [0, 5, 1, 4, 2, 0], [0, 0, 0, 0, 0, 0]]
# Level B: two boxes; pushing the upper one right twice puts it on its target, then off it again.
TWO_BOXES = [[0, 0, 0, 0, 0, 0, 0], [0, 5, 4, 2, 1, 1, 0], [0, 2, 4, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0]]

SOKOBAN_CASES = [  # (level, response, total, solved, env_return)
    # R: walk (-0.1); R: box onto the target and every target covered (-0.1 + 1 + 10): best sum 10.8. Words "push",
    # "the", "box", "right": 0.004; 2 actions: 0.1. 10.8 + 0.5 + 0.1 + 0.004 = 11.404, clipped to 10.
    (CORRIDOR, "<think>push the box right</think><answer>Right, Right</answer>", 10.0, 1, 10.8),
    # L into the wall: -0.1, the best sum stays 0 (before the first step). 0 + 0.5 + 0.05 + 0.001 ("go").
    (CORRIDOR, "<think>go</think><answer>left</answer>", 0.551, 0, 0.0),
    # 30 blocked moves (-3.0), R (-0.1), R (+10.9): 7.8. 32 actions: 1 - 0.2·(12/30)² = 0.968, but "up, down" runs 15
    # times back to back (> 7): min(0, 0.968 - 0.2) = 0. 7.8 + 0.5 + 0 + 0.001.
    (CORRIDOR, "<think>go</think><answer>" + "up, down, " * 15 + "right, right</answer>", 8.301, 1, 7.8),
    # 52 actions: only the first 50 (all blocked) are played, so the two pushes never happen: best sum 0. The bonus
    # 1 - 0.2·(32/30)² = 0.7724 is zeroed by the repetition penalty. 0 + 0.5 + 0 + 0.001.
    (CORRIDOR, "<think>go</think><answer>" + "up, down, " * 25 + "right, right</answer>", 0.501, 0, 0.0),
    # 300 actions: 1 - 0.2·(280/30)² = -16.42, repeated: -16.62; 0 + 0.5 - 16.62 = -16.12, clipped to -10.
    (CORRIDOR, "<think></think><answer>" + "left, " * 299 + "left</answer>", -10.0, 0, 0.0),
    # R: upper box onto its target (-0.1 + 1 = 0.9); R: pushed off it again (-0.1 - 1): sum -0.2, best 0.9.
    # 0.9 + 0.5 + 0.1 + 0.003 ("push", "right", "twice").
    (TWO_BOXES, "<think>push right twice</think><answer>Right, Right</answer>", 1.503, 0, 0.9),
    # The gate counts tags, it does not order them: this passes and solves (clipped 10).
    (CORRIDOR, "<answer>right, right</answer> <think>t</think>", 10.0, 1, 10.8),
    # Format gate failures score 0 whatever the plan does.
    (CORRIDOR, "<think>t</think><answer>right right</answer>", 0.0, 0, 0.0),  # not comma-separated
    (CORRIDOR, "<think>t</think><answer>RR</answer>", 0.0, 0, 0.0),  # letters: `sokoban` reads them, LMM-R1 not
    (CORRIDOR, "<think>t</think><answer>right, right,</answer>", 0.0, 0, 0.0),  # an empty last action
    (CORRIDOR, "<think>t</think><answer>right, jump</answer>", 0.0, 0, 0.0),  # not an action
    (CORRIDOR, "<think>a</think><think>b</think><answer>right, right</answer>", 0.0, 0, 0.0),  # <think> twice
    (CORRIDOR, "<think>t <answer>right, right</answer>", 0.0, 0, 0.0),  # no </think>
]


@pytest.mark.parametrize(("grid", "response", "total", "solved", "env_return"), SOKOBAN_CASES)
def test_lmm_r1_sokoban_values_by_hand(grid, response, total, solved, env_return):
    row = {"env": level_from_grid(grid).to_xsb()}
    out = LmmR1SokobanReward()([response], [row])
    assert out.total[0] == pytest.approx(total, abs=1e-9)
    assert out.components["solved"] == [solved]
    assert out.components["env_return"][0] == pytest.approx(env_return, abs=1e-9)
    assert out.components["format"] == [float(total != 0.0)]


def test_repetition_rule_counts_back_to_back_runs_only():
    assert repeats("up, " * 8) and not repeats("up, " * 7)  # more than 7 in a row
    assert repeats("left, up, " * 8) and not repeats("left, up, " * 7)  # 2-word runs likewise
    assert not repeats("up, up, down, " * 2 + "left, " * 7)  # runs broken up never reach 8
    assert repeats("a b c d e " * 8) and not repeats("a b c d e f " * 8)  # runs of at most 5 words count


def test_lmm_r1_sokoban_by_name_and_options():
    reward = build_reward({"reward": "lmm_r1_sokoban", "options": {"lmm_r1_sokoban": {"max_actions": 1}}})
    row = {"env": level_from_grid(CORRIDOR).to_xsb()}
    assert reward(["<think>go</think><answer>right, right</answer>"], [row]).components["solved"] == [0.0]
    with pytest.raises(ValueError, match="clip"):
        LmmR1SokobanReward(clip=0)
    with pytest.raises(ValueError, match="'env' is missing"):
        LmmR1SokobanReward().check_rows([{"answer": ""}])
