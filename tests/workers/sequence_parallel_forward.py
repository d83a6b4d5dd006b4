"""Worker for tests/test_sequence_parallel.py, started by torchrun: log-probs, entropies, critic values and gradients
of one packed micro-batch with the whole world as one sequence-parallel group.

Each rank's parameter gradients are k x its share (sequence_parallel.py explains why); averaging them over the ranks,
as DDP does, gives the gradient of the unsplit row, which rank 0 writes beside the outputs.

    torchrun --nproc_per_node 2 tests/workers/sequence_parallel_forward.py MODEL INPUTS OUT [ATTENTION DTYPE]

ATTENTION DTYPE = flash_attention_2 bfloat16 runs on one GPU per rank (NCCL, ring-flash-attn) and skips the critic.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from lmmr1.distributed.sequence_parallel import init_sequence_parallel
from lmmr1.modules.critic import Critic
from lmmr1.modules.policy import Policy


def averaged_gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in module.named_parameters():
        if param.grad is not None:
            grad = param.grad.clone()
            dist.all_reduce(grad)
            out[name] = (grad / dist.get_world_size()).float().cpu()
    return out


def every_rank(value: int) -> list[int]:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def main(model: str, inputs_path: str, out: str, attention: str = "sdpa", dtype: str = "float32") -> None:
    gpu = attention == "flash_attention_2"
    dist.init_process_group("nccl" if gpu else "gloo")
    world = dist.get_world_size()
    device = torch.device("cuda", dist.get_rank()) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    init_sequence_parallel(world)
    inputs, mask = torch.load(inputs_path, weights_only=False)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    mask = mask.to(device)
    results = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        policy = Policy(model, dtype=dtype, attn_implementation=attention, packing=True, sequence_parallel_size=world,
                        gradient_checkpointing=checkpointing).to(device)
        lengths = []  # what the decoder ran on: this rank's slice, not the whole row
        policy.model.model.language_model.register_forward_hook(
            lambda module, args, output: lengths.append(output.last_hidden_state.shape[1]))
        logprobs, entropy = policy.logprobs(**inputs)
        ((logprobs * mask).sum() + (entropy * mask).sum()).backward()
        results[f"policy-{checkpointing}"] = {"logprobs": logprobs.detach().cpu(), "entropy": entropy.detach().cpu(),
                                               "grads": averaged_gradients(policy),
                                               "decoder_lengths": every_rank(lengths[0])}
    if gpu:
        return _finish(results, out)
    torch.manual_seed(0)
    critic = Critic(model, packing=True)
    critic.follow_sequence_parallel(world)
    values = critic.values(**inputs)
    (values * mask).sum().backward()
    results["critic"] = {"values": values.detach(), "grads": averaged_gradients(critic)}
    _finish(results, out)


def _finish(results: dict, out: str) -> None:
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.destroy_process_group()  # gloo aborts at exit otherwise


if __name__ == "__main__":
    main(*sys.argv[1:])
