"""Policy: chunked log-probs equal the naive full-logits computation (values and gradients); freeze by prefix; LoRA
weights for a rollout engine are merged into copies."""

from __future__ import annotations

import pytest
import torch

from lmmr1.data.processor import PromptProcessor
from lmmr1.modules.critic import Critic
from lmmr1.modules.policy import LoraSettings, Policy


def _naive(policy: Policy, inputs: dict, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the model's own full logits (M-RoPE positions computed by transformers from the modality map),
    log_softmax over the whole vocabulary."""
    extra = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if inputs.get(k) is not None}
    if extra:
        extra["mm_token_type_ids"] = (inputs["input_ids"] == policy.model.config.image_token_id).int()
    logits = policy.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **extra).logits
    logp = torch.log_softmax(logits[:, -T - 1 : -1].float(), -1)
    return logp.gather(-1, inputs["input_ids"][:, -T:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("chunk", [0, 1, 3])
def test_chunked_logprobs_match_naive_values_and_gradients(tiny_vl_path, mixed_rows, chunk):
    policy = Policy(str(tiny_vl_path), logprob_chunk=chunk)
    batch = PromptProcessor(tiny_vl_path)(mixed_rows)
    T = 5
    response = torch.randint(20, 300, (len(mixed_rows), T))
    inputs = dict(input_ids=torch.cat([batch.input_ids, response], 1),
                  attention_mask=torch.cat([batch.attention_mask, torch.ones_like(response)], 1),
                  pixel_values=torch.cat([p for p in batch.pixel_values if p is not None]),
                  image_grid_thw=torch.cat([g for g in batch.image_grid_thw if g is not None]))
    logprobs, entropy = policy.logprobs(**inputs, response_len=T)
    ref_logprobs, ref_entropy = _naive(policy, inputs, T)
    torch.testing.assert_close(logprobs, ref_logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-5, rtol=1e-5)
    grad = torch.autograd.grad(logprobs.sum() + entropy.sum(), [policy.model.lm_head.weight])[0]
    ref_grad = torch.autograd.grad(ref_logprobs.sum() + ref_entropy.sum(), [policy.model.lm_head.weight])[0]
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)


def test_freeze_by_prefix_and_unknown_prefix(tiny_vl_path):
    policy = Policy(str(tiny_vl_path), freeze=["visual."])
    flags = {n: p.requires_grad for n, p in policy.model.named_parameters()}
    assert not any(v for n, v in flags.items() if ".visual." in f".{n}")
    assert all(v for n, v in flags.items() if ".visual." not in f".{n}")
    with pytest.raises(ValueError, match=r"--model.policy.freeze: \['vision_tower.'\] matches no parameter"):
        Policy(str(tiny_vl_path), freeze=["vision_tower."])


def test_bad_path_and_dtype_are_clear_errors(tmp_path, tiny_vl_path):
    with pytest.raises(ValueError, match=r"--model.policy.path: .* is not a folder"):
        Policy(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"--model.policy.dtype: unknown 'fp8'"):
        Policy(str(tiny_vl_path), dtype="fp8")


def test_critic_values_shape_and_own_parameters(tiny_vl_path):
    critic = Critic(str(tiny_vl_path), lr=1e-3)
    ids = torch.randint(20, 300, (3, 9))
    values = critic.values(ids, torch.ones_like(ids), response_len=4)
    assert values.shape == (3, 4) and values.dtype == torch.float32
    values.sum().backward()
    assert critic.value_head.weight.grad is not None and critic.value_head.weight.grad.abs().sum() > 0
    assert critic.param_group()["lr"] == 1e-3


def test_lora_sync_merges_into_copies_and_leaves_the_base_weights_bitwise_unchanged(tiny_text_path):
    """In bf16 (W + delta) - delta != W: merging into the live model and back would move the frozen base weights on
    every sync. The synced weight is W + (B @ A) * alpha / r, summed in float32 and rounded to bf16 once."""
    policy = Policy(str(tiny_text_path), dtype="bfloat16", lora=LoraSettings(rank=4, alpha=8))
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)  # peft starts B at zero: merging would change nothing
    before = {name: param.detach().clone() for name, param in policy.model.named_parameters()}
    synced = [policy.weights_for_sync() for _ in range(3)]
    for name, param in policy.model.named_parameters():
        assert torch.equal(param, before[name]), f"{name} moved"
    layers = [name for name, module in policy.model.named_modules() if hasattr(module, "lora_A")]
    assert len(layers) == 8  # q/k/v/o of 2 layers
    for name in layers:
        weight, a, b = (before[f"{name}.{part}.weight"] for part in ("base_layer", "lora_A.default", "lora_B.default"))
        expected = (weight.float() + (b.float() @ a.float()) * (8 / 4)).to(torch.bfloat16)
        assert not torch.equal(expected, weight)  # the delta shows in bf16
        for sent in synced:
            assert sent[f"{name}.weight"].dtype == torch.bfloat16
            assert torch.equal(sent[f"{name}.weight"], expected), name
    plain = {name.replace(".base_layer", ""): param for name, param in before.items() if "lora_" not in name}
    for sent in synced:
        assert not any("lora_" in key or "base_layer" in key for key in sent)
        assert "lm_head.weight" in sent  # tied head: vLLM loads it under this name
        for key, tensor in plain.items():
            if key.removesuffix(".weight") not in layers:
                assert torch.equal(sent[key], tensor), key
