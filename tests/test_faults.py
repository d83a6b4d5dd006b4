"""Faults the trainer survives: NaN/inf losses are skipped and counted (and too many in a row stop with a clear
error), and a long run with the math-verify worker pool keeps its memory, file descriptors and child processes flat."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from lmmr1.data.datamodule import DatasetSpec, PromptDataModule
from lmmr1.data.synthetic import make
from lmmr1.modules.algorithm_config import AlgorithmConfig
from lmmr1.modules.policy import Policy
from lmmr1.modules.rl_module import RLModule
from lmmr1.rewards import RewardOutput
from lmmr1.rewards.accuracy import AccuracyReward
from lmmr1.rollout.base import SamplingConfig
from tests.test_fit_e2e import LengthReward


class NaNAtSteps(LengthReward):
    """A length reward that returns NaN for every sample of the given steps (a broken reward plug-in)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps, self.calls = steps, 0

    def __call__(self, responses, rows) -> RewardOutput:  # noqa: ANN001
        out = super().__call__(responses, rows)
        self.calls += 1
        if self.calls - 1 in self.steps:
            out = RewardOutput([math.nan] * len(out.total), {"length": [math.nan] * len(out.total)})
        return out


class Snapshots(L.Callback):
    def __init__(self) -> None:
        self.after: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.after.append({n: p.detach().clone() for n, p in pl_module.policy.named_parameters()})


@pytest.fixture(scope="module")
def arith(tmp_path_factory) -> str:
    return str(make("arith", n=32, seed=0, out=tmp_path_factory.mktemp("arith"), difficulty=1))


def _fit(model, arith, root, max_steps, reward, callbacks=(), **algorithm):  # noqa: ANN001, ANN202
    module = RLModule(policy=Policy(str(model)), reward=reward, sampling=SamplingConfig(n=2, max_new_tokens=6),
                      algorithm=AlgorithmConfig(**{"kl": {"coef": 0.0}, **algorithm}),
                      optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    data = PromptDataModule(datasets=[DatasetSpec(arith)], batch_size=2, seed=1, processor_path=str(model))
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, default_root_dir=root, log_every_n_steps=1,
                        logger=L.pytorch.loggers.CSVLogger(root, name="log"), enable_progress_bar=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, enable_model_summary=False,
                        callbacks=list(callbacks))
    trainer.fit(module, datamodule=data)
    return module, trainer


def test_a_nan_loss_skips_the_step_counts_it_and_training_goes_on(tiny_vl_path, arith, tmp_path):
    snapshots = Snapshots()
    module, trainer = _fit(tiny_vl_path, arith, tmp_path, 3, NaNAtSteps({1}), callbacks=[snapshots])
    assert trainer.global_step == 3
    for name, value in snapshots.after[0].items():
        assert torch.equal(snapshots.after[1][name], value), name  # step 2 (NaN) changed nothing
        assert torch.isfinite(snapshots.after[2][name]).all(), name
    assert any(not torch.equal(snapshots.after[2][n], v) for n, v in snapshots.after[1].items())  # step 3 trained
    assert module.skipped_steps == 1 and module.nonfinite_in_a_row == 0
    with open(tmp_path / "log" / "version_0" / "metrics.csv") as f:
        logged = [r.get("train/skipped_steps") or "0" for r in csv.DictReader(f) if r.get("train/reward/total")]
    assert [float(v) for v in logged] == [0.0, 1.0, 1.0]


def test_too_many_nan_steps_in_a_row_stop_with_a_clear_error(tiny_vl_path, arith, tmp_path):
    with pytest.raises(FloatingPointError, match=r"NaN/inf in 3 optimizer steps in a row "
                                                 r"\(--model.algorithm.max_nonfinite_steps 2\)"):
        _fit(tiny_vl_path, arith, tmp_path, 5, NaNAtSteps({0, 1, 2, 3, 4}), max_nonfinite_steps=2)


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _descendants() -> int:
    """Processes below this one (the math-verify workers are children of multiprocessing's fork server)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            pass
    found, frontier = 0, [os.getpid()]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += len(children)
        frontier = children
    return found


class BoxedLengthAccuracy(AccuracyReward):
    """The accuracy reward with every response replaced by `\\boxed{len % 10}`: a random model never writes an
    answer, and this sends every sample through the math-verify worker pool (some of them right)."""

    def __call__(self, responses, rows) -> RewardOutput:  # noqa: ANN001
        return super().__call__([f"\\boxed{{{len(r) % 10}}}" for r in responses], rows)


class Soak(L.Callback):
    """RSS, open file descriptors and child processes at chosen steps."""

    def __init__(self, steps: tuple[int, ...]) -> None:
        self.steps, self.seen = steps, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step in self.steps:
            self.seen[trainer.global_step] = (_rss_bytes(), len(os.listdir("/proc/self/fd")), _descendants())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_soak_200_steps_with_the_math_worker_pool_stays_flat(tiny_vl_path, arith, tmp_path):
    soak, before = Soak((20, 100, 200)), _descendants()
    reward = BoxedLengthAccuracy(workers=2)
    _fit(tiny_vl_path, arith, tmp_path, 200, reward, callbacks=[soak])
    (rss20, fds20, kids20), (rss100, fds100, kids100), (rss200, fds200, kids200) = (soak.seen[s] for s in (20, 100,
                                                                                                          200))
    print(f"soak RSS MiB at steps 20/100/200: {rss20 / 2**20:.0f} / {rss100 / 2**20:.0f} / {rss200 / 2**20:.0f}; "
          f"fds {fds20}/{fds100}/{fds200}; processes below {kids20}/{kids100}/{kids200}")
    assert rss200 <= 1.10 * rss20 and rss100 <= 1.10 * rss20
    assert fds200 == fds20 and kids200 == kids20 >= before + 2  # the pool's 2 workers, none leaked or lost
    assert _descendants() <= kids20 - 2  # the workers end with training (multiprocessing's fork server may stay)
