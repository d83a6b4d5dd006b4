"""LoRA trains only adapters; `lmmr1 model export` writes a folder whose logits equal the trained policy's."""

from __future__ import annotations

import torch
from transformers import AutoModelForImageTextToText

from lmmr1.models.cli import main as model_main
from lmmr1.modules.policy import LoraSettings, Policy


def _train(policy: Policy, steps: int = 2) -> None:
    """Two steps: LoRA's B starts at zero, so A only gets a gradient from the second step on."""
    ids = torch.randint(20, 300, (2, 10))
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        logprobs, _ = policy.logprobs(ids, torch.ones_like(ids), response_len=4)
        (-logprobs.mean()).backward()
        optimizer.step()
        optimizer.zero_grad()


def _logits(model, ids):  # noqa: ANN001
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _save_checkpoint(policy: Policy, path):  # noqa: ANN001
    state = {f"policy.{k}": v for k, v in policy.state_dict().items()}
    torch.save({"policy_settings": policy.settings(), "state_dict": state}, path)


def test_lora_changes_only_adapters_and_merged_export_matches(tiny_vl_path, tmp_path):
    policy = Policy(str(tiny_vl_path), lora=LoraSettings(rank=4, alpha=8))
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    _train(policy)
    for name, param in policy.named_parameters():
        changed = not torch.equal(before[name], param)
        assert changed == ("lora_" in name), name  # adapters moved, base weights did not
    ids = torch.randint(20, 300, (2, 12))
    adapted = _logits(policy.model, ids)
    _save_checkpoint(policy, tmp_path / "lora.ckpt")
    assert model_main(["export", str(tmp_path / "lora.ckpt"), str(tmp_path / "out")]) == 0
    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert not any("lora" in n for n, _ in exported.named_parameters())
    torch.testing.assert_close(_logits(exported, ids), adapted, atol=1e-5, rtol=1e-5)


def test_full_export_round_trip(tiny_vl_path, tmp_path):
    policy = Policy(str(tiny_vl_path))
    _train(policy)
    _save_checkpoint(policy, tmp_path / "full.ckpt")
    model_main(["export", str(tmp_path / "full.ckpt"), str(tmp_path / "out")])
    ids = torch.randint(20, 300, (2, 12))
    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(_logits(exported, ids), _logits(policy.model, ids), atol=0, rtol=0)
    assert (tmp_path / "out" / "preprocessor_config.json").exists()
    assert (tmp_path / "out" / "tokenizer.json").exists()
