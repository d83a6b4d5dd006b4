"""vLLM engine against the HF engine and the policy (runs where vllm is installed: `make test-vllm` on CPU).

On CPU only the text model runs: vLLM 0.32's Qwen2-VL code imports transformers' torchvision image processor, and no
torchvision build imports beside the CPU torch 2.13. The multimodal tests are marked `gpu`.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in-process: ~10 s per engine, not ~26 s
pytest.importorskip("vllm")

from lmmr1.callbacks.weight_sync import WeightSync, policy_weights  # noqa: E402
from lmmr1.data.processor import PromptProcessor  # noqa: E402
from lmmr1.models.families import family_of  # noqa: E402
from lmmr1.modules.experience import Experience  # noqa: E402
from lmmr1.modules.policy import Policy  # noqa: E402
from lmmr1.rollout.base import SamplingConfig  # noqa: E402
from lmmr1.rollout.hf import HFEngine  # noqa: E402
from lmmr1.rollout.vllm import VLLMEngine  # noqa: E402
from tests.test_weight_sync import Module, Trainer  # noqa: E402 - the RLModule/Trainer stand-ins WeightSync needs

pytestmark = pytest.mark.vllm

PROMPTS = ["What is 4 + 7?", "how many apples are left in the box", "push the box up then left to the goal"]
ROWS = [{"message": [{"role": "user", "content": text}], "answer": "11", "_where": f"mem:{i}"}
        for i, text in enumerate(PROMPTS)]
TOL = 1e-3  # fp32


def reference_logprobs(policy: Policy, exp: Experience, temperature: float, banned: list[int]) -> torch.Tensor:
    """(N, T) log-probs of the sampled tokens from the HF model's own logits, under the distribution the engine
    samples from: logits / temperature with the family's banned tokens (vision placeholders) removed."""
    inputs = exp.model_inputs()
    T = inputs.pop("response_len")
    extra = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw") and v is not None}
    with torch.no_grad():
        logits = policy.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                              **extra).logits[:, -T - 1 : -1].float() / temperature
    logits[..., banned] = float("-inf")
    return torch.log_softmax(logits, -1).gather(-1, exp.input_ids[:, -T:, None]).squeeze(-1)


def max_gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float(((a - b).abs() * mask).max())


def make_engines(path, **options):
    policy, processor = Policy(str(path)), PromptProcessor(path)
    hf = HFEngine()
    engine = VLLMEngine(gpu_memory_utilization=0.05, max_model_len=512, enforce_eager=True, dtype="float32",
                        kv_cache_memory_bytes=64 * 2**20, **options)
    hf.bind(policy, processor.tokenizer)
    engine.bind(policy, processor.tokenizer)
    banned = family_of(policy.model.config).banned_token_ids(processor.tokenizer)  # what the engines ban
    return policy, processor, hf, engine, banned


@pytest.fixture(scope="module")
def text(tiny_text_path):
    return make_engines(tiny_text_path, enable_sleep_mode=True)


def test_greedy_matches_hf_token_for_token(text):
    _, processor, hf, engine, _ = text
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=12)
    batch = processor(ROWS)
    ours, theirs = engine.generate(batch, greedy), hf.generate(batch, greedy)
    assert [g[0].token_ids for g in ours] == [g[0].token_ids for g in theirs]
    assert [g[0].text for g in ours] == [g[0].text for g in theirs]
    assert [g[0].finish_reason for g in ours] == [g[0].finish_reason for g in theirs]


def test_samples_are_grouped_by_prompt_and_seeded(text):
    """Each group's log-probs match the policy only when scored against its own prompt."""
    policy, processor, _, engine, banned = text
    batch = processor(ROWS)
    sampling = SamplingConfig(n=3, temperature=1.0, max_new_tokens=6)
    out = engine.generate(batch, sampling, seed=1)
    assert [len(g) for g in out] == [3, 3, 3]
    assert out == engine.generate(batch, sampling, seed=1)
    assert [[c.token_ids for c in g] for g in out] != [[c.token_ids for c in g] for g in
                                                        engine.generate(batch, sampling, seed=2)]
    assert all(len({tuple(c.token_ids) for c in g}) > 1 for g in out)  # samples of a group differ
    exp = Experience.from_rollout(batch, out, processor.tokenizer.pad_token_id)
    mask = exp.response_mask
    assert max_gap(exp.rollout_logprobs, reference_logprobs(policy, exp, 1.0, banned), mask) <= TOL
    rotated = Experience.from_rollout(batch, out[1:] + out[:1], processor.tokenizer.pad_token_id)
    assert max_gap(rotated.rollout_logprobs, reference_logprobs(policy, rotated, 1.0, banned), mask) > 10 * TOL


def test_length_and_stop_string_finish_reasons(text):
    _, processor, _, engine, _ = text
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    batch = processor(ROWS[:1])
    free = engine.generate(batch, SamplingConfig(n=4, max_new_tokens=16), seed=0)[0]
    short = engine.generate(batch, SamplingConfig(n=4, max_new_tokens=3), seed=0)[0]
    for c in short:
        assert len(c.token_ids) == len(c.logprobs) <= 3
        assert c.finish_reason == ("stop" if c.token_ids[-1] == eos else "length")
    assert any(c.finish_reason == "length" for c in short)
    sample = max(free, key=lambda c: len(c.text))
    stop = next(sample.text[i : i + 2] for i in range(2, len(sample.text) - 1) if sample.text[i : i + 2].strip())
    stopped = engine.generate(batch, SamplingConfig(n=4, max_new_tokens=16, stop=[stop]), seed=0)[0]
    hit = stopped[free.index(sample)]
    assert hit.finish_reason == "stop" and stop in hit.text and len(hit.token_ids) < len(sample.token_ids)
    assert hit.token_ids == sample.token_ids[: len(hit.token_ids)]  # same seed: the same sample, cut at the stop


def test_sleep_wake_round_trip_keeps_generation(text):
    _, processor, _, engine, _ = text
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=10)
    batch = processor(ROWS)
    before = engine.generate(batch, greedy)
    engine.sleep()
    assert engine.asleep is engine.sleep_mode  # vLLM has no sleep mode on CPU: there the round trip is a no-op
    engine.wake()
    assert not engine.asleep
    assert engine.generate(batch, greedy) == before
    engine.sleep()
    assert engine.generate(batch, greedy) == before  # generate wakes a sleeping engine itself
    assert not engine.asleep


def test_weight_sync_makes_engine_follow_the_perturbed_policy(text, capsys):
    """The sync check: after update_weights the engine's log-probs are the perturbed policy's, not the old ones."""
    policy, processor, _, engine, banned = text
    batch = processor(ROWS)
    sampling = SamplingConfig(n=2, temperature=0.8, max_new_tokens=8)
    old = copy.deepcopy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    try:
        def gaps(seed: int) -> tuple[float, float]:
            exp = Experience.from_rollout(batch, engine.generate(batch, sampling, seed=seed),
                                          processor.tokenizer.pad_token_id)
            return tuple(max_gap(exp.rollout_logprobs, reference_logprobs(p, exp, 0.8, banned), exp.response_mask)
                         for p in (policy, old))

        stale_new, stale_old = gaps(3)
        engine.update_weights(policy_weights(policy))
        synced_new, synced_old = gaps(4)
        with capsys.disabled():
            print(f"\nmax |engine - policy| log-prob gap: stale {stale_new:.2e} (vs old weights {stale_old:.2e}), "
                  f"synced {synced_new:.2e} (vs old weights {synced_old:.2e})")
        assert stale_old <= TOL and stale_new > 0.1  # before the sync the engine still samples the old weights
        assert synced_new <= TOL and synced_old > 0.1
    finally:
        with torch.no_grad():
            for p, q in zip(policy.parameters(), old.parameters()):
                p.copy_(q)
        engine.update_weights(policy_weights(policy))


def test_weight_sync_callback_syncs_after_a_step_and_checks_the_gap(text):
    policy, processor, _, engine, _ = text
    module, trainer, callback = Module(policy, engine, processor.tokenizer), Trainer(), WeightSync(warn_gap=0.05)
    batch = processor(ROWS)
    callback.on_train_batch_start(trainer, module, batch, 0)
    assert module.logged == {}  # step 0: the engine loaded these weights itself
    engine.sleep()
    trainer.global_step = module.global_step = 1
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1.02)
    try:
        callback.on_train_batch_start(trainer, module, batch, 1)
        assert not engine.asleep
        assert module.logged["rollout/weight_sync_s"] > 0
        assert module.logged["rollout/sync_gap_max"] < 0.05  # banned placeholder mass (~4e-3) on a random model
    finally:
        with torch.no_grad():
            for p in policy.parameters():
                p.div_(1.02)
        engine.update_weights(policy_weights(policy))


# ---- multimodal: GPU only (see the module docstring) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def vl(tiny_vl_path):
    return make_engines(tiny_vl_path, enable_sleep_mode=True)


@pytest.mark.gpu
def test_multimodal_greedy_matches_hf_and_prompt_tokens_are_training_s(vl, mixed_rows):
    _, processor, hf, engine, _ = vl
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=8)
    batch = processor(mixed_rows)  # generate raises if vLLM's expanded prompt differs from these token ids
    assert [g[0].token_ids for g in engine.generate(batch, greedy)] == [g[0].token_ids for g in
                                                                         hf.generate(batch, greedy)]


@pytest.mark.gpu
def test_multimodal_weight_sync_and_sleep(vl, mixed_rows):
    policy, processor, _, engine, banned = vl
    batch = processor(mixed_rows)
    sampling = SamplingConfig(n=2, temperature=1.0, max_new_tokens=6)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine.sleep()
    engine.update_weights(policy_weights(policy))  # wakes the engine first
    exp = Experience.from_rollout(batch, engine.generate(batch, sampling, seed=0), processor.tokenizer.pad_token_id)
    assert max_gap(exp.rollout_logprobs, reference_logprobs(policy, exp.to("cpu"), 1.0, banned),
                   exp.response_mask) <= TOL
