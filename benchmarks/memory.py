"""Peak RSS of one RL training step of the mini model on CPU, with and without gradient checkpointing and chunked
log-probs, each configuration in a fresh process (ru_maxrss), printed side by side.

    .venv/bin/python benchmarks/memory.py [--prompts 4] [--samples 4] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CONFIGS = {
    "plain": {"gradient_checkpointing": False, "logprob_chunk": 0},
    "chunked log-probs": {"gradient_checkpointing": False, "logprob_chunk": 8},
    "grad checkpointing": {"gradient_checkpointing": True, "logprob_chunk": 0},
    "both": {"gradient_checkpointing": True, "logprob_chunk": 8},
}


def one_step(options: dict, prompts: int, samples: int, new_tokens: int) -> dict:
    """Run one training step in this process and report seconds and peak RSS."""
    import lightning as L
    from torch.utils.data import DataLoader

    from lmmr1.data.processor import PromptProcessor
    from lmmr1.models.mini import ensure_mini
    from lmmr1.modules.algorithm_config import AlgorithmConfig
    from lmmr1.modules.policy import Policy
    from lmmr1.modules.rl_module import RLModule
    from lmmr1.rollout.base import SamplingConfig

    path = str(ensure_mini())
    shots = [{"role": "user", "content": "What is 3 + 4?"},
             {"role": "assistant", "content": "<think>3 plus 4 is 7.</think><answer>7</answer>"}]
    rows = [{"message": [{"role": "user", "content": f"What is {i} + {i + 2}?"}], "answer": str(2 * i + 2)}
            for i in range(prompts)]
    batch = PromptProcessor(path, few_shot=shots)(rows)
    module = RLModule(policy=Policy(path, freeze=["visual."], **options), reward="math",
                      sampling=SamplingConfig(n=samples, max_new_tokens=new_tokens),
                      algorithm=AlgorithmConfig(kl={"coef": 0.0}, micro_batch_size=prompts * samples))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    return {"seconds": time.perf_counter() - start,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_step(json.loads(args.child), args.prompts, args.samples, args.new_tokens)))
        return
    results = {}
    for name, options in CONFIGS.items():
        cmd = [sys.executable, __file__, "--child", json.dumps(options), "--prompts", str(args.prompts),
               "--samples", str(args.samples), "--new-tokens", str(args.new_tokens)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[name] = json.loads(out)
    base = results["plain"]["peak_rss_gb"]
    print(f"one step, {args.prompts} prompts x {args.samples} samples, {args.new_tokens} new tokens, fp32, 2 cores")
    for name, r in results.items():
        ratio = r["peak_rss_gb"] / base
        print(f"{name:20s} peak RSS {r['peak_rss_gb']:.2f} GB ({ratio:.2f}x)  step {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
