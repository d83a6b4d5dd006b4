"""Scale-out on CPU (2 gloo processes): one RL step with 2 ranks equals the 1-rank step on the same global batch.

The worker (tests/workers/one_step.py) runs the real training step through torchrun under DDP, ZeRO-2 and ZeRO-3, for
a batch-whitening estimator with seq-mean and a group estimator with token-mean: global whitening, global loss
denominators, gradient accumulation across micro-batches (3 rows each, so several per rank) and the dynamic clipping
threshold and norm must all agree with one process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmmr1.modules.policy import Policy
from lmmr1.rewards.base import RewardOutput
from lmmr1.rollout.base import SamplingConfig
from tests.conftest import sample_experience

ROOT = Path(__file__).resolve().parent.parent
CASES = ["grpo:token-mean", "reinforce_baseline:seq-mean-token-mean"]


@pytest.fixture(scope="module")
def experience(tiny_vl_path, tmp_path_factory) -> Path:
    """16 samples (4 prompts x 4) with response lengths 1..8 and uneven random rewards."""
    from transformers import AutoTokenizer

    rows = [{"message": [{"role": "user", "content": f"What is {i} + {i + 3}?"}], "answer": str(2 * i + 3)}
            for i in range(4)]
    exp = sample_experience(tiny_vl_path, rows, n=4, max_new_tokens=8, seed=3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_vl_path)
    prompt_len = exp.input_ids.shape[1] - exp.response_len
    for i in range(len(exp)):  # uneven lengths, so token-mean and seq-mean differ and shares matter
        length = 1 + (i * 5) % 8
        exp.response_mask[i, length:] = 0
        exp.attention_mask[i, prompt_len + length:] = 0
        exp.input_ids[i, prompt_len + length:] = tokenizer.pad_token_id
    scores = RewardOutput(torch.rand(len(exp), generator=torch.Generator().manual_seed(0)).tolist(), {}, {})
    path = tmp_path_factory.mktemp("scale-out") / "experience.pt"
    torch.save((exp, scores), path)
    return path


def _torchrun(nproc: int, strategy: str, model: Path, experience: Path, out: Path) -> None:
    port = 29500 + (os.getpid() + nproc * 7 + len(strategy)) % 2000
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           str(ROOT / "tests/workers/one_step.py"), str(model), str(experience), str(out), strategy, *CASES]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module")
def reference(tiny_vl_path, experience, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-rank")
    _torchrun(1, "auto", tiny_vl_path, experience, out)
    return out


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_stage_2", "deepspeed_stage_3"])
def test_two_ranks_take_the_one_rank_step(strategy, tiny_vl_path, experience, reference, tmp_path):
    _torchrun(2, strategy, tiny_vl_path, experience, tmp_path)
    initial = {k: v.float() for k, v in Policy(str(tiny_vl_path)).model.state_dict().items()}
    for case in CASES:
        name = case.replace(":", "-")
        one = torch.load(reference / f"auto-{name}.pt")
        two = torch.load(tmp_path / f"{strategy}-{name}.pt")
        assert one["weights"].keys() == two["weights"].keys()
        update_one = torch.cat([(one["weights"][k] - initial[k]).flatten() for k in initial])
        update_two = torch.cat([(two["weights"][k] - initial[k]).flatten() for k in initial])
        assert update_one.norm() > 1e-3  # the step moved the weights
        error = float((update_two - update_one).norm() / update_one.norm())
        assert error < 1e-5, f"{strategy} {case}: the 2-rank update differs from the 1-rank update by {error:.2e}"
        for key in ("train/grad_norm", "train/grad_clip_threshold", "train/grad_clipped"):
            assert two["clip"][key] == pytest.approx(one["clip"][key], rel=1e-5), (strategy, case, key)
        assert one["clip"]["train/grad_clipped"] == 1.0  # clipping was active, so the norm's value mattered


def test_ranks_sample_with_seeds_from_their_prompts_global_positions():
    from types import SimpleNamespace

    from lmmr1.modules.rl_module import RLModule

    module = SimpleNamespace(sampling=SamplingConfig(seed=5))
    rank0 = SimpleNamespace(rows=[{"_position": 8}, {"_position": 9}])
    rank1 = SimpleNamespace(rows=[{"_position": 10}, {"_position": 11}])
    seeds = [RLModule._rollout_seed(module, batch) for batch in (rank0, rank1)]
    assert seeds[0] != seeds[1]  # ranks do not draw identical rollouts
    assert seeds[0] == RLModule._rollout_seed(module, rank0)  # a resumed run repeats them


def test_torchrun_two_local_nodes_train_two_steps(tiny_vl_path, tmp_path):
    """Two torchrun launches on one machine stand for two nodes of one process each (`--trainer.num_nodes 2`):
    Lightning takes the ranks torchrun gives, the run trains 2 steps, and the global batch is split across nodes."""
    lmmr1 = Path(sys.executable).parent / "lmmr1"
    port = 31000 + os.getpid() % 2000
    fit = [str(lmmr1), "fit", "-c", str(ROOT / "configs/demo/smoke.yaml"), "--trainer.num_nodes", "2",
           "--trainer.devices", "1", "--trainer.strategy", "ddp", "--trainer.max_steps", "2",
           "--trainer.limit_val_batches", "0", "--trainer.callbacks", "[{class_path: lightning.pytorch.callbacks."
           "ModelCheckpoint, init_args: {dirpath: ckpt, save_last: true}}]",
           "--model.policy.init_args.path", str(tiny_vl_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               *fit], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank}:\n{output[-4000:]}"
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in output, output[-2000:]  # one world of two
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    assert state["PromptDataModule"]["consumed"] == 8  # 2 steps x the global batch of 4 prompts
