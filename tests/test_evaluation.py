"""Validation metrics against independent computations."""

from __future__ import annotations

import itertools
import math

import pytest

from lmmr1.modules.evaluation import greedy_metrics, pass_at_k, pass_metrics
from lmmr1.rewards.base import RewardOutput

NAN = math.nan


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 2), (4, 1, 3), (6, 3, 4), (3, 3, 2)])
def test_pass_at_k_equals_enumeration_over_subsets(n, c, k):
    # brute force: the fraction of k-subsets of n samples (the first c correct) containing a correct one
    subsets = list(itertools.combinations(range(n), k))
    expected = sum(any(i < c for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_greedy_metrics_per_datasource_and_correctness_fallback():
    scores = RewardOutput(
        total=[1.5, 0.5, 1.0, 0.0],
        components={"format": [1.0, 1.0, NAN, NAN], "accuracy": [1.0, 0.0, NAN, NAN], "solved": [NAN, NAN, 1.0, 0.0]},
    )
    rows = [{"datasource": "arith"}, {"datasource": "arith"}, {"datasource": "sokoban"}, {"datasource": "sokoban"}]
    m = greedy_metrics(scores, [10, 20, 30, 40], rows)
    assert m["accuracy"] == (0.5, 4)  # arith 1/2 by accuracy, sokoban 1/2 by solved
    assert m["arith/accuracy"] == (0.5, 2) and m["sokoban/accuracy"] == (0.5, 2)
    assert m["format"] == (1.0, 2)  # only where it applies
    assert m["response_len"] == (25.0, 4)
    assert m["reward"] == (0.75, 4)


def test_pass_metrics_groups_consecutive_samples():
    # 2 prompts x 3 samples: prompt 0 has 1 correct, prompt 1 none
    scores = RewardOutput(total=[0] * 6, components={"accuracy": [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]})
    m = pass_metrics(scores, n=3, ks=[1, 2])
    assert m["pass@1"] == (pytest.approx((1 / 3 + 0) / 2), 2)
    assert m["pass@2"] == (pytest.approx((2 / 3 + 0) / 2), 2)
