"""HFCheckpoint writes the trained policy as Hugging Face folders; `lmmr1 model export` reads DeepSpeed checkpoint
folders, and under ZeRO-3 (2 CPU processes) both paths give the same trained model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import AutoModelForImageTextToText

from lmmr1.callbacks.hf_checkpoint import HFCheckpoint
from lmmr1.data.processor import PromptProcessor
from lmmr1.models.cli import main as model_main
from lmmr1.models.export import export_checkpoint, save_hf_folder
from lmmr1.modules.algorithm_config import AlgorithmConfig
from lmmr1.modules.policy import LoraSettings, Policy
from lmmr1.modules.rl_module import RLModule
from lmmr1.rewards import Reward, RewardOutput
from lmmr1.rollout.base import SamplingConfig

LMMR1 = Path(sys.executable).parent / "lmmr1"
IDS = torch.randint(20, 300, (2, 12), generator=torch.Generator().manual_seed(0))


class LengthReward(Reward):
    """Longer responses score higher: varied within a group, so GRPO moves a random model's weights."""

    name = "length"

    def __call__(self, responses, rows) -> RewardOutput:  # noqa: ANN001
        scores = [len(r) / 20 for r in responses]
        return RewardOutput(total=scores, components={"length": scores})


def _logits(model) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits


class Snapshots(L.Callback):
    """The policy's HF weights after each step (runs after HFCheckpoint, so it sees what that callback wrote; with
    LoRA the names carry peft's `base_layer` / `lora_` parts)."""

    def __init__(self) -> None:
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.after[trainer.global_step] = {k: v.clone() for k, v in pl_module.policy.model.state_dict().items()}


def _fit(tiny_vl_path, mixed_rows, tmp_path, lora=None):  # noqa: ANN001, ANN202
    proc = PromptProcessor(tiny_vl_path)
    module = RLModule(policy=Policy(str(tiny_vl_path), lora=lora), reward=LengthReward(),
                      sampling=SamplingConfig(n=4, max_new_tokens=8), algorithm=AlgorithmConfig(kl={"coef": 0.0}),
                      optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    initial = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    snapshots = Snapshots()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path,
                        callbacks=[HFCheckpoint(every_n_steps=1), snapshots])
    trainer.fit(module, train_dataloaders=DataLoader([proc(mixed_rows[:2]), proc(mixed_rows[2:])], batch_size=None))
    return module, initial, snapshots.after


def test_step_and_final_folders_hold_the_trained_policy(tiny_vl_path, mixed_rows, tmp_path):
    module, _, after = _fit(tiny_vl_path, mixed_rows, tmp_path)
    hf = tmp_path / "hf"  # default dirpath: <default_root_dir>/hf
    assert sorted(p.name for p in hf.iterdir()) == ["final", "step_1", "step_2"]  # no partial folders left
    for name, step in [("step_1", 1), ("step_2", 2), ("final", 2)]:
        saved = AutoModelForImageTextToText.from_pretrained(hf / name).state_dict()
        expected = after[step]
        assert saved.keys() == expected.keys(), name
        for key, value in expected.items():
            assert torch.equal(saved[key], value), (name, key)
    trained = AutoModelForImageTextToText.from_pretrained(hf / "final")
    assert torch.equal(_logits(trained), _logits(module.policy.model))
    assert not torch.equal(_logits(trained), _logits(AutoModelForImageTextToText.from_pretrained(hf / "step_1")))
    for name in ("tokenizer.json", "preprocessor_config.json", "chat_template.jinja"):
        assert (hf / "final" / name).exists(), name


def test_lora_folder_is_merged_and_training_keeps_its_adapters(tiny_vl_path, mixed_rows, tmp_path):
    module, initial, _ = _fit(tiny_vl_path, mixed_rows, tmp_path, lora=LoraSettings(rank=4, alpha=8))
    for name, param in module.policy.named_parameters():  # saving never merged adapters into the frozen weights
        assert ("lora_" in name) or torch.equal(param, initial[name]), name
    final = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf" / "final")
    assert not any("lora" in n for n, _ in final.named_parameters())
    assert any("lora_" in n for n, _ in module.policy.model.named_parameters())  # adapters not merged away
    torch.testing.assert_close(_logits(final), _logits(module.policy.model), atol=1e-5, rtol=1e-5)


def _zero3_fit(tiny_vl_path: Path, cwd: Path, max_steps: int, ckpt_path: Path | None = None) -> None:
    """`lmmr1 fit` of the smoke config under ZeRO-3 on 2 CPU processes (text-only data) in `cwd`: a DeepSpeed
    checkpoint folder at ckpt/last.ckpt and HFCheckpoint's folders under run/hf."""
    cwd.mkdir(parents=True, exist_ok=True)
    # the random model never earns the math reward (zero advantages, nothing to learn): reward length instead
    (cwd / "length.py").write_text("def length(responses, rows):\n    return [len(r) / 20 for r in responses]\n")
    callbacks = ("[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {dirpath: ckpt, save_last: "
                 "true}}, {class_path: lmmr1.callbacks.hf_checkpoint.HFCheckpoint}]")
    command = [str(LMMR1), "fit", "-c", str(Path(__file__).parents[1] / "configs" / "demo" / "smoke.yaml"),
               "--trainer.devices", "2", "--trainer.strategy", "deepspeed_stage_3",
               "--trainer.max_steps", str(max_steps), "--trainer.default_root_dir", "run", "--trainer.logger", "false",
               "--trainer.limit_val_batches", "0", "--trainer.callbacks", callbacks,
               "--model.policy.init_args.path", str(tiny_vl_path), "--model.reward", "length.py:length",
               "--model.optimizer.init_args.lr", "1e-2",
               "--data.datasets", "[{path: data/smoke/arith/data.jsonl, make: {kind: arith, n: 64, seed: 0}}]"]
    if ckpt_path is not None:
        command += ["--ckpt_path", str(ckpt_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def zero3_two_steps(tiny_vl_path, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("zero3-two-steps")
    _zero3_fit(tiny_vl_path, cwd, max_steps=2)
    return cwd


def test_deepspeed_zero3_folder_export_equals_the_weight_stream_of_the_same_run(zero3_two_steps, tiny_vl_path,
                                                                                  tmp_path):
    """A real ZeRO-3 run: the exported checkpoint folder (merged by DeepSpeed from the optimizer's fp32 shards) and
    HFCheckpoint's final folder (written from the weight stream an engine gets: parameters gathered by
    `GatheredParameters`) hold the same trained weights, and they are not the untrained ones."""
    checkpoint = zero3_two_steps / "ckpt" / "last.ckpt"
    assert (checkpoint / "latest").is_file()  # a DeepSpeed folder, not a file
    final_folder = zero3_two_steps / "run" / "hf" / "final"
    exported = AutoModelForImageTextToText.from_pretrained(export_checkpoint(checkpoint, tmp_path / "exported"))
    final = AutoModelForImageTextToText.from_pretrained(final_folder)
    untrained = AutoModelForImageTextToText.from_pretrained(tiny_vl_path)
    assert torch.equal(_logits(exported), _logits(final))
    assert not torch.allclose(_logits(exported), _logits(untrained), atol=1e-3)
    for name, value in final.state_dict().items():
        assert torch.equal(exported.state_dict()[name], value), name
    stored = [set(load_file(folder / "model.safetensors")) for folder in (tmp_path / "exported", final_folder)]
    assert stored[0] == stored[1]  # the tied LM head gathered from ZeRO-3 is stored once, as export stores it


def test_deepspeed_zero3_two_steps_resumed_for_two_more_equal_four_steps(zero3_two_steps, tiny_vl_path, tmp_path):
    """Resume from the ZeRO-3 checkpoint folder (sharded weights, optimizer state, prompt position, clip history):
    the resumed run ends on exactly the weights of an uninterrupted 4-step run."""
    _zero3_fit(tiny_vl_path, tmp_path / "resumed", max_steps=4, ckpt_path=zero3_two_steps / "ckpt" / "last.ckpt")
    _zero3_fit(tiny_vl_path, tmp_path / "straight", max_steps=4)
    resumed, straight, two = (AutoModelForImageTextToText.from_pretrained(root / "run" / "hf" / "final").state_dict()
                              for root in (tmp_path / "resumed", tmp_path / "straight", zero3_two_steps))
    assert resumed.keys() == straight.keys()
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name
    assert any(not torch.equal(two[name], value) for name, value in straight.items())  # steps 3-4 moved the weights


def test_a_folder_that_is_not_a_deepspeed_checkpoint_is_named_with_what_is_missing(tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ValueError, match=f"{plain}: not a DeepSpeed checkpoint folder \\(no 'latest' file"):
        export_checkpoint(plain, tmp_path / "out")
    (plain / "latest").write_text("checkpoint")
    (plain / "checkpoint").mkdir()
    with pytest.raises(ValueError, match="checkpoint: no mp_rank_00_model_states.pt or zero_pp_rank_0"):
        export_checkpoint(plain, tmp_path / "out")
    assert model_main(["export", str(plain), str(tmp_path / "out")]) == 2  # the CLI prints the message, no traceback
    assert "lmmr1 model export:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_folder_holding_other_files_is_never_replaced(tiny_vl_path, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a model folder"):
        save_hf_folder(Policy(str(tiny_vl_path)).model, tiny_vl_path, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
