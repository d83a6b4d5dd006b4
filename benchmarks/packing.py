"""Padding-free packing vs padded forwards: one log-prob forward + backward of the mini model on an RL-shaped
micro-batch (varied prompt lengths, long-tailed response lengths, `--group` samples per prompt), the layouts alternated
in one process: padded rows, packed rows, and packed rows with shared prompts (each prompt once, its samples after it).

    .venv/bin/python benchmarks/packing.py [--rows 16] [--group 4] [--max-response 96] [--repeats 3] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch


def batch(path: str, rows: int, max_response: int, group: int = 1, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """Prompts of 1-3 worked examples + a question, each `group` times in a row (a GRPO group), responses whose
    lengths follow RL's long tail (most short)."""
    from lmmr1.data.processor import PromptProcessor

    rng = random.Random(seed)
    shot = [{"role": "user", "content": "What is 3 + 4?"},
            {"role": "assistant", "content": "<think>3 plus 4 is 7.</think><answer>7</answer>"}]
    prompts = [PromptProcessor(path, few_shot=shot * rng.randint(1, 3))(
        [{"message": [{"role": "user", "content": f"What is {i} + {i + 2}?"}], "answer": "0"}])
        for i in range(0, rows, group)]
    prompts = [p for p in prompts for _ in range(group)][:rows]
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
    parser.add_argument("--group", type=int, default=4, help="samples per prompt (consecutive rows)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-response", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from lmmr1.models.mini import ensure_mini
    from lmmr1.modules.policy import Policy

    path = str(ensure_mini())
    policy = Policy(path, dtype=args.dtype, freeze=["visual."])
    inputs, mask = batch(path, args.rows, args.max_response, args.group)
    leaders = torch.arange(args.rows) // args.group * args.group
    padded_tokens, real_tokens = inputs["input_ids"].numel(), int(inputs["attention_mask"].sum())
    prompt_tokens = inputs["attention_mask"][:, : -inputs["response_len"]].sum(-1)
    shared_tokens = real_tokens - int(prompt_tokens[leaders != torch.arange(args.rows)].sum())
    layouts = {"padded": (False, {}), "packed": (True, {}), "shared": (True, {"prompt_leaders": leaders})}
    times: dict[str, list[float]] = {name: [] for name in layouts}
    logprobs: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name, (packing, extra) in layouts.items():
            policy.packing = packing
            policy.zero_grad(set_to_none=True)
            start = time.perf_counter()
            lp, _ = policy.logprobs(**inputs, **extra)
            (-(lp * mask).sum() / mask.sum()).backward()
            times[name].append(time.perf_counter() - start)
            logprobs[name] = lp.detach()
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.rows} rows ({args.group} per prompt), {inputs['input_ids'].shape[1]} padded columns, {args.dtype}: "
          f"{padded_tokens} padded tokens, {real_tokens} real ({real_tokens / padded_tokens:.0%}), "
          f"{shared_tokens} with shared prompts ({shared_tokens / padded_tokens:.0%})")
    for name in layouts:
        gap = ((logprobs[name] - logprobs["padded"]).abs() * mask).max().item()
        print(f"{name:7s}: {median[name]:6.2f} s per forward+backward (median of {args.repeats}), "
              f"speed-up vs padded {median['padded'] / median[name]:.2f}x, max |log-prob difference| {gap:.1e}")


if __name__ == "__main__":
    main()
