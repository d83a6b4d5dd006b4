"""Padding-free packing vs padded forwards: one log-prob forward + backward of the mini model on an RL-shaped
micro-batch (varied prompt lengths, long-tailed response lengths), both layouts alternated in one process.

    .venv/bin/python benchmarks/packing.py [--rows 16] [--max-response 96] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch


def batch(path: str, rows: int, max_response: int, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """Prompts of 1-3 worked examples + a question, responses whose lengths follow RL's long tail (most short)."""
    from lmmr1.data.processor import PromptProcessor

    rng = random.Random(seed)
    shot = [{"role": "user", "content": "What is 3 + 4?"},
            {"role": "assistant", "content": "<think>3 plus 4 is 7.</think><answer>7</answer>"}]
    prompts = [PromptProcessor(path, few_shot=shot * rng.randint(1, 3))(
        [{"message": [{"role": "user", "content": f"What is {i} + {i + 2}?"}], "answer": "0"}]) for i in range(rows)]
    width = max(p.input_ids.shape[1] for p in prompts)
    pad = lambda t: torch.nn.functional.pad(t, (width - t.shape[1], 0))  # noqa: E731 left padding
    lengths = [min(max_response, max(4, int(rng.expovariate(1 / (max_response / 4))))) for _ in range(rows)]
    T = max(lengths)
    response = torch.randint(100, 20000, (rows, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    inputs = dict(input_ids=torch.cat([torch.cat([pad(p.input_ids) for p in prompts]), response], 1),
                  attention_mask=torch.cat([torch.cat([pad(p.attention_mask) for p in prompts]), mask], 1),
                  response_len=T)
    return inputs, mask.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--max-response", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from lmmr1.models.mini import ensure_mini
    from lmmr1.modules.policy import Policy

    path = str(ensure_mini())
    policy = Policy(path, freeze=["visual."])
    inputs, mask = batch(path, args.rows, args.max_response)
    padded_tokens, real_tokens = inputs["input_ids"].numel(), int(inputs["attention_mask"].sum())
    times: dict[bool, list[float]] = {False: [], True: []}
    logprobs: dict[bool, torch.Tensor] = {}
    for _ in range(args.repeats):
        for packing in (False, True):
            policy.packing = packing
            policy.zero_grad(set_to_none=True)
            start = time.perf_counter()
            lp, _ = policy.logprobs(**inputs)
            (-(lp * mask).sum() / mask.sum()).backward()
            times[packing].append(time.perf_counter() - start)
            logprobs[packing] = lp.detach()
    padded, packed = statistics.median(times[False]), statistics.median(times[True])
    gap = ((logprobs[True] - logprobs[False]).abs() * mask).max().item()
    print(f"{args.rows} rows, {inputs['input_ids'].shape[1]} padded columns: {padded_tokens} padded tokens, "
          f"{real_tokens} real ({real_tokens / padded_tokens:.0%})")
    print(f"padded : {padded:6.2f} s per forward+backward (median of {args.repeats})")
    print(f"packed : {packed:6.2f} s")
    print(f"speed-up packed/padded: {padded / packed:.2f}x   max |log-prob difference| {gap:.1e}")


if __name__ == "__main__":
    main()
