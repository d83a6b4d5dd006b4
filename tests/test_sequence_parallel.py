"""Sequence parallelism on CPU (2 gloo processes): a packed row split over 2 ranks gives the unsplit numbers.

The micro-batch mixes image and text rows whose packed sequences straddle the split point, with a text row shorter
than one slice and an odd packed length (so the row is padded to split evenly). Log-probs, entropies and critic values
must match the 1-process packed forward, and the averaged gradients (as DDP averages them) its gradients, with and
without gradient checkpointing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from lmmr1.distributed.sequence_parallel import SequenceParallel, init_sequence_parallel, split_row
from lmmr1.models.families.gemma3 import Gemma3
from lmmr1.models.families.qwen_vl import Qwen3VL
from lmmr1.modules.critic import Critic
from lmmr1.modules.packing import pack_rows, rope_positions
from lmmr1.modules.policy import Policy
from tests.test_packing import _rollout_like

ROOT = Path(__file__).resolve().parent.parent


def _torchrun(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    port = 29500 + (os.getpid() * 13 + len(script)) % 2000
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(ROOT / "tests/workers" / script), *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def split_batch(tiny_vl_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sp-rows")
    rows = []
    for i, size in enumerate([(56, 56), (84, 112)]):
        path = folder / f"img{i}.png"
        Image.new("RGB", size, (40 * i, 100, 200)).save(path)
        rows.append({"message": [{"role": "user", "content": [{"type": "image", "image": str(path)},
                                                              {"type": "text", "text": f"What is {i} + 2?"}]}]})
    rows.append({"message": [{"role": "user", "content": "Hi?"}]})  # shorter than one slice
    rows.append({"message": [{"role": "user", "content": "A longer question, so prompts are padded unevenly?"}]})
    inputs, mask = _rollout_like(tiny_vl_path, rows, [5, 2, 7, 1])
    packed_length = int(inputs["attention_mask"].sum())
    if packed_length % 2 == 0:  # make the row odd, so the split pads it
        inputs["attention_mask"][3, -inputs["response_len"] + 1] = 1
        mask[3, 1] = 1
        packed_length += 1
    path = folder / "inputs.pt"
    torch.save((inputs, mask), path)
    return path, inputs, mask, packed_length


def test_split_row_slices_every_sequence_at_the_right_place(tiny_vl_path, split_batch):
    _, inputs, _, packed_length = split_batch
    policy = Policy(str(tiny_vl_path), packing=True)
    positions = rope_positions(policy.model.model, inputs["input_ids"], inputs["attention_mask"],
                               inputs["image_grid_thw"])
    packed = pack_rows(inputs["input_ids"], inputs["attention_mask"], inputs["response_len"], positions)
    halves = [split_row(packed.position_ids[0], SequenceParallel(rank=r, size=2)) for r in range(2)]
    assert halves[0].length == packed_length and halves[0].padded == packed_length + 1
    ids = halves[0].sequence_ids
    boundary = halves[0].chunk
    assert ids[boundary - 1] == ids[boundary], "a sequence must straddle the split point for the test to mean much"
    assert len(set(ids[:packed_length].tolist())) == 4 and ids[-1] == 5  # 4 rows, then the padding's own sequence
    # each rank's mask row of a query equals the unsplit causal block-diagonal mask row
    whole = (ids[:, None] == ids[None, :]) & torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
    assert torch.equal(torch.cat([h.local_mask(torch.device("cpu")) for h in halves]), whole)


@pytest.mark.timeout(420)
def test_two_rank_split_equals_the_unsplit_row(tiny_vl_path, split_batch, tmp_path):
    path, inputs, mask, _ = split_batch
    _torchrun("sequence_parallel_forward.py", str(tiny_vl_path), str(path), str(tmp_path / "sp.pt"))
    split = torch.load(tmp_path / "sp.pt", weights_only=False)
    for checkpointing in (False, True):
        torch.manual_seed(0)
        policy = Policy(str(tiny_vl_path), packing=True, gradient_checkpointing=checkpointing)
        logprobs, entropy = policy.logprobs(**inputs)
        ((logprobs * mask).sum() + (entropy * mask).sum()).backward()
        got = split[f"policy-{checkpointing}"]
        assert got["decoder_lengths"] == [(inputs["attention_mask"].sum().item() + 1) // 2] * 2  # each rank: a half
        torch.testing.assert_close(got["logprobs"] * mask, logprobs.detach() * mask, atol=1e-5, rtol=0)
        torch.testing.assert_close(got["entropy"] * mask, entropy.detach() * mask, atol=1e-5, rtol=0)
        _assert_gradients_match(policy, got["grads"], f"policy (checkpointing={checkpointing})")
    torch.manual_seed(0)
    critic = Critic(str(tiny_vl_path), packing=True)
    values = critic.values(**inputs)
    (values * mask).sum().backward()
    torch.testing.assert_close(split["critic"]["values"] * mask, values.detach() * mask, atol=1e-5, rtol=0)
    _assert_gradients_match(critic, split["critic"]["grads"], "critic")


def _assert_gradients_match(module: torch.nn.Module, grads: dict[str, torch.Tensor], what: str) -> None:
    expected = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys(), what
    assert any("visual" in n for n in expected), "the vision tower must get gradient for the test to cover images"
    for name, grad in expected.items():
        error = float((grads[name] - grad).norm() / grad.norm().clamp(min=1e-12))
        assert error <= 1e-5, f"{what}: {name} gradient differs by {error:.2e} (relative)"


def _fit(tiny_vl_path: Path, cwd: Path, devices: int) -> dict[str, torch.Tensor]:
    """2 steps of `lmmr1 fit` on the smoke config (text and image prompts, packing) in `cwd` (its data is made there);
    the final weights."""
    from transformers import AutoModelForImageTextToText

    cwd.mkdir(parents=True, exist_ok=True)
    # the random model never earns the math reward (zero advantages, nothing to learn): reward length instead
    (cwd / "length.py").write_text("def length(responses, rows):\n    return [len(r) / 20 for r in responses]\n")
    command = [str(Path(sys.executable).parent / "lmmr1"), "fit", "-c", str(ROOT / "configs/demo/smoke.yaml"),
               "--trainer.devices", str(devices), "--trainer.max_steps", "2", "--trainer.default_root_dir", "run",
               "--trainer.logger", "false", "--trainer.limit_val_batches", "0",
               "--trainer.callbacks", "[{class_path: lmmr1.callbacks.hf_checkpoint.HFCheckpoint}]",
               "--model.policy.init_args.path", str(tiny_vl_path), "--model.policy.init_args.packing", "true",
               "--model.reward", "length.py:length", "--model.optimizer.init_args.lr", "1e-2"]
    if devices > 1:
        command += ["--trainer.strategy", "ddp", "--model.policy.init_args.sequence_parallel_size", str(devices)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    if devices > 1:
        line = f"sequence parallelism: 1 data-parallel replica(s) x {devices} ranks per packed row"
        assert line in result.stdout + result.stderr
    model = AutoModelForImageTextToText.from_pretrained(cwd / "run" / "hf" / "final")
    return {k: v.float() for k, v in model.state_dict().items()}


@pytest.mark.timeout(900)
def test_fit_with_one_sequence_parallel_group_of_two_takes_the_one_process_steps(tiny_vl_path, tmp_path):
    """`lmmr1 fit --trainer.devices 2 --model.policy.init_args.sequence_parallel_size 2` (one data-parallel replica)
    updates the policy as one process does on the same prompts (the same rollouts, every row split over 2 ranks)."""
    from transformers import AutoModelForImageTextToText

    one, two = _fit(tiny_vl_path, tmp_path / "one", 1), _fit(tiny_vl_path, tmp_path / "two", 2)
    initial = {k: v.float() for k, v in AutoModelForImageTextToText.from_pretrained(tiny_vl_path).state_dict().items()}
    update_one = torch.cat([(one[k] - initial[k]).flatten() for k in initial])
    update_two = torch.cat([(two[k] - initial[k]).flatten() for k in initial])
    assert update_one.norm() > 1e-3  # the steps moved the weights
    error = float((update_two - update_one).norm() / update_one.norm())
    print(f"relative update error {error:.2e}")
    assert error < 1e-4, f"the sequence-parallel run's update differs from the 1-process update by {error:.2e}"


def test_config_errors_name_the_option(tiny_vl_path):
    with pytest.raises(ValueError, match=r"sequence_parallel_size: 2 splits packed rows; set .*packing true"):
        Policy(str(tiny_vl_path), sequence_parallel_size=2)
    with pytest.raises(ValueError, match=r"sequence_parallel_size: 2 does not divide the world size 1"):
        init_sequence_parallel(2)
    with pytest.raises(ValueError, match="qwen3_vl family does not support sequence parallelism"):
        Qwen3VL().check_sequence_parallel()
    with pytest.raises(ValueError, match="gemma3 family does not support packing"):
        Gemma3().check_packing()


@pytest.mark.gpu
@pytest.mark.timeout(600)
@pytest.mark.parametrize("model", ["tiny", "mini"])
def test_ring_flash_attention_split_equals_flash_attention_on_gpus(model, tiny_vl_path, split_batch, tmp_path):
    """GPU: ring-flash-attn over 2 GPUs (NCCL) against flash-attn on one, bf16, on the tiny and the mini model."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs (one per rank)")
    from lmmr1.models.mini import default_mini_dir

    path = tiny_vl_path if model == "tiny" else default_mini_dir()
    if not (Path(path) / "config.json").is_file():
        pytest.skip(f"{path}: no model (lmmr1 model prepare-mini)")
    batch_path, inputs, mask, _ = split_batch
    _torchrun("sequence_parallel_forward.py", str(path), str(batch_path), str(tmp_path / "sp.pt"),
              "flash_attention_2", "bfloat16")
    got = torch.load(tmp_path / "sp.pt", weights_only=False)["policy-False"]
    policy = Policy(str(path), dtype="bfloat16", attn_implementation="flash_attention_2", packing=True).cuda()
    logprobs, entropy = policy.logprobs(**{k: v.cuda() if isinstance(v, torch.Tensor) else v
                                           for k, v in inputs.items()})
    # bf16 kernels differ in their summation order: compare within bf16 resolution of the log-probs
    torch.testing.assert_close(got["logprobs"] * mask, logprobs.float().cpu().detach() * mask, atol=5e-2, rtol=0)
    torch.testing.assert_close(got["entropy"] * mask, entropy.float().cpu().detach() * mask, atol=5e-2, rtol=0)
