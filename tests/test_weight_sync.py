"""WeightSync callback and the weight stream it sends (CPU; the real vLLM round trip is in test_vllm_engine.py)."""

from __future__ import annotations

import sys
import types
from contextlib import contextmanager

import pytest
import torch

from lmmr1.callbacks.weight_sync import WeightSync, holds_own_weights, policy_weights, zero3_weights
from lmmr1.data.processor import PromptProcessor
from lmmr1.modules.policy import LoraSettings, Policy
from lmmr1.rollout.base import Completion, SamplingConfig
from lmmr1.rollout.hf import HFEngine

ROWS = [{"message": [{"role": "user", "content": f"What is {i} + 7?"}], "answer": str(i + 7)} for i in range(2)]


class CopyEngine(HFEngine):
    """An engine that holds its own weights: generates like HFEngine, records syncs, can bias its log-probs."""

    def __init__(self, logprob_bias: float = 0.0) -> None:
        super().__init__()
        self.synced: list[dict[str, torch.Tensor]] = []
        self.wakes, self.logprob_bias = 0, logprob_bias

    def generate(self, prompts, sampling, *, seed=0):  # noqa: ANN001
        groups = super().generate(prompts, sampling, seed=seed)
        return [[Completion(c.token_ids, c.text, [x + self.logprob_bias for x in c.logprobs], c.finish_reason)
                 for c in g] for g in groups]

    def update_weights(self, named_tensors) -> None:  # noqa: ANN001
        self.synced.append({k: v.clone() for k, v in named_tensors})

    def wake(self) -> None:
        self.wakes += 1


class Module:
    """The RLModule attributes WeightSync uses."""

    def __init__(self, policy, engine, tokenizer):  # noqa: ANN001
        self.policy, self.engine, self.tokenizer = policy, engine, tokenizer
        self.sampling, self.device, self.global_step, self.logged = SamplingConfig(temperature=1.0), "cpu", 0, {}

    def log(self, name, value, **_):  # noqa: ANN001
        self.logged[name] = value

    def log_dict(self, values, **_):  # noqa: ANN001
        self.logged.update(values)


class Trainer:
    global_step = 0


@pytest.fixture(scope="module")
def setup(tiny_text_path):
    return Policy(str(tiny_text_path)), PromptProcessor(tiny_text_path)


def test_engines_sharing_the_policy_are_never_synced(setup, monkeypatch):
    policy, processor = setup
    engine = HFEngine()
    engine.bind(policy, processor.tokenizer)
    assert not holds_own_weights(engine) and holds_own_weights(CopyEngine())
    monkeypatch.setattr(policy, "weights_for_sync", lambda: pytest.fail("HFEngine needs no weight copy"))
    module, trainer = Module(policy, engine, processor.tokenizer), Trainer()
    trainer.global_step = 3
    WeightSync().on_train_batch_start(trainer, module, processor(ROWS), 0)
    assert module.logged == {}


def test_sync_once_per_optimizer_step_with_every_hf_weight(setup):
    policy, processor = setup
    engine = CopyEngine()
    engine.bind(policy, processor.tokenizer)
    module, trainer, callback = Module(policy, engine, processor.tokenizer), Trainer(), WeightSync(check_prompts=1)
    batch = processor(ROWS)
    callback.on_train_batch_start(trainer, module, batch, 0)
    assert engine.synced == [] and engine.wakes == 1  # step 0: the engine loaded the same folder itself
    trainer.global_step = 1
    callback.on_train_batch_start(trainer, module, batch, 1)
    callback.on_train_batch_start(trainer, module, batch, 2)  # no optimizer step in between: nothing to push
    callback.on_validation_start(trainer, module)
    assert len(engine.synced) == 1 and engine.wakes == 4
    sent = engine.synced[0]
    assert set(sent) == set(policy.model.state_dict())
    assert "lm_head.weight" in sent  # tied to the embeddings: vLLM needs the name explicitly
    for name, tensor in policy.model.state_dict().items():
        torch.testing.assert_close(sent[name], tensor, rtol=0, atol=0)
    assert module.logged["rollout/weight_sync_s"] >= 0
    assert module.logged["rollout/sync_gap_max"] < 1e-4  # same weights, same log-probs
    trainer.global_step = 2
    callback.on_validation_start(trainer, module)  # validation after a step scores the new weights
    assert len(engine.synced) == 2


def test_a_drifting_engine_is_reported(setup):
    policy, processor = setup
    engine = CopyEngine(logprob_bias=0.3)
    engine.bind(policy, processor.tokenizer)
    module, trainer, callback = Module(policy, engine, processor.tokenizer), Trainer(), WeightSync(warn_gap=0.05)
    callback.on_train_batch_start(trainer, module, processor(ROWS), 0)
    trainer.global_step = 1
    with pytest.warns(UserWarning, match=r"step 1: after the weight sync the engine's log-probs differ .* by 0\.3"):
        callback.on_train_batch_start(trainer, module, processor(ROWS), 1)
    assert module.logged["rollout/sync_gap_mean"] == pytest.approx(0.3, abs=1e-4)


def test_the_sync_check_of_a_multi_turn_engine_samples_one_turn_from_the_inner_engine(setup, monkeypatch):
    from lmmr1.envs import GuessNumber
    from lmmr1.rollout.multi_turn import MultiTurnEngine

    policy, processor = setup
    inner = CopyEngine()
    engine = MultiTurnEngine(GuessNumber(), engine=inner)
    engine.bind(policy, processor.tokenizer)
    monkeypatch.setattr(MultiTurnEngine, "generate", lambda *a, **k: pytest.fail("the check plays no episodes"))
    module, trainer, callback = Module(policy, engine, processor.tokenizer), Trainer(), WeightSync(check_prompts=2)
    callback.on_train_batch_start(trainer, module, processor(ROWS), 0)
    trainer.global_step = 1
    callback.on_train_batch_start(trainer, module, processor(ROWS), 1)
    assert len(inner.synced) == 1 and module.logged["rollout/sync_gap_max"] < 1e-4


@pytest.fixture
def gathered(monkeypatch):
    """deepspeed.zero.GatheredParameters stand-in: records each gathered chunk (the parameters here are whole)."""
    chunks: list[list[torch.nn.Parameter]] = []

    @contextmanager
    def gathered_parameters(params, modifier_rank=None):  # noqa: ANN001
        assert modifier_rank is None  # read-only gather
        chunks.append(list(params))
        yield

    stub = types.ModuleType("deepspeed")
    stub.zero = types.SimpleNamespace(GatheredParameters=gathered_parameters)
    monkeypatch.setitem(sys.modules, "deepspeed", stub)
    return chunks


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_zero3_stream_equals_the_merged_lora_state_dict(tiny_text_path, gathered, dtype):
    """Bitwise: both paths merge with one rounding to the weight dtype (bf16 would show a rounded delta)."""
    policy = Policy(str(tiny_text_path), dtype=dtype, lora=LoraSettings(rank=4, alpha=8))
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # peft starts B at zero, which would make merging invisible
    expected = policy.weights_for_sync()
    for i, p in enumerate(policy.model.parameters()):
        p.ds_id = i  # what ZeRO-3 marks its partitioned parameters with
    sent = dict(policy_weights(policy, chunk_mb=0.05))
    assert len(gathered) > 2  # gathered chunk by chunk, not all at once
    assert set(sent) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(sent[name], tensor, rtol=0, atol=0)
    base = Policy(str(tiny_text_path), dtype=dtype).model.state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(sent[q], base[q])  # the LoRA delta is in what was sent


def test_zero3_stream_of_a_plain_model_covers_every_parameter_once_per_chunk(setup, gathered):
    policy, _ = setup
    sent = list(zero3_weights(policy.model, chunk_mb=1e9))
    assert len(gathered) == 1
    assert {n for n, _ in sent} == set(policy.model.state_dict())
    state = policy.model.state_dict()
    for name, tensor in sent:
        assert tensor.data_ptr() != state[name].data_ptr()  # copied out before the partition is released
