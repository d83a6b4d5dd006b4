"""Worker for tests/test_sequence_parallel.py, started by torchrun: log-probs, entropies, critic values and gradients
of one packed micro-batch with the whole world as one sequence-parallel group.

Each rank's parameter gradients are k x its share (sequence_parallel.py explains why); averaging them over the ranks,
as DDP does, gives the gradient of the unsplit row, which rank 0 writes beside the outputs.

    torchrun --nproc_per_node 2 tests/workers/sequence_parallel_forward.py MODEL INPUTS OUT
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
            out[name] = grad / dist.get_world_size()
    return out


def every_rank(value: int) -> list[int]:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def main(model: str, inputs_path: str, out: str) -> None:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    init_sequence_parallel(world)
    inputs, mask = torch.load(inputs_path, weights_only=False)
    results = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        policy = Policy(model, packing=True, sequence_parallel_size=world, gradient_checkpointing=checkpointing)
        lengths = []  # what the decoder ran on: this rank's slice, not the whole row
        policy.model.model.language_model.register_forward_hook(
            lambda module, args, output: lengths.append(output.last_hidden_state.shape[1]))
        logprobs, entropy = policy.logprobs(**inputs)
        ((logprobs * mask).sum() + (entropy * mask).sum()).backward()
        results[f"policy-{checkpointing}"] = {"logprobs": logprobs.detach(), "entropy": entropy.detach(),
                                               "grads": averaged_gradients(policy),
                                               "decoder_lengths": every_rank(lengths[0])}
    torch.manual_seed(0)
    critic = Critic(model, packing=True)
    critic.follow_sequence_parallel(world)
    values = critic.values(**inputs)
    (values * mask).sum().backward()
    results["critic"] = {"values": values.detach(), "grads": averaged_gradients(critic)}
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.destroy_process_group()  # gloo aborts at exit otherwise


if __name__ == "__main__":
    main(*sys.argv[1:])
