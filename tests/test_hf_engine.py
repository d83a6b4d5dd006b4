"""HF engine: grouping, determinism, finish reasons, and engine log-probs equal the policy's training log-probs;
saved generation defaults of a model folder are ignored; padding (also when pad == eos) is never taken as sampled."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmmr1.data.processor import PromptProcessor
from lmmr1.modules.experience import Experience
from lmmr1.modules.policy import Policy
from lmmr1.rollout.base import SamplingConfig
from lmmr1.rollout.hf import HFEngine


@pytest.fixture(scope="module")
def setup(tiny_vl_path):
    proc = PromptProcessor(tiny_vl_path)
    policy = Policy(str(tiny_vl_path))
    engine = HFEngine()
    engine.bind(policy, proc.tokenizer)
    return proc, policy, engine


def test_n_samples_per_prompt_grouped_and_deterministic(setup, mixed_rows):
    proc, _, engine = setup
    batch = proc(mixed_rows)
    sampling = SamplingConfig(n=3, max_new_tokens=8)
    first = engine.generate(batch, sampling, seed=5)
    again = engine.generate(batch, sampling, seed=5)
    other = engine.generate(batch, sampling, seed=6)
    assert [len(g) for g in first] == [3, 3, 3, 3]
    tokens = [[c.token_ids for c in g] for g in first]
    assert tokens == [[c.token_ids for c in g] for g in again]
    assert tokens != [[c.token_ids for c in g] for g in other]
    # samples within a group differ (temperature 1 on a random model)
    assert any(len({tuple(t) for t in group}) > 1 for group in tokens)


def test_greedy_generation_matches_row_by_row_generation(setup, mixed_rows):
    """Batching + left padding must not change what a prompt generates (greedy)."""
    proc, _, engine = setup
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=6)
    batched = [g[0].token_ids for g in engine.generate(proc(mixed_rows), greedy)]
    single = [engine.generate(proc([row]), greedy)[0][0].token_ids for row in mixed_rows]
    assert batched == single


def test_length_finish_reason_and_budget_split(setup, mixed_rows):
    proc, _, _ = setup
    engine = HFEngine(max_batch_tokens=1)  # forces one row per generate call
    engine.bind(setup[1], proc.tokenizer)
    out = engine.generate(proc(mixed_rows[2:]), SamplingConfig(n=2, max_new_tokens=3), seed=0)
    for group in out:
        for c in group:
            assert len(c.token_ids) <= 3
            assert c.finish_reason == ("stop" if c.token_ids[-1] == proc.tokenizer.eos_token_id else "length")


def test_stop_string_ends_generation(setup, mixed_rows):
    proc, _, engine = setup
    sampled = SamplingConfig(n=1, temperature=1.0, max_new_tokens=16)
    free = engine.generate(proc(mixed_rows[2:3]), sampled, seed=0)[0][0]
    # a non-blank string the seeded continuation contains (HF matches stop strings across the prompt/response
    # boundary, so avoid whitespace the prompt's trailing newline could complete)
    stop = next(free.text[i : i + 2] for i in range(3, len(free.text) - 1) if free.text[i : i + 2].strip())
    stopped = engine.generate(proc(mixed_rows[2:3]), SamplingConfig(n=1, temperature=1.0, max_new_tokens=16,
                                                                    stop=[stop]), seed=0)[0][0]
    assert stopped.finish_reason == "stop"
    assert stop in stopped.text and len(stopped.token_ids) < len(free.token_ids)


def test_engine_logprobs_equal_training_logprobs(setup, mixed_rows):
    """The sync check on the HF path: same weights -> rollout log-probs == policy log-probs (fp32)."""
    proc, policy, engine = setup
    batch = proc(mixed_rows)
    sampling = SamplingConfig(n=2, max_new_tokens=10, temperature=0.7)
    exp = Experience.from_rollout(batch, engine.generate(batch, sampling, seed=1), proc.tokenizer.pad_token_id)
    with torch.no_grad():
        logprobs, entropy = policy.logprobs(**exp.model_inputs(), temperature=0.7)
    mask = exp.response_mask.bool()
    torch.testing.assert_close(logprobs[mask], exp.rollout_logprobs[mask], atol=1e-4, rtol=0)
    assert bool((entropy[mask] > 0).all())


def test_vision_placeholder_tokens_are_never_sampled(setup, mixed_rows):
    """A sampled <|image_pad|> would make the training forward see more image tokens than image features."""
    proc, policy, engine = setup
    pad_id = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    weight = policy.model.lm_head.weight
    saved = weight.detach().clone()
    with torch.no_grad():  # make the placeholder by far the model's favourite token
        weight[pad_id] = 100 * saved.abs().max() * torch.sign(saved.sum(0))
    try:
        out = engine.generate(proc(mixed_rows), SamplingConfig(n=2, max_new_tokens=6), seed=0)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert all(pad_id not in c.token_ids for group in out for c in group)


def _variant(src: Path, dst: Path, tokenizer: dict | None = None, generation: dict | None = None) -> Path:
    """A copy of a model folder (same weights) with entries of tokenizer_config.json / generation_config.json set."""
    shutil.copytree(src, dst)
    for name, changes in (("tokenizer_config.json", tokenizer), ("generation_config.json", generation)):
        config = json.loads((dst / name).read_text())
        (dst / name).write_text(json.dumps({**config, **(changes or {})}))
    return dst


def _text_engine(path: Path) -> tuple[PromptProcessor, HFEngine]:
    proc = PromptProcessor(path)
    engine = HFEngine()
    engine.bind(Policy(str(path)), proc.tokenizer)
    return proc, engine


TEXT_ROWS = [{"message": [{"role": "user", "content": text}], "answer": "1"}
             for text in ("What is 3 + 7?", "how many apples are left")]


@pytest.fixture(scope="module")
def with_and_without_saved_defaults(tiny_text_path, tmp_path_factory):
    """Engines on two folders with the same weights, one whose generation_config.json sets penalties, truncation
    and a forced minimum length."""
    saved = {"top_k": 1, "top_p": 0.5, "temperature": 0.3, "repetition_penalty": 5.0, "no_repeat_ngram_size": 1,
             "min_new_tokens": 12, "do_sample": False}
    proc, clean = _text_engine(tiny_text_path)
    _, biased = _text_engine(_variant(tiny_text_path, tmp_path_factory.mktemp("saved") / "model", generation=saved))
    return proc, clean, biased


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_saved_generation_defaults_of_the_model_folder_are_ignored(with_and_without_saved_defaults, temperature):
    """Tokens and log-probs must come from one distribution: the raw logits (temperature-scaled) the log-probs are
    computed from. A folder's saved generation defaults must not reshape what is sampled, so the same seed samples
    the same tokens, with the same log-probs, as from a folder without them."""
    proc, clean, biased = with_and_without_saved_defaults
    batch = proc(TEXT_ROWS)
    sampling = SamplingConfig(n=4, temperature=temperature, max_new_tokens=12)
    for seed in (0, 1):
        expected = [[(c.token_ids, c.logprobs) for c in g] for g in clean.generate(batch, sampling, seed=seed)]
        got = [[(c.token_ids, c.logprobs) for c in g] for g in biased.generate(batch, sampling, seed=seed)]
        assert got == expected


def _unique_stop(tokenizer, samples: list) -> tuple[str, int, int]:  # noqa: ANN001
    """(stop string, sample, tokens up to and including the one completing it): three letters/digits found in one
    sample only, completed after its first token (no whitespace: cannot match across the prompt's end)."""
    texts = [c.text for c in samples]
    for row, sample in enumerate(samples):
        for i in range(len(sample.text) - 3):
            stop = sample.text[i : i + 3]
            if not stop.isalnum() or sum(stop in t for t in texts) > 1:
                continue
            cut = next(k for k in range(1, len(sample.token_ids) + 1)
                       if stop in tokenizer.decode(sample.token_ids[:k], skip_special_tokens=True))
            if cut > 1:
                return stop, row, cut
    raise AssertionError("no stop string found")


def test_a_row_stopped_by_a_stop_string_keeps_no_padding_when_pad_is_eos(tiny_text_path, tmp_path):
    """The mini model's tokenizer pads with its eos token <|im_end|>. When one row stops on a stop string while
    others go on, generate pads it with pad == eos; that padding must not be taken as a sampled eos (one token too
    many, a log-prob of a token never sampled)."""
    proc, engine = _text_engine(_variant(tiny_text_path, tmp_path / "pad-eos", tokenizer={"pad_token": "<|im_end|>"}))
    assert proc.tokenizer.pad_token_id == proc.tokenizer.eos_token_id
    batch = proc(TEXT_ROWS[:1])
    free = engine.generate(batch, SamplingConfig(n=4, max_new_tokens=16), seed=0)[0]
    stop, row, cut = _unique_stop(proc.tokenizer, free)
    assert cut < max(len(c.token_ids) for c in free)  # the others go on: the stopped row gets padded
    stopped = engine.generate(batch, SamplingConfig(n=4, max_new_tokens=16, stop=[stop]), seed=0)[0]
    for r, (before, after) in enumerate(zip(free, stopped)):
        if r == row:
            assert after.token_ids == before.token_ids[:cut] and after.finish_reason == "stop"
            assert after.logprobs == pytest.approx(before.logprobs[:cut], abs=1e-5)
            assert stop in after.text
        else:
            assert (after.token_ids, after.finish_reason) == (before.token_ids, before.finish_reason)


@pytest.mark.parametrize("model", ["vl", "text"])
def test_a_text_prompt_is_prefilled_once_for_its_samples(model, setup, tiny_text_path, mixed_rows, monkeypatch):
    """n samples of a text prompt share one prefill of its tokens (bar the last): the same tokens and log-probs as
    n separate prefills, with the prompt run through the decoder once. An image generation first leaves M-RoPE state
    behind (Qwen-VL's rope_deltas), which must not leak into the shared path."""
    if model == "vl":
        proc, policy, engine = setup
        engine.generate(proc(mixed_rows[:2]), SamplingConfig(n=2, max_new_tokens=4), seed=0)  # images first
    else:
        proc, engine = _text_engine(tiny_text_path)
        policy = engine.policy
    batch = proc(mixed_rows[2:] if model == "vl" else TEXT_ROWS)
    tokens = []
    hook = policy.model.get_input_embeddings().register_forward_hook(lambda m, a, out: tokens.append(a[0].numel()))
    sampling = SamplingConfig(n=3, max_new_tokens=8)
    shared = engine.generate(batch, sampling, seed=4)
    hook.remove()
    prompt_tokens = batch.input_ids.numel()
    assert tokens[0] == prompt_tokens - 2  # the prefill: each of the 2 prompts once, all but its last token
    assert tokens[1] == 2 * 3  # then generate's first step: the last prompt token of each of the 6 rows
    monkeypatch.setattr(HFEngine, "_shared_prefill", lambda self, *args: {})
    separate = engine.generate(batch, sampling, seed=4)
    assert [[c.token_ids for c in g] for g in shared] == [[c.token_ids for c in g] for g in separate]
    for g, h in zip(shared, separate):
        for a, b in zip(g, h):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
