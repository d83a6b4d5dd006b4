"""PromptDataModule: blended seeded stream, probabilities, and resume at the next unseen prompt."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from lmmr1.data.datamodule import CurriculumSampler, DatasetSpec, PromptDataModule, Stage


def BlendedSampler(sizes, probs, seed, start=0):  # noqa: N802 - a one-stage curriculum is a plain blend
    return CurriculumSampler([[(d, n, p) for d, (n, p) in enumerate(zip(sizes, probs))]], [None], 4, seed, start)


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


def test_curriculum_switches_exactly_at_the_configured_step():
    # stage 0: dataset 0 for 3 steps of 4 prompts; stage 1: datasets 1 and 2
    sampler = CurriculumSampler([[(0, 10, 1.0)], [(1, 5, 1.0), (2, 5, 1.0)]], [3, None], batch_size=4, seed=0)
    stream = _take(sampler, 40)
    assert {d for d, _, p in stream if p < 12} == {0}
    assert {d for d, _, p in stream if p >= 12} == {1, 2}
    assert sampler.stage_at(2) == 0 and sampler.stage_at(3) == 1 and sampler.stage_at(10**6) == 1


def test_annealing_mixes_the_next_stage_in_before_the_boundary():
    sampler = CurriculumSampler([[(0, 50, 1.0)], [(1, 50, 1.0)]], [10, None], batch_size=500, seed=0, anneal_steps=4)
    stream = _take(sampler, 500 * 12)
    share = [sum(d == 1 for d, _, p in stream if p // 500 == step) / 500 for step in range(12)]
    assert share[:6] == [0.0] * 6  # before the anneal window: stage 0 only
    # inside the window (steps 6..9) the next stage's share rises 1/5, 2/5, 3/5, 4/5
    assert share[6:10] == pytest.approx([0.2, 0.4, 0.6, 0.8], abs=0.07)
    assert share[10:] == [1.0, 1.0]  # after the boundary: stage 1 only


class _Training:
    training = True


def _module(tmp_path, tiny_vl_path, stages=True):
    from lmmr1.data.datamodule import DatasetSpec, PromptDataModule, Stage
    from lmmr1.data.synthetic import make

    text = str(make("arith", n=12, seed=0, out=tmp_path / "arith", difficulty=1))
    image = str(make("image-arith", n=6, seed=0, out=tmp_path / "image", difficulty=1))
    if stages:
        kwargs = {"stages": [Stage("fre", [DatasetSpec(text)], steps=2), Stage("mgt", [DatasetSpec(image)])]}
    else:
        kwargs = {"datasets": [DatasetSpec(text, prob=0.5), DatasetSpec(image, prob=0.5)]}
    dm = PromptDataModule(batch_size=3, seed=1, processor_path=str(tiny_vl_path), **kwargs)
    dm.trainer = _Training()
    dm.setup("fit")
    return dm


def _consume(dm, k):
    """Take k batches as training would (on_after_batch_transfer marks them consumed)."""
    loader = iter(dm.train_dataloader())
    return [dm.on_after_batch_transfer(next(loader), 0) for _ in range(k)]


@pytest.mark.parametrize("stages", [True, False], ids=["curriculum", "blend"])
def test_datamodule_resume_yields_the_batch_that_would_have_come(tmp_path, tiny_vl_path, stages):
    uninterrupted = _module(tmp_path, tiny_vl_path, stages)
    expected = _consume(uninterrupted, 4)
    first = _module(tmp_path, tiny_vl_path, stages)
    _consume(first, 2)
    state = first.state_dict()
    resumed = _module(tmp_path, tiny_vl_path, stages)
    resumed.load_state_dict(state)
    got = _consume(resumed, 2)
    for want, have in zip(expected[2:], got):
        assert [r["_where"] for r in want.rows] == [r["_where"] for r in have.rows]
        assert (want.input_ids == have.input_ids).all()
    if stages:  # steps 0-1 text (fre), steps 2-3 images (mgt): the resume landed in the right stage
        assert all(p is None for b in expected[:2] for p in b.pixel_values)
        assert all(p is not None for b in got for p in b.pixel_values)
        assert resumed.stage_at(2).name == "mgt"


def test_two_ranks_split_every_global_batch_into_disjoint_shares_whose_union_is_the_one_rank_batch():
    stages = [[(0, 10, 0.5), (1, 7, 0.5)]]
    one = CurriculumSampler(stages, [None], batch_size=4, seed=3)
    ranks = [CurriculumSampler(stages, [None], batch_size=4, seed=3, rank=r, replicas=2) for r in range(2)]
    global_stream = _take(one, 12)  # 3 global batches
    shares = [_take(s, 6) for s in ranks]  # 3 local batches of 2 each
    for step in range(3):
        batch = global_stream[4 * step : 4 * step + 4]
        local = [share[2 * step : 2 * step + 2] for share in shares]
        assert local[0] + local[1] == batch  # rank 0 takes the first half, rank 1 the second
        assert not {p for _, _, p in local[0]} & {p for _, _, p in local[1]}


def test_batch_size_must_split_over_the_ranks():
    with pytest.raises(ValueError, match="batch_size 5 .* divisible by the 2 data-parallel ranks"):
        CurriculumSampler([[(0, 10, 1.0)]], [None], batch_size=5, seed=0, rank=0, replicas=2)


def test_episodes_set_max_steps_from_the_rows_loaded(tmp_path):
    import lightning as L

    from lmmr1.data.synthetic import make
    from lmmr1.models.tiny import build_tiny

    rows = make("arith", n=10, seed=0, out=tmp_path / "arith")
    data = PromptDataModule(datasets=[DatasetSpec(str(rows))], batch_size=4, episodes=2,
                            processor_path=str(build_tiny(tmp_path / "tiny", kind="text", seed=0)))
    trainer = L.Trainer(accelerator="cpu", max_steps=-1, logger=False)
    data.trainer = trainer
    data.setup("fit")
    assert trainer.max_steps == 5  # ceil(2 passes x 10 rows / 4 prompts per step)
    given = L.Trainer(accelerator="cpu", max_steps=1, logger=False)
    data.trainer = given
    data.setup("fit")
    assert given.max_steps == 1  # an explicit max_steps wins
    with pytest.raises(ValueError, match=r"--data.episodes: counts passes over one set of datasets"):
        PromptDataModule(stages=[Stage("a", [DatasetSpec(str(rows))], steps=2), Stage("b", [DatasetSpec(str(rows))])],
                         episodes=1)
