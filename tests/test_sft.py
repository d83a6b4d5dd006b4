"""SFT module (vision alignment): the loss is the answer tokens' cross-entropy, only unfrozen weights move, and
validation scores greedy exact match through the engine."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lmmr1.data.processor import PromptProcessor
from lmmr1.modules.policy import Policy
from lmmr1.modules.sft_module import SFTModule


def _module(path, **policy):
    module = SFTModule(Policy(str(path), **policy), optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    module.setup("fit")
    return module


def test_loss_is_the_cross_entropy_of_answer_and_end_of_turn(tiny_vl_path, mixed_rows):
    module = _module(tiny_vl_path)
    batch = PromptProcessor(tiny_vl_path)(mixed_rows)
    inputs, mask = module.targets(batch)
    eos = module.tokenizer.eos_token_id
    first = module.tokenizer(mixed_rows[0]["answer"], add_special_tokens=False)["input_ids"] + [eos]
    assert inputs["input_ids"][0, -inputs["response_len"]:][: len(first)].tolist() == first
    assert mask.sum(-1).tolist() == [len(module.tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) + 1
                                     for r in mixed_rows]
    loss, _ = module.loss(batch)
    # reference: transformers' own causal-LM loss with every non-target position labelled -100
    labels = inputs["input_ids"].clone()
    labels[:, : -inputs["response_len"]] = -100
    labels[:, -inputs["response_len"]:][mask == 0] = -100
    extra = {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"],
             "mm_token_type_ids": (inputs["input_ids"] == module.policy.model.config.image_token_id).int()}
    reference = module.policy.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                    labels=labels, **extra).loss
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)


def test_missing_target_names_the_row(tiny_vl_path, mixed_rows):
    module = _module(tiny_vl_path)
    rows = [dict(mixed_rows[0]), {k: v for k, v in mixed_rows[1].items() if k != "answer"}]
    with pytest.raises(ValueError, match="mem:2: 'answer' is missing or empty"):
        module.targets(PromptProcessor(tiny_vl_path)(rows))


def test_vision_alignment_trains_only_the_vision_tower_and_validates_exact_match(tiny_vl_path, mixed_rows, tmp_path):
    module = _module(tiny_vl_path, freeze=["language_model.", "lm_head"], packing=True)
    batch = PromptProcessor(tiny_vl_path)(mixed_rows[:2])  # the two image rows
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    first = float(module.loss(batch)[0])
    trainer = L.Trainer(accelerator="cpu", max_steps=30, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=DataLoader([batch] * 30, batch_size=None),
                val_dataloaders=DataLoader([batch], batch_size=None))
    for name, p in module.policy.named_parameters():
        moved = not torch.equal(before[name], p)
        assert moved == (".visual." in f".{name}"), name  # every vision weight trains, nothing else does
    # the random tiny LM lets image features shift its answer only a little, but the loss must go down
    assert float(module.loss(batch)[0]) < first - 0.1
    # the logged exact match is what greedy decoding through the engine gives
    completions = module.engine.generate(batch, module.decoding)
    expected = sum(g[0].text.strip() == r["answer"] for g, r in zip(completions, batch.rows)) / 2
    assert trainer.callback_metrics["val/0/exact"].item() == pytest.approx(expected)
    assert trainer.callback_metrics["val/0/image_arith/exact"].item() == pytest.approx(expected)
    # the aligned model exports like an RL checkpoint: the folder reproduces the trained vision tower
    from transformers import AutoModelForImageTextToText

    from lmmr1.models.export import export_checkpoint

    trainer.save_checkpoint(tmp_path / "sft.ckpt")
    exported = AutoModelForImageTextToText.from_pretrained(export_checkpoint(tmp_path / "sft.ckpt", tmp_path / "out"))
    for name, p in module.policy.model.named_parameters():
        assert torch.equal(exported.get_parameter(name), p.detach()), name


def _ctc_reference(scores: torch.Tensor, target: list[int], blank: int) -> torch.Tensor:
    """-log of the summed probability of every frame labelling that collapses to `target` (repeats merged, blanks
    dropped), by enumeration, divided by the target length (ctc_loss's 'mean' reduction)."""
    import itertools

    logp = scores.float().log_softmax(-1)
    total = []
    for path in itertools.product([blank, *set(target)], repeat=logp.shape[0]):
        collapsed = [t for i, t in enumerate(path) if t != blank and (i == 0 or path[i - 1] != t)]
        if collapsed == target:
            total.append(sum(logp[i, t] for i, t in enumerate(path)))
    return -torch.logsumexp(torch.stack(total), 0) / len(target)


def test_ctc_phase_loss_equals_enumerated_alignments(tiny_vl_path, mixed_rows):
    module = _module(tiny_vl_path)
    module.ctc_steps = 1
    row = {**mixed_rows[0], "answer": "ab"}  # 56x56 picture: 4 image tokens
    batch = PromptProcessor(tiny_vl_path)([row])
    loss = module.ctc_loss(batch)
    features = module.policy.model.model.get_image_features(batch.pixel_values[0], batch.image_grid_thw[0])
    target = module.tokenizer("ab", add_special_tokens=False)["input_ids"]
    blank = module.tokenizer(" ", add_special_tokens=False)["input_ids"][0]
    classes = sorted(set(target) | {blank})
    cosine = torch.nn.functional.cosine_similarity(features.pooler_output[0][:, None],
                                                   module.policy.model.get_input_embeddings().weight[classes][None], -1)
    scores = torch.full((4, max(classes) + 1), -1e9)  # tokens outside the batch's classes get no probability
    scores[:, classes] = module.ctc_scale * cosine
    assert 1 <= len(target) <= 2
    torch.testing.assert_close(loss, _ctc_reference(scores, target, blank), atol=1e-4, rtol=1e-4)
    loss.backward()  # the CTC phase reaches the vision tower only: the LM never runs
    assert module.policy.model.model.visual.merger.mlp[-1].weight.grad is not None
    assert all(p.grad is None for n, p in module.policy.named_parameters() if "layers." in n and "visual" not in n)


def test_ctc_phase_needs_one_image_per_row(tiny_vl_path, mixed_rows):
    module = _module(tiny_vl_path)
    with pytest.raises(ValueError, match="mem:3: the CTC phase .* needs exactly one image per row"):
        module.ctc_loss(PromptProcessor(tiny_vl_path)(mixed_rows[:3]))


def test_ctc_phase_refuses_a_family_without_image_features(tiny_vl_path, mixed_rows, monkeypatch):
    from lmmr1.models.families.base import Family

    module = _module(tiny_vl_path)
    monkeypatch.setattr(type(module.policy.family), "image_features", Family.image_features)  # as a new adapter
    with pytest.raises(ValueError, match="--model.init_args.ctc_steps: .* qwen2_5_vl family"):
        module.ctc_loss(PromptProcessor(tiny_vl_path)(mixed_rows[:2]))
