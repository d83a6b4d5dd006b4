"""Routing by datasource, weighted sums and build_reward specs (names, mappings, YAML, class_path)."""

from __future__ import annotations

import math

import pytest

from lmmr1.rewards import (
    AccuracyReward,
    FormatReward,
    MathReward,
    Reward,
    RewardOutput,
    RoutedReward,
    WeightedSum,
    build_reward,
)

GOOD = "<think>t</think><answer>{}</answer>"
CORRIDOR = "#####\n#@$.#\n#####"


class Const(Reward):
    """Scores every row `value` under component `name` (a fake to test the combinators alone)."""

    def __init__(self, name: str, value: float) -> None:
        self.name, self.value, self.checked, self.closed = name, value, 0, False

    def __call__(self, responses, rows):
        return RewardOutput(total=[self.value] * len(rows), components={self.name: [self.value] * len(rows)},
                            stats={f"{self.name}/calls": 1.0})

    def check_rows(self, rows):
        self.checked += len(rows)

    def close(self):
        self.closed = True


def test_weighted_sum_adds_weighted_totals_and_keeps_components():
    out = WeightedSum([Const("a", 1.0), Const("b", 3.0)], [0.5, 2.0])(["x", "y"], [{}, {}])
    assert out.total == [6.5, 6.5]  # 0.5*1 + 2*3
    assert out.components == {"a": [1.0, 1.0], "b": [3.0, 3.0]}
    assert out.stats == {"a/calls": 1.0, "b/calls": 1.0}


def test_weighted_sum_rejects_clashing_components_and_bad_weights():
    with pytest.raises(ValueError, match="both produce the component 'a'"):
        WeightedSum([Const("a", 1.0), Const("a", 2.0)])(["x"], [{}])
    with pytest.raises(ValueError, match="2 rewards but 1 weights"):
        WeightedSum([Const("a", 1.0), Const("b", 1.0)], [1.0])


def test_routes_by_datasource_and_fills_nan():
    a, b, rest = Const("a", 1.0), Const("b", 2.0), Const("c", 3.0)
    reward = RoutedReward({"*": rest, "geo*": a, "sokoban": b})  # "*" listed first is still tried last
    rows = [{"datasource": "geo3k"}, {"datasource": "sokoban"}, {"datasource": "gsm8k"}, {}]
    out = reward(["r"] * 4, rows)
    assert out.total == [1.0, 2.0, 3.0, 3.0]
    assert out.components["a"][0] == 1.0 and all(math.isnan(v) for v in out.components["a"][1:])
    assert math.isnan(out.components["b"][0]) and out.components["b"][1] == 2.0
    assert out.components["c"][2:] == [3.0, 3.0]
    assert out.row(1) == {"b": 2.0}
    assert out.component_means() == {"a": 1.0, "b": 2.0, "c": 3.0}
    reward.check_rows(rows)
    assert (a.checked, b.checked, rest.checked) == (1, 1, 2)  # each route checks only its own rows
    reward.close()
    assert a.closed and b.closed and rest.closed


def test_uncovered_datasource_is_found_by_check_rows():
    reward = RoutedReward({"geo*": Const("a", 1.0)})
    rows = [{"datasource": "geo1"}, {"datasource": "chart", "_where": "mm.jsonl:7"}]
    with pytest.raises(ValueError, match=r"mm.jsonl:7: datasource 'chart' matches no reward route \['geo\*'\]"):
        reward.check_rows(rows)
    with pytest.raises(ValueError, match="'chart' matches no reward route"):
        reward(["r", "r"], rows)


def test_build_routes_from_mapping_shares_one_accuracy_component():
    reward = build_reward({"routes": {"geo*": ["format", "math"], "sokoban": ["format", "sokoban"], "*": "math"},
                           "weights": {"format": 0.25}})
    geo, soko, rest = (reward.routes[p] for p in ("geo*", "sokoban", "*"))
    assert [type(r) for r in geo.rewards] == [FormatReward, AccuracyReward]  # format listed once
    assert geo.weights == [0.25, 1.0] and soko.weights == [0.25, 1.0]
    assert geo.rewards[1] is rest.rewards[1]  # one math worker pool per run
    try:
        out = reward([GOOD.format(7), GOOD.format("R"), "\\boxed{7}"],
                     [{"datasource": "geo", "answer": "7"}, {"datasource": "sokoban", "env": CORRIDOR},
                      {"datasource": "gsm8k", "answer": "7"}])
    finally:
        reward.close()
    assert out.total == [1.25, 1.25, 1.0]
    assert out.row(0) == {"format": 1.0, "accuracy": 1.0}
    assert out.row(1) == {"format": 1.0, "solved": 1.0}
    assert out.row(2) == {"format": 0.0, "accuracy": 1.0}


def test_build_names_and_errors():
    assert isinstance(build_reward("math"), MathReward) and build_reward("math").weights == [0.5, 1.0]
    assert isinstance(build_reward("format"), FormatReward)
    assert isinstance(build_reward("accuracy"), AccuracyReward)
    existing = Const("a", 1.0)
    assert build_reward(existing) is existing
    with pytest.raises(ValueError, match=r"unknown reward 'mth'; choose a built-in name \['format', 'accuracy'"):
        build_reward("mth")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['rout'\]"):
        build_reward({"rout": {}})
    with pytest.raises(ValueError, match=r"options: unknown component\(s\) \['acc'\]"):
        build_reward({"reward": "math", "options": {"acc": {}}})
    with pytest.raises(ValueError, match="options.accuracy: "):
        build_reward({"reward": "math", "options": {"accuracy": {"timeut": 1}}})


def test_build_options_reach_the_components():
    reward = build_reward({"reward": ["format", "sokoban"], "options": {"solved": {"noop_penalty": 0.5}}})
    assert reward.rewards[1].noop_penalty == 0.5


def test_build_from_yaml_and_class_path(tmp_path):
    (tmp_path / "r.yaml").write_text("routes:\n  sokoban: [format, sokoban]\n  '*': math\nweights: {accuracy: 2.0}\n")
    reward = build_reward(str(tmp_path / "r.yaml"))
    assert isinstance(reward, RoutedReward) and reward.routes["*"].weights == [0.5, 2.0]
    (tmp_path / "c.yaml").write_text("class_path: lmmr1.rewards.MathReward\ninit_args: {format_weight: 0.1}\n")
    assert build_reward(str(tmp_path / "c.yaml")).weights == [0.1, 1.0]
    (tmp_path / "bad.yaml").write_text("routes: [math]\n")
    with pytest.raises(ValueError, match=r"bad.yaml: routes: expected a mapping"):
        build_reward(str(tmp_path / "bad.yaml"))
    with pytest.raises(ValueError, match="does not exist"):
        build_reward(str(tmp_path / "missing.yaml"))
