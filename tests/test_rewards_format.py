"""Format reward: one case per line with the reason."""

from __future__ import annotations

import pytest

from lmmr1.rewards import FormatReward

CASES = [
    ("<think>a</think><answer>b</answer>", 1),  # minimal
    ("<think>a</think>\n<answer>b</answer>", 1),  # newline between the blocks
    ("  \n<think>a</think>  <answer>b</answer>\n\n", 1),  # surrounding whitespace
    ("<think>line1\nline2</think><answer>x\ny</answer>", 1),  # contents span lines
    ("<think></think><answer></answer>", 1),  # empty contents are still the right shape
    ("<answer>b</answer>", 0),  # no think block
    ("<think>a</think>", 0),  # no answer block
    ("<answer>b</answer><think>a</think>", 0),  # wrong order
    ("<think>a</think><answer>b</answer> done", 0),  # text after the answer
    ("so: <think>a</think><answer>b</answer>", 0),  # text before the think block
    ("<think>a</think> hmm <answer>b</answer>", 0),  # text between the blocks
    ("<think>a <answer>x</answer></think><answer>b</answer>", 0),  # a second answer hidden in the thinking
    ("<think>a</think><think>c</think><answer>b</answer>", 0),  # two think blocks
    ("<think>a</think><answer>b</answer></answer>", 0),  # extra closing tag
    ("<think>a<answer>b</answer>", 0),  # unclosed think
    ("<THINK>a</THINK><ANSWER>b</ANSWER>", 0),  # tags are case-sensitive
    ("", 0),  # empty response
]


@pytest.mark.parametrize("response,expected", CASES)
def test_format_table(response, expected):
    out = FormatReward()([response], [{}])
    assert out.components == {"format": [float(expected)]}
    assert out.total == [float(expected)]


def test_tag_names_are_configurable():
    reward = FormatReward(think_tag="reasoning", answer_tag="final")
    out = reward(["<reasoning>a</reasoning><final>b</final>", "<think>a</think><answer>b</answer>"], [{}, {}])
    assert out.total == [1.0, 0.0]


@pytest.mark.parametrize("kwargs,message", [({"think_tag": "a b"}, "think_tag: 'a b' is not a tag name"),
                                            ({"answer_tag": "think"}, "must differ")])
def test_bad_tag_names_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FormatReward(**kwargs)


def test_batch_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 responses but 1 rows"):
        FormatReward()(["a", "b"], [{}])
