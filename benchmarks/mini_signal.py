"""Which prompt design gives the *untrained* mini model varied, nonzero rewards on easy arithmetic?

GRPO learns only from groups whose rewards differ (arXiv:2402.03300: advantages are rewards minus the group mean), so
a demo prompt is useful only if the starting model sometimes, but not always, earns reward. For each design this
samples G completions (temperature 1, no top-k/top-p) for easy problems (one-digit + one-digit, two-digit +
one-digit) and prints the exact-format rate, accuracy (last integer inside <answer>, and last integer anywhere), the
mean of two candidate rewards, and the fraction of groups with nonzero reward variance under each reward.

    python benchmarks/mini_signal.py [--model DIR] [--dtype bfloat16 float32] [--problems 16] [--samples 4]
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import time

import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer

from lmmr1.models.mini import ensure_mini
from lmmr1.rewards.format import FormatReward

FORMAT_SYSTEM = (
    "You are a helpful assistant. Think about the question briefly inside <think> </think> tags, then give only "
    "the final number inside <answer> </answer> tags.\n"
    "Example:\n"
    "Question: What is 3 + 4?\n"
    "Response: <think>3 plus 4 is 7.</think><answer>7</answer>"
)
TURNS_SYSTEM = (
    "You are a helpful assistant. Think briefly inside <think> </think> tags, then give only the final number "
    "inside <answer> </answer> tags."
)
EXAMPLE = [{"role": "user", "content": "What is 3 + 4?"},
           {"role": "assistant", "content": "<think>3 plus 4 is 7.</think><answer>7</answer>"}]
EXAMPLE_2 = [{"role": "user", "content": "What is 25 + 8?"},
             {"role": "assistant", "content": "<think>25 plus 8 is 33.</think><answer>33</answer>"}]


def _messages(design: str, a: int, b: int) -> list[dict[str, str]]:
    question = f"What is {a} + {b}?"
    if design == "format_system":  # the worked example written inside the system prompt
        return [{"role": "system", "content": FORMAT_SYSTEM}, {"role": "user", "content": question}]
    if design == "format_turns":  # the worked example as a previous chat turn, which small models imitate best
        return [{"role": "system", "content": TURNS_SYSTEM}, *EXAMPLE, {"role": "user", "content": question}]
    if design == "format_turns2":  # two worked examples as previous turns
        return [{"role": "system", "content": TURNS_SYSTEM}, *EXAMPLE, *EXAMPLE_2,
                {"role": "user", "content": question}]
    if design == "boxed":
        return [{"role": "user", "content": f"{question} Put the final answer in \\boxed{{}}."}]
    if design == "plain":
        return [{"role": "user", "content": question}]
    raise ValueError(f"unknown design {design!r}; choose from {DESIGNS}")


DESIGNS = ("format_system", "format_turns", "format_turns2", "boxed", "plain")


def problems(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """Half one-digit + one-digit, half two-digit + one-digit."""
    rng = random.Random(seed)
    return [(rng.randint(1, 9), rng.randint(1, 9)) if i % 2 == 0 else (rng.randint(10, 99), rng.randint(1, 9))
            for i in range(n)]


def last_int(text: str | None) -> int | None:
    """The last integer in `text` (commas inside numbers allowed), or None."""
    found = re.findall(r"-?\d+(?:,\d{3})*", text or "")
    return int(found[-1].replace(",", "")) if found else None


def answer_text(response: str) -> str | None:
    """Content of the last <answer>…</answer>, or None."""
    found = re.findall(r"<answer>(.*?)</answer>", response, re.DOTALL)
    return found[-1] if found else None


def score(response: str, label: int, format_reward: FormatReward) -> dict[str, float]:
    """Per-response metrics and the two candidate rewards."""
    fmt = format_reward.score(response)
    acc_tag = float(last_int(answer_text(response)) == label)
    acc_last = float(last_int(response) == label)
    return {"format": fmt, "acc_tag": acc_tag, "acc_last": acc_last,
            "r_lmmr1": 0.5 * fmt + 1.0 * acc_tag,  # LMM-R1's weights: format 0.5 + accuracy 1.0
            "r_last": 0.5 * fmt + 1.0 * acc_last}  # accuracy from the last number, so unformatted right answers count


def run(model, tokenizer, design: str, items: list[tuple[int, int]], samples: int, max_new_tokens: int,
        seed: int) -> tuple[dict[str, float], float, list[str]]:
    texts = [tokenizer.apply_chat_template(_messages(design, a, b), add_generation_prompt=True, tokenize=False)
             for a, b in items]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=max_new_tokens, num_return_sequences=samples,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    responses = tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    format_reward = FormatReward()
    rows = [score(r, a + b, format_reward) for r, (a, b) in zip(responses, [x for x in items for _ in range(samples)])]
    stats = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
    for key in ("r_lmmr1", "r_last"):
        groups = [[r[key] for r in rows[i * samples:(i + 1) * samples]] for i in range(len(items))]
        stats[f"var>0 {key}"] = statistics.mean(float(len(set(g)) > 1) for g in groups)
    return stats, seconds, responses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="mini model folder (default: prepared into the cache)")
    parser.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["bfloat16", "float32"])
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=DESIGNS)
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4, help="completions per problem (the GRPO group size)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=2, help="example responses printed per design")
    args = parser.parse_args(argv)
    path = args.model or ensure_mini()
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    items = problems(args.problems, args.seed)
    header = None
    for dtype in args.dtype:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        for design in args.designs:
            stats, seconds, responses = run(model, tokenizer, design, items, args.samples, args.max_new_tokens,
                                            args.seed)
            if header is None:
                header = f"{'dtype':9} {'design':14} " + " ".join(f"{k:>13}" for k in stats) + "  generate_s"
                print(header)
            print(f"{dtype:9} {design:14} " + " ".join(f"{v:13.3f}" for v in stats.values()) + f"  {seconds:10.1f}",
                  flush=True)
            for response in responses[: args.show]:
                print("    e.g.", repr(response[:160]))
    print(f"({args.problems} problems x {args.samples} samples, max_new_tokens {args.max_new_tokens}, "
          f"{torch.get_num_threads()} threads; one generate call per row above)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
