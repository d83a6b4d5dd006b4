"""Each option shows its own effect, so a no-op implementation would fail: TIS, overlong masking, DAPO dynamic
sampling (fresh prompts from the stream, exact resume, no update when nothing is kept), honest metric names, the
reference's attention kernel and the WeightSync requirement of engines that hold their own weights."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lmmr1.data.datamodule import DatasetSpec, PromptDataModule
from lmmr1.data.processor import PromptProcessor
from lmmr1.data.synthetic import make
from lmmr1.modules.algorithm_config import AlgorithmConfig
from lmmr1.modules.algorithms import first_in_stream
from lmmr1.modules.experience import Experience
from lmmr1.modules.policy import Policy
from lmmr1.modules.rl_module import RLModule, Rollout
from lmmr1.rewards import Reward, RewardOutput
from lmmr1.rollout.base import SamplingConfig
from lmmr1.rollout.hf import HFEngine
from tests.conftest import sample_experience
from tests.test_fit_e2e import LengthReward


# ---- one step on a fixed experience batch -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fixed(tiny_vl_path) -> tuple[Experience, RewardOutput]:
    """8 samples (2 prompts x 4) sampled from the tiny model, uneven random rewards; rows 1 and 6 truncated."""
    rows = [{"message": [{"role": "user", "content": f"What is {i} + 3?"}], "answer": str(i + 3)} for i in range(2)]
    exp = sample_experience(tiny_vl_path, rows, n=4, max_new_tokens=6, seed=1)
    exp.truncated = torch.tensor([i in (1, 6) for i in range(len(exp))])
    scores = RewardOutput(torch.rand(len(exp), generator=torch.Generator().manual_seed(0)).tolist(), {}, {})
    return exp, scores


def _step(model: Path, exp: Experience, scores: RewardOutput, **algorithm) -> dict[str, torch.Tensor]:
    """The policy weights after one real training step (SGD) on a copy of `exp` (the step fills in its fields)."""
    exp = copy.deepcopy(exp)
    L.seed_everything(0)
    module = RLModule(policy=Policy(str(model)), sampling=SamplingConfig(n=exp.group_size, max_new_tokens=6),
                      algorithm=AlgorithmConfig(kl={"coef": 0.0}, grad_clip={"mode": "none"}, **algorithm),
                      optimizer=lambda groups: torch.optim.SGD(groups, lr=1.0))
    module._rollout = lambda batch: Rollout(exp, scores, scores, generated_groups=len(exp) // exp.group_size,
                                            rounds=1, first_row=exp.select([0]))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(["batch"], batch_size=None))
    return {n: p.detach().clone() for n, p in module.policy.named_parameters()}


def _update_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[n] - b[n]).pow(2).sum() for n in a).sqrt())


def test_tis_weights_change_the_update_only_when_engine_and_trainer_disagree(tiny_vl_path, fixed):
    exp, scores = fixed
    mismatched = Experience(**{**exp.__dict__, "rollout_logprobs": exp.rollout_logprobs - 0.5 * exp.response_mask *
                               torch.linspace(-1, 1, exp.response_len)})  # the engine's log-probs are off
    plain = _step(tiny_vl_path, mismatched, scores)
    tis = _step(tiny_vl_path, mismatched, scores, tis_cap=1.5)
    assert _update_distance(plain, tis) > 1e-4  # weights pi_train / pi_rollout != 1 reweight the tokens
    # with engine == trainer log-probs every weight is 1: TIS must leave that update exactly alone
    torch.testing.assert_close(_step(tiny_vl_path, exp, scores, tis_cap=1.5), _step(tiny_vl_path, exp, scores))


def test_mask_truncated_removes_exactly_the_truncated_rows_tokens(tiny_vl_path, fixed):
    exp, scores = fixed
    masked = _step(tiny_vl_path, exp, scores, overlong={"mask_truncated": True})
    by_hand = Experience(**{**exp.__dict__, "response_mask": exp.response_mask * (~exp.truncated)[:, None].float()})
    torch.testing.assert_close(masked, _step(tiny_vl_path, by_hand, scores))  # same as zeroing those rows' mask
    assert _update_distance(masked, _step(tiny_vl_path, exp, scores)) > 1e-4  # and not a no-op


# ---- DAPO dynamic sampling through a real prompt stream ---------------------------------------------------------
class HalfFlatReward(Reward):
    """Prompts at even stream positions score a constant (no signal: dropped), odd ones score by length. Records the
    positions and rewards of every sample it scores."""

    name = "half_flat"

    def __init__(self, flat_everywhere: bool = False) -> None:
        self.flat_everywhere = flat_everywhere
        self.calls: list[tuple[list[int], list[float]]] = []

    def __call__(self, responses, rows) -> RewardOutput:  # noqa: ANN001
        positions = [row["_position"] for row in rows]
        scores = [0.5 if self.flat_everywhere or p % 2 == 0 else len(r) / 20 for r, p in zip(responses, positions)]
        self.calls.append((positions, scores))
        return RewardOutput(total=scores, components={"half_flat": scores})


@pytest.fixture(scope="module")
def arith(tmp_path_factory) -> str:
    return str(make("arith", n=24, seed=0, out=tmp_path_factory.mktemp("arith"), difficulty=1))


def _dapo(model, arith, root, max_steps, reward, ckpt_path=None, max_extra_rounds=2):  # noqa: ANN001, ANN202
    module = RLModule(policy=Policy(str(model)), reward=reward, sampling=SamplingConfig(n=4, max_new_tokens=6),
                      algorithm=AlgorithmConfig(kl={"coef": 1e-2}, dynamic_sampling={
                          "enabled": True, "max_extra_rounds": max_extra_rounds}),
                      optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    trained: list[list[int]] = []
    rollout = module._rollout

    def spy(batch):  # noqa: ANN001, ANN202
        out = rollout(batch)
        trained.append(sorted({row["_position"] for row in out.exp.rows}))
        return out

    module._rollout = spy
    data = PromptDataModule(datasets=[DatasetSpec(arith)], batch_size=2, seed=3, processor_path=str(model))
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, default_root_dir=root, log_every_n_steps=1,
                        logger=L.pytorch.loggers.CSVLogger(root, name="log"), enable_progress_bar=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, enable_model_summary=False)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer, data, trained


def _logged(root: Path) -> list[dict[str, str]]:
    with open(root / "log" / "version_0" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("train/reward/total")]


def test_dynamic_sampling_draws_fresh_prompts_until_the_batch_is_full(tiny_vl_path, arith, tmp_path):
    reward = HalfFlatReward()
    _, trainer, data, trained = _dapo(tiny_vl_path, arith, tmp_path, max_steps=2, reward=reward)
    # each step: batch [2k, 2k+1] keeps only the odd prompt, so one more batch is drawn from the stream
    scored = [sorted(set(positions)) for positions, _ in reward.calls]
    assert scored == [[0, 1], [2, 3], [4, 5], [6, 7]]  # new prompts every round, none sampled twice
    assert trained == [[1, 3], [5, 7]]  # the kept groups fill the batch of 2 prompts
    assert data.consumed == 8 and trainer.global_step == 2  # the stream position counts the extra batches
    for step, row in enumerate(_logged(tmp_path)):
        every = [s for positions, scores in reward.calls[2 * step : 2 * step + 2] for s in scores]
        assert float(row["train/reward/total"]) == pytest.approx(sum(every) / len(every))  # dropped groups too
        assert (float(row["rollout/generated_groups"]), float(row["rollout/kept_groups"])) == (4.0, 2.0)
        assert float(row["rollout/generation_rounds"]) == 2.0


def test_dynamic_sampling_resumes_exactly(tiny_vl_path, arith, tmp_path):
    full, _, _, trained_full = _dapo(tiny_vl_path, arith, tmp_path / "full", 4, HalfFlatReward())
    _, trainer, _, _ = _dapo(tiny_vl_path, arith, tmp_path / "first", 2, HalfFlatReward())
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    resumed, _, data, trained = _dapo(tiny_vl_path, arith, tmp_path / "resumed", 4, HalfFlatReward(),
                                      ckpt_path=tmp_path / "two.ckpt")
    assert trained == trained_full[2:] and data.consumed == 16
    for (name, p), q in zip(full.policy.named_parameters(), resumed.policy.parameters()):
        assert torch.equal(p, q), name


def test_when_no_group_is_kept_the_step_makes_no_update(tiny_vl_path, arith, tmp_path):
    module, trainer, data, trained = _dapo(tiny_vl_path, arith, tmp_path, max_steps=2,
                                           reward=HalfFlatReward(flat_everywhere=True), max_extra_rounds=1)
    initial = Policy(str(tiny_vl_path))
    for (name, p), q in zip(module.policy.named_parameters(), initial.parameters()):
        assert torch.equal(p, q), name  # AdamW's weight decay and the KL term would have moved them
    assert not trainer.optimizers[0].state  # no moments were ever accumulated
    assert trainer.global_step == 2 and trained == [[], []] and data.consumed == 8  # the RL steps still count
    assert [float(r["train/optimizer_steps"]) for r in _logged(tmp_path)] == [0.0, 0.0]


def test_first_in_stream_cuts_the_batch_the_same_way_for_any_number_of_ranks():
    everything = [[3, 9, 12], [5, 6, 20]]  # two ranks' kept positions
    assert first_in_stream([3, 9, 12], everything, 4) == [True, True, False]  # the 4 earliest: 3, 5, 6, 9
    assert first_in_stream([5, 6, 20], everything, 4) == [True, True, False]
    assert first_in_stream([3, 5, 6, 9, 12, 20], [[3, 5, 6, 9, 12, 20]], 4) == [True] * 4 + [False] * 2
    assert first_in_stream([3], [[3], [5]], 4) == [True]  # fewer than the target: keep all


# ---- metric names and module wiring -----------------------------------------------------------------------------
def test_each_loss_term_is_logged_under_its_own_name(tiny_vl_path, fixed, tmp_path):
    exp, scores = copy.deepcopy(fixed)
    module = RLModule(policy=Policy(str(tiny_vl_path)), sampling=SamplingConfig(n=4, max_new_tokens=6),
                      algorithm=AlgorithmConfig(kl={"coef": 0.5}, entropy_coef=0.1),
                      optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1))
    module._rollout = lambda batch: Rollout(exp, scores, scores, generated_groups=2, rounds=1,
                                            first_row=exp.select([0]))
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(["a", "b"], batch_size=None))  # step 2: the policy has moved, KL > 0
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert logged["train/kl_loss"] > 0 and logged["train/entropy_loss"] < 0
    assert logged["train/loss"] == pytest.approx(logged["train/policy_loss"] + logged["train/kl_loss"] +
                                                 logged["train/entropy_loss"], rel=1e-5)
    assert logged["train/policy_loss"] != pytest.approx(logged["train/loss"])


def test_response_length_counts_truncated_responses_under_mask_truncated(tiny_vl_path, fixed):
    exp, scores = copy.deepcopy(fixed)
    module = RLModule(policy=Policy(str(tiny_vl_path)), sampling=SamplingConfig(n=4, max_new_tokens=6),
                      algorithm=AlgorithmConfig(kl={"coef": 0.0}, overlong={"mask_truncated": True}))
    module._rollout = lambda batch: Rollout(exp, scores, scores, generated_groups=2, rounds=1,
                                            first_row=exp.select([0]))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(["a"], batch_size=None))
    lengths = exp.attention_mask[:, -exp.response_len:].sum(-1)  # every sampled token, truncated rows included
    assert float(exp.response_mask.sum()) < float(lengths.sum())  # the truncated rows left the loss
    assert float(trainer.callback_metrics["rollout/response_len_mean"]) == pytest.approx(float(lengths.float().mean()))


def test_the_reference_uses_the_policys_attention_kernel(tiny_vl_path):
    module = RLModule(policy=Policy(str(tiny_vl_path), attn_implementation="eager"), algorithm=AlgorithmConfig())
    assert module.reference.model.config._attn_implementation == "eager"


class OwnWeightsEngine(HFEngine):
    """An HF engine that claims to hold its own copy of the weights (as vLLM does)."""

    def update_weights(self, named_tensors) -> None:  # noqa: ANN001
        self.updates = getattr(self, "updates", 0) + 1


def test_an_engine_with_its_own_weights_needs_the_weight_sync_callback(tiny_vl_path, mixed_rows):
    module = RLModule(policy=Policy(str(tiny_vl_path)), reward=LengthReward(), engine=OwnWeightsEngine(),
                      sampling=SamplingConfig(n=2, max_new_tokens=4), algorithm=AlgorithmConfig(kl={"coef": 0.0}))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"--model.engine: OwnWeightsEngine samples from its own copy .* add the "
                                         r"callback lmmr1.callbacks.weight_sync.WeightSync"):
        trainer.fit(module, DataLoader([PromptProcessor(tiny_vl_path)(mixed_rows[2:])], batch_size=None))


def test_concat_of_batches_with_different_prompt_and_response_lengths_keeps_rows_aligned(tiny_vl_path, mixed_rows):
    """Dynamic sampling concatenates rollouts of different prompt batches: each row must keep its own tokens,
    response mask, engine log-probs and images, and the policy must give it the same log-probs as before."""
    from transformers import AutoTokenizer

    proc = PromptProcessor(tiny_vl_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_vl_path, padding_side="left")
    policy = Policy(str(tiny_vl_path))
    engine = HFEngine()
    engine.bind(policy, tokenizer)
    parts = [Experience.from_rollout(batch, engine.generate(batch, SamplingConfig(n=2, max_new_tokens=t), seed=t),
                                     tokenizer.pad_token_id)
             for batch, t in ((proc(mixed_rows[:2]), 3), (proc(mixed_rows[2:]), 7))]  # images + text, 3 vs 7 tokens
    assert parts[0].input_ids.shape[1] - parts[0].response_len != parts[1].input_ids.shape[1] - parts[1].response_len
    merged = Experience.concat(parts)
    with torch.no_grad():
        together = policy.logprobs(**merged.model_inputs())[0]
        for offset, part in ((0, parts[0]), (len(parts[0]), parts[1])):
            alone = policy.logprobs(**part.model_inputs())[0]
            for i in range(len(part)):
                row, T = offset + i, part.response_len
                real = merged.attention_mask[row].bool()
                assert merged.input_ids[row][real].tolist() == part.input_ids[i][part.attention_mask[i].bool()].tolist()
                assert torch.equal(merged.response_mask[row, :T], part.response_mask[i])
                assert merged.response_mask[row, T:].sum() == 0
                assert torch.equal(merged.rollout_logprobs[row, :T], part.rollout_logprobs[i])
                assert merged.rows[row] is part.rows[i] and merged.pixel_values[row] is part.pixel_values[i]
                mask = part.response_mask[i].bool()
                torch.testing.assert_close(together[row, :T][mask], alone[i][mask], atol=1e-5, rtol=1e-5)
