"""Every model family in the README's table trains: a tiny random model of each (`lmmr1 model tiny --family F`) goes
through one `lmmr1 fit` step on a batch of image and text rows; the engine's log-probs equal training's; packing equals
padding (or is refused by name); `freeze: [vision]` freezes exactly the family's tower; an exported folder reloads to
the same logits; SFT's CTC phase reads each family's image features."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from lmmr1.cli import main
from lmmr1.data.processor import PromptProcessor
from lmmr1.models.cli import main as model_main
from lmmr1.models.export import save_hf_folder
from lmmr1.models.families import FAMILIES, family_of
from lmmr1.modules.experience import Experience
from lmmr1.modules.policy import Policy, load_hf_model
from lmmr1.rollout.base import SamplingConfig
from lmmr1.rollout.hf import HFEngine

VL_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "llava"]
SMOKE = str(Path(__file__).parents[1] / "configs" / "demo" / "smoke.yaml")


@pytest.fixture(scope="module", params=VL_FAMILIES)
def family_path(request, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(request.param, numbered=False) / "model"
    assert model_main(["tiny", "--family", request.param, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def rollout(family_path, tmp_path_factory):
    """(processor, policy, experience) of one sampled rollout on two image rows and two text rows."""
    from tests.conftest import mixed_rows as rows_of  # the same rows as every other engine test

    rows = rows_of.__wrapped__(tmp_path_factory.mktemp("rows"))
    proc = PromptProcessor(family_path)
    policy = Policy(str(family_path))
    engine = HFEngine()
    engine.bind(policy, proc.tokenizer)
    batch = proc(rows)
    completions = engine.generate(batch, SamplingConfig(n=2, max_new_tokens=6, temperature=0.7), seed=1)
    return proc, policy, Experience.from_rollout(batch, completions, proc.tokenizer.pad_token_id), rows


def test_the_adapter_is_chosen_from_the_folders_model_type(family_path):
    proc = PromptProcessor(family_path)
    assert proc.family is FAMILIES[family_path.parent.name]
    assert proc.image_processor is not None


def test_engine_logprobs_equal_training_logprobs(rollout):
    proc, policy, exp, _ = rollout
    assert any(p is not None for p in exp.pixel_values) and any(p is None for p in exp.pixel_values)
    with torch.no_grad():
        logprobs, _ = policy.logprobs(**exp.model_inputs(), temperature=0.7)
    mask = exp.response_mask.bool()
    torch.testing.assert_close(logprobs[mask], exp.rollout_logprobs[mask], atol=1e-4, rtol=0)
    banned = set(family_of(policy.model.config).banned_token_ids(proc.tokenizer))
    assert banned and not banned & set(exp.input_ids[:, -exp.response_len :][mask].tolist())


def test_packing_equals_padding_or_is_refused_by_name(rollout, family_path):
    _, policy, exp, _ = rollout
    if not family_of(policy.model.config).supports_packing:
        with pytest.raises(ValueError, match="does not support packing"):
            Policy(str(family_path), packing=True)
        return
    with torch.no_grad():
        padded, _ = policy.logprobs(**exp.model_inputs())
        policy.packing = True
        try:
            packed, _ = policy.logprobs(**exp.model_inputs())
            shared, _ = policy.logprobs(**exp.model_inputs(share_prompts=True))  # each prompt once
        finally:
            policy.packing = False
    mask = exp.response_mask.bool()
    torch.testing.assert_close(packed[mask], padded[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(shared[mask], padded[mask], atol=1e-5, rtol=0)


def test_freeze_vision_is_the_familys_tower(family_path):
    policy = Policy(str(family_path), freeze=["vision"])
    prefixes = family_of(policy.model.config).vision_prefixes
    frozen = {n for n, p in policy.model.named_parameters() if not p.requires_grad}
    tower = {n for n, _ in policy.model.named_parameters() if any(f".{p}" in f".{n}" for p in prefixes)}
    assert frozen == tower and tower
    assert any(p.requires_grad for n, p in policy.model.named_parameters() if "language_model" in n)


def test_export_and_reload_give_the_same_logits(rollout, family_path, tmp_path):
    proc, policy, _, rows = rollout
    out = save_hf_folder(policy.model, family_path, tmp_path / "exported")
    reloaded = load_hf_model(str(out), "float32").eval()
    batch, again = proc(rows), PromptProcessor(out)(rows)
    assert torch.equal(batch.input_ids, again.input_ids)
    assert all(torch.equal(a, b) for a, b in zip(batch.pixel_values[:2], again.pixel_values[:2]))
    family = family_of(policy.model.config)
    grids = [g for g in batch.image_grid_thw[:1] if g is not None]
    inputs = dict(input_ids=batch.input_ids[:1], attention_mask=batch.attention_mask[:1],
                  **family.image_inputs(policy.model.config, batch.input_ids[:1], batch.pixel_values[0],
                                        grids[0] if grids else None, generation=True))
    policy.model.eval()
    try:
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**inputs).logits, policy.model(**inputs).logits, atol=0, rtol=0)
    finally:
        policy.model.train()


def test_sft_ctc_phase_reads_the_familys_image_features(family_path, mixed_rows):
    from lmmr1.modules.sft_module import SFTModule

    module = SFTModule(Policy(str(family_path)))
    module.setup("fit")
    batch = PromptProcessor(family_path)([{**r, "answer": "ab"} for r in mixed_rows[:2]])  # one image per row
    loss = module.ctc_loss(batch)
    assert torch.isfinite(loss) and loss > 0  # >= 4 frames per image: "ab" has an alignment
    loss.backward()
    prefixes = family_of(module.policy.model.config).vision_prefixes
    trained = {n for n, p in module.policy.model.named_parameters() if p.grad is not None}
    assert any(f".{p}" in f".{n}" for n in trained for p in prefixes)  # the tower learns
    assert not {n for n in trained if "language_model" in n and ".layers." in n}  # the LM never runs


@pytest.fixture(scope="module")
def fit_cwd(tmp_path_factory) -> Path:
    """One folder for every family's run: the smoke data (`make:`) is generated once."""
    return tmp_path_factory.mktemp("fit")


def test_one_fit_step_on_image_and_text_rows(family_path, fit_cwd, monkeypatch):
    monkeypatch.chdir(fit_cwd)
    root = fit_cwd / family_path.parent.name
    main(["fit", "-c", SMOKE, "--model.policy.init_args.path", str(family_path), "--trainer.max_steps", "1",
          "--trainer.default_root_dir", str(root), "--trainer.limit_val_batches", "0",
          "--model.sampling.n", "2", "--model.sampling.max_new_tokens", "6", "--data.batch_size", "6"])
    with open(root / "csv" / "version_0" / "metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(logged) == 1 and math.isfinite(float(logged[0]["train/loss"]))
    samples = [json.loads(line) for line in (root / "csv" / "version_0" / "samples.jsonl").read_text().splitlines()]
    assert {s["datasource"] for s in samples} == {"arith", "image_arith"}  # the step's batch: image and text rows
