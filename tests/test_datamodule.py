"""PromptDataModule: blended seeded stream, probabilities, and resume at the next unseen prompt."""

from __future__ import annotations

import itertools
from collections import Counter

from lmmr1.data.datamodule import BlendedSampler


def _take(sampler: BlendedSampler, n: int) -> list[tuple[int, int, int]]:
    return list(itertools.islice(iter(sampler), n))


def test_stream_is_deterministic_and_covers_each_dataset_per_epoch():
    a = _take(BlendedSampler([5, 7], [0.5, 0.5], seed=3), 60)
    assert a == _take(BlendedSampler([5, 7], [0.5, 0.5], seed=3), 60)
    assert a != _take(BlendedSampler([5, 7], [0.5, 0.5], seed=4), 60)
    assert [p for _, _, p in a] == list(range(60))
    # each dataset is walked as a permutation: the first len(d) draws of dataset d hit every row once
    for d, size in enumerate([5, 7]):
        rows = [r for dd, r, _ in a if dd == d][:size]
        assert sorted(rows) == list(range(size))


def test_probabilities_are_respected():
    counts = Counter(d for d, _, _ in _take(BlendedSampler([3, 3], [0.8, 0.2], seed=0), 5000))
    assert abs(counts[0] / 5000 - 0.8) < 0.03


def test_resume_from_position_continues_the_same_stream():
    full = _take(BlendedSampler([4, 9], [1.0, 2.0], seed=1), 40)
    resumed = _take(BlendedSampler([4, 9], [1.0, 2.0], seed=1, start=17), 23)
    assert resumed == full[17:]
