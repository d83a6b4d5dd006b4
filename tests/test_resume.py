"""A run can be killed and resumed: exact resume, SIGTERM checkpoints, and crash-safe checkpoint writes."""

from __future__ import annotations

import csv
import os
import signal

import fsspec.implementations.local
import lightning as L
import pytest
import torch

from lmmr1.callbacks.graceful_stop import GracefulStop
from lmmr1.data.datamodule import DatasetSpec, PromptDataModule
from lmmr1.data.synthetic import make
from lmmr1.modules.algorithm_config import AlgorithmConfig
from lmmr1.modules.policy import Policy
from lmmr1.modules.rl_module import RLModule
from lmmr1.rewards import RewardOutput, RewardServerError
from lmmr1.rollout.base import SamplingConfig
from tests.test_fit_e2e import LengthReward


class SignalAtStep(LengthReward):
    """A length reward that sends SIGTERM to this process while scoring the given step (a preemption mid-step)."""

    def __init__(self, step: int) -> None:
        self.calls, self.step = 0, step

    def __call__(self, responses, rows) -> RewardOutput:  # noqa: ANN001
        self.calls += 1
        if self.calls == self.step + 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__call__(responses, rows)


@pytest.fixture(scope="module")
def arith(tmp_path_factory):
    return str(make("arith", n=24, seed=0, out=tmp_path_factory.mktemp("arith"), difficulty=1))


def _run(tiny_vl_path, arith, root, max_steps, ckpt_path=None, reward=None, callbacks=()):
    module = RLModule(policy=Policy(str(tiny_vl_path)), reward=reward or LengthReward(),
                      sampling=SamplingConfig(n=2, max_new_tokens=6),
                      algorithm=AlgorithmConfig(kl={"coef": 1e-2, "target": 0.01, "horizon": 100}),  # adaptive KL
                      optimizer=lambda params: torch.optim.Adam(params, lr=1e-2))
    data = PromptDataModule(datasets=[DatasetSpec(arith)], batch_size=2, seed=3, processor_path=str(tiny_vl_path))
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, default_root_dir=root, log_every_n_steps=1,
                        logger=L.pytorch.loggers.CSVLogger(root, name="log"), enable_progress_bar=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, callbacks=list(callbacks))
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer, data


def _metrics(root) -> dict[int, dict[str, str]]:
    with open(root / "log" / "version_0" / "metrics.csv") as f:
        return {int(r["step"]): r for r in csv.DictReader(f) if r.get("train/reward/total")}


def _assert_same_model(a: RLModule, b: RLModule) -> None:
    for (name, p), q in zip(a.policy.named_parameters(), b.policy.parameters()):
        assert torch.equal(p, q), name


def test_two_plus_two_steps_equal_four_bitwise(tiny_vl_path, arith, tmp_path):
    full, _, _ = _run(tiny_vl_path, arith, tmp_path / "full", max_steps=4)
    first, trainer, data = _run(tiny_vl_path, arith, tmp_path / "first", max_steps=2)
    assert data.consumed == 4  # 2 steps x 2 prompts
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    resumed, _, data = _run(tiny_vl_path, arith, tmp_path / "resumed", max_steps=4, ckpt_path=tmp_path / "two.ckpt")
    assert data.consumed == 8
    _assert_same_model(full, resumed)
    assert resumed.kl_controller.state_dict() == full.kl_controller.state_dict()
    clip_full, clip_resumed = full.grad_clip.state_dict(), resumed.grad_clip.state_dict()  # history survived resume
    torch.testing.assert_close(torch.tensor(clip_resumed.pop("norms")), torch.tensor(clip_full.pop("norms")),
                               rtol=0, atol=0, equal_nan=True)
    assert clip_resumed == clip_full
    full_metrics, resumed_metrics = _metrics(tmp_path / "full"), _metrics(tmp_path / "resumed")
    for step in (2, 3):  # the steps after the resume logged exactly what the uninterrupted run logged
        for key in ("train/reward/total", "train/policy_loss", "train/kl", "train/grad_norm"):
            assert resumed_metrics[step][key] == full_metrics[step][key], (step, key)


def test_sigterm_checkpoints_after_the_step_and_the_run_resumes(tiny_vl_path, arith, tmp_path):
    full, _, _ = _run(tiny_vl_path, arith, tmp_path / "full", max_steps=3)
    stop = GracefulStop(dirpath=str(tmp_path / "ckpt"))
    _, trainer, _ = _run(tiny_vl_path, arith, tmp_path / "killed", max_steps=3, reward=SignalAtStep(1),
                         callbacks=[stop])
    assert trainer.global_step == 2  # finished the step it was in, then stopped
    assert signal.getsignal(signal.SIGTERM) is not stop._handle  # handlers restored
    resumed, _, _ = _run(tiny_vl_path, arith, tmp_path / "resumed", max_steps=3,
                         ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    _assert_same_model(full, resumed)


def test_crash_while_writing_leaves_the_previous_checkpoint_loadable(tiny_vl_path, arith, tmp_path, monkeypatch):
    _, trainer, _ = _run(tiny_vl_path, arith, tmp_path / "run", max_steps=1)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()

    def crash(self, data):  # noqa: ANN001 - write half of the bytes, then die
        self.f.write(data[: len(data) // 2])
        raise OSError("disk vanished")

    monkeypatch.setattr(fsspec.implementations.local.LocalFileOpener, "write", crash)
    with pytest.raises(OSError, match="disk vanished"):
        trainer.save_checkpoint(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=False)["global_step"] == 1


class ServerDownAtStep(LengthReward):
    """A reward whose server stays unreachable (after the client's retries) from the given step on."""

    def __init__(self, step: int) -> None:
        self.calls, self.step = 0, step

    def __call__(self, responses, rows) -> RewardOutput:  # noqa: ANN001
        self.calls += 1
        if self.calls > self.step:
            raise RewardServerError("http://127.0.0.1:9/score: no answer after 4 attempts (connection refused)")
        return super().__call__(responses, rows)


def test_a_dead_reward_server_leaves_a_checkpoint_to_resume_from(tiny_vl_path, arith, tmp_path):
    full, _, _ = _run(tiny_vl_path, arith, tmp_path / "full", max_steps=3)
    with pytest.raises(RewardServerError, match="no answer after 4 attempts"):
        _run(tiny_vl_path, arith, tmp_path / "failed", max_steps=3, reward=ServerDownAtStep(2),
             callbacks=[GracefulStop(dirpath=str(tmp_path / "ckpt"))])
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 2 and state["PromptDataModule"]["consumed"] == 4  # the failed step's prompts kept
    resumed, _, _ = _run(tiny_vl_path, arith, tmp_path / "resumed", max_steps=3,
                         ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    _assert_same_model(full, resumed)
