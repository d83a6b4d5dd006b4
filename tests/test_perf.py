"""Guards for the speed-ups: step-phase timing, the LM-head log-prob path, bf16 numerics and fp32 master weights.

Speed itself is measured by benchmarks/vs_trl.py, not timed here; these tests check what the fast paths compute.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from lmmr1.data.processor import PromptProcessor
from lmmr1.modules.algorithm_config import AlgorithmConfig
from lmmr1.modules.master_weights import MasterWeights
from lmmr1.modules.policy import Policy, _token_stats
from lmmr1.modules.rl_module import RLModule
from lmmr1.rollout.base import SamplingConfig
from tests.test_fit_e2e import LengthReward, _fit


def test_every_step_logs_the_seconds_of_each_phase(tiny_vl_path, mixed_rows, tmp_path):
    _, _, trainer = _fit(tiny_vl_path, mixed_rows, tmp_path, kl={"coef": 1e-3})
    seconds = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("perf/")}
    assert set(seconds) == {f"perf/{p}_s" for p in ("generate", "reward", "old_logprob", "ref", "train")}
    # every phase ran in this configuration (reference on, old log-probs recomputed), so each took some time
    assert all(s > 0 for s in seconds.values()), seconds


def _reference_token_stats(states, targets, head, temperature):
    """The obviously-correct computation: the whole log-softmax, then gather, then -sum p log p."""
    logp = torch.log_softmax(head(states).float() / temperature, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fast_lm_head_path_equals_the_full_log_softmax_values_and_gradients(temperature):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    states = torch.randn(3, 5, 16, requires_grad=True)
    targets = torch.randint(0, 300, (3, 5))
    fast_lp, fast_ent = _token_stats(states, targets, head, temperature)
    ref_lp, ref_ent = _reference_token_stats(states, targets, head, temperature)
    torch.testing.assert_close(fast_lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast_ent, ref_ent, atol=1e-5, rtol=0)
    fast = torch.autograd.grad((fast_lp.sum() + fast_ent.sum()), [states, head.weight])
    ref = torch.autograd.grad((ref_lp.sum() + ref_ent.sum()), [states, head.weight])
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    lp, ent = _token_stats(states, targets, head, temperature, entropy=False)
    assert ent is None  # no entropy asked: none computed
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)


def test_master_weights_accumulate_updates_that_bf16_weights_round_away():
    # bf16 values just below 1.0 are 2^-8 = 0.0039 apart: an SGD step of 0.001 rounds back to 1.0 every time
    bare = torch.nn.Parameter(torch.ones(1, dtype=torch.bfloat16))
    kept = torch.nn.Parameter(torch.ones(1, dtype=torch.bfloat16))
    master = MasterWeights([{"params": [kept]}])
    plain_sgd = torch.optim.SGD([bare], lr=1e-3)
    master_sgd = torch.optim.SGD(master.groups, lr=1e-3)
    for _ in range(10):
        for p in (bare, kept):
            p.grad = torch.ones_like(p)
        plain_sgd.step()
        master.grads_to_master()
        master_sgd.step()
        master.master_to_model()
    assert bare.item() == 1.0  # ten updates lost
    # the float32 copy holds 1 - 10 * 0.001 = 0.99; the bf16 weight is its rounding, 0.98828125 (= 1 - 3 * 2^-8)
    assert master.groups[0]["params"][0].item() == pytest.approx(0.99, abs=1e-6)
    assert kept.item() == 0.98828125


def test_a_bf16_policy_trains_through_float32_master_weights(tiny_vl_path, mixed_rows, tmp_path):
    proc = PromptProcessor(tiny_vl_path)
    policy = Policy(str(tiny_vl_path), dtype="bfloat16", freeze=["visual."])  # text rows: no vision gradients
    module = RLModule(policy=policy, reward=LengthReward(),
                      sampling=SamplingConfig(n=4, max_new_tokens=8), algorithm=AlgorithmConfig(),
                      optimizer=lambda params: torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0))  # an RL lr
    names = {p: n for n, p in module.policy.named_parameters() if p.requires_grad}
    before = {n: p.detach().float().clone() for n, p in module.policy.named_parameters()}
    L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              default_root_dir=tmp_path).fit(module, DataLoader([proc(mixed_rows[2:])] * 2, batch_size=None))
    assert module.master is not None and len(module.master.pairs) == len(names)
    for param, master in module.master.pairs:
        moved = (master.detach() - before[names[param]]).abs().max().item()
        # two Adam steps of lr 1e-6 move each trained weight by up to ~2e-6: kept in float32, lost in bf16 rounding
        assert 0 < moved < 1e-5, names[param]
        assert param.dtype == torch.bfloat16 and torch.equal(param, master.detach().to(torch.bfloat16))


def test_bf16_log_probs_are_float32_and_within_tolerance_of_float32(tiny_text_path):
    """On the mini model (else the tiny one), sampled tokens of a real prompt: bf16 weights give per-token log-probs
    within 0.06 nats of float32 on average and 1.0 at most (measured on the mini model: 0.03 mean, 0.35 max; the
    PPO ratio exp(bf16 - fp32) then stays within the 0.2 clip for ~99% of tokens)."""
    from lmmr1.models.mini import default_mini_dir, is_complete

    path = str(default_mini_dir() if is_complete(default_mini_dir()) else tiny_text_path)
    exact, fast = Policy(path, dtype="float32"), Policy(path, dtype="bfloat16")
    messages = [{"role": "user", "content": "What is 23 + 45? Think step by step."}]
    ids = AutoTokenizer.from_pretrained(path).apply_chat_template(messages, add_generation_prompt=True,
                                                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        torch.manual_seed(0)
        sampled = exact.model.generate(ids.repeat(4, 1), attention_mask=torch.ones(4, ids.shape[1], dtype=torch.long),
                                       do_sample=True, top_k=0, min_new_tokens=24, max_new_tokens=24)
        mask, T = torch.ones_like(sampled), sampled.shape[1] - ids.shape[1]
        exact_lp, _ = exact.logprobs(sampled, mask, T)
        fast_lp, fast_ent = fast.logprobs(sampled, mask, T)
        _, no_entropy = fast.logprobs(sampled, mask, T, entropy=False)
    assert next(fast.parameters()).dtype == torch.bfloat16 and fast_lp.dtype == torch.float32
    error = (fast_lp - exact_lp).abs()
    assert 0 < error.mean() < 0.06 and error.max() < 1.0, (error.mean(), error.max())
    assert fast_ent.dtype == torch.float32 and no_entropy is None
