"""Plug-in rewards: lmmr1 style functions, LMM-R1 reward files unchanged, and clear errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from lmmr1.rewards import PluginReward, build_reward
from lmmr1.rewards.plugin import prompt_text

DATA = Path(__file__).parent / "data" / "rewards"
CUSTOM = DATA / "custom_reward.py"


def test_list_of_floats_becomes_one_component():
    reward = build_reward(f"{CUSTOM}:brevity")
    out = reward(["abc", ""], [{}, {}])
    assert out.total == [0.25, 1.0] and out.components == {"brevity": [0.25, 1.0]}


def test_list_of_dicts_becomes_components_summed_into_total():
    out = PluginReward(f"{CUSTOM}:parts")(["<answer>1</answer>", "x" * 40], [{}, {}])
    assert out.components == {"has_answer": [1.0, 0.0], "short": [1.0, 0.0]}
    assert out.total == [2.0, 0.0]
    assert PluginReward(f"{CUSTOM}:with_total")(["a"], [{}]).total == [10.0]  # an explicit total wins


def test_lmm_r1_reward_file_works_unchanged():
    reward = build_reward(f"{DATA / 'lmm_r1_reward.py'}:reward_func")
    rows = [{"answer": "42", "message": [{"role": "user", "content": [{"type": "image", "image": "/x.png"},
                                                                        {"type": "text", "text": "bonus question"}]}]},
            {"answer": "42", "message": json.dumps([{"role": "system", "content": "bonus"},
                                                    {"role": "user", "content": "what?"}])},
            {"answer": "7", "message": [{"role": "user", "content": "q"}]}]
    out = reward(["so 41 then 42", "42", "8"], rows)
    # row 0: right answer + "bonus" in the user text; row 1: right, "bonus" only in the system turn; row 2: wrong
    assert out.total == [1.5, 1.0, 0.0]
    assert out.components == {"reward_func": [1.5, 1.0, 0.0]}


def test_prompt_text_keeps_only_user_text():
    row = {"message": [{"role": "system", "content": "sys"}, {"role": "user", "content": [
        {"type": "image", "image": "a.png"}, {"type": "text", "text": "How many?"}]}]}
    assert prompt_text(row) == "How many?"


def test_module_path_plugins_and_pickling():
    reward = build_reward("lmmr1.rewards.plugin:prompt_text")  # any importable function loads
    assert reward.name == "prompt_text"
    clone = pickle.loads(pickle.dumps(PluginReward(f"{CUSTOM}:brevity")))
    assert clone(["abc"], [{}]).total == [0.25]


def test_plugin_in_a_route_and_yaml_relative_path(tmp_path):
    (tmp_path / "mine.py").write_text("def one(responses, rows):\n    return [1.0] * len(responses)\n")
    (tmp_path / "r.yaml").write_text("routes:\n  '*': [format, 'mine.py:one']\nweights: {one: 3.0}\n")
    reward = build_reward(str(tmp_path / "r.yaml"))
    out = reward(["<think>a</think><answer>b</answer>"], [{}])
    assert out.total == [0.5 + 3.0] and out.components == {"format": [1.0], "one": [1.0]}


@pytest.mark.parametrize("target,message", [
    ("nocolon", "expected 'path/to/file.py:function'"),
    ("missing_file.py:fn", "missing_file.py does not exist"),
    (f"{CUSTOM}:nope", "has no function 'nope'"),
    ("no_such_module_xyz:fn", "cannot import 'no_such_module_xyz'"),
])
def test_load_errors(target, message):
    with pytest.raises(ValueError, match=message):
        build_reward(target) if ":" in target else PluginReward(target)


def test_bad_return_values_are_reported():
    with pytest.raises(ValueError, match="returned 1 values for 2 responses"):
        PluginReward(f"{CUSTOM}:wrong_length")(["a", "b"], [{}, {}])
    with pytest.raises(ValueError, match="'not_numbers' value 'high' is not a number"):
        PluginReward(f"{CUSTOM}:not_numbers")(["a"], [{}])
