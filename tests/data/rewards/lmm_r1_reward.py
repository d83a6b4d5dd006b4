"""An LMM-R1 / OpenRLHF style reward file, kept as such a user would bring it: reward_func(queries, prompts, labels)."""

import re

import torch


def reward_func(queries, prompts, labels):
    # 1.0 when the last number in the query equals the label; +0.5 when the prompt mentions "bonus"
    scores = []
    for query, prompt, label in zip(queries, prompts, labels):
        numbers = re.findall(r"-?\d+", query)
        score = float(bool(numbers) and numbers[-1] == label.strip())
        scores.append(score + (0.5 if "bonus" in prompt else 0.0))
    return torch.tensor(scores)
