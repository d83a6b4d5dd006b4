"""Single-turn planning vs multi-turn play on the same Sokoban levels with the same model: solve rate and tokens.

Single-turn (LMM-R1's setup): the model sees the level once and writes the whole plan, scored by the `sokoban`
reward (the plan replayed on the level). Multi-turn: `MultiTurnEngine` + `SokobanGame`, the model moves, sees the new
level and moves again, up to `--turns` turns. Both use the same engine (Hugging Face generate, greedy), the same
levels (`lmmr1 data make sokoban` difficulty 1, the agent kind's levels are the same generator) and show the level as
XSB text, not as the frame: the embedded mini model cannot read a Sokoban picture, so the text rendering is what it
gets in both settings (`SokobanGame(images=False)` appends the new level as text after each turn). Tokens per
episode: the model's own tokens (multi-turn: the environment's turns not counted; also printed with them).

    python benchmarks/sokoban_turns.py [--model DIR] [--levels 8] [--turns 6] [--plan-tokens 64] [--turn-tokens 16]

The defaults ran past 11 minutes on 2 shared CPU cores; the README figures are from
`--levels 4 --turns 3 --plan-tokens 32 --turn-tokens 8` (161 s).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from transformers import AutoTokenizer

from lmmr1.data.processor import PromptProcessor
from lmmr1.envs import Level, SokobanGame, generate_level, parse_plan, solve
from lmmr1.models.mini import ensure_mini
from lmmr1.modules.policy import Policy
from lmmr1.rewards.base import tag_content
from lmmr1.rewards.sokoban import SokobanReward
from lmmr1.rollout.base import SamplingConfig
from lmmr1.rollout.hf import HFEngine
from lmmr1.rollout.multi_turn import MultiTurnEngine

LEGEND = ("The Sokoban level below is drawn in text: # wall, @ you, $ box, . goal, * box on a goal, + you on a goal. "
          "Each move goes one cell up, down, left or right; walking into a box pushes it one cell if the cell behind "
          "it is free. Push every box onto a goal.")
PLAN = "Answer with the complete move sequence, e.g. <answer>up left left down</answer>."
PLAY = ("Play step by step: each turn give your next move or moves, e.g. <answer>up</answer>; you will then see the "
        "new level.")


def levels(n: int, seed: int) -> list[str]:
    """n solvable one-box levels (6-7 cells a side, optimal plan >= 4 moves), as `lmmr1 data make sokoban` level 1."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        level = generate_level(rng, rng.randint(6, 7), rng.randint(6, 7), 1)
        plan = solve(level)
        if plan is not None and len(plan) >= 4:
            out.append(level.to_xsb())
    return out


def _rows(xsbs: list[str], ask: str) -> list[dict]:
    return [{"message": [{"role": "user", "content": f"{LEGEND}\n{xsb}\n{ask}"}], "env": xsb, "_where": f"level:{i}"}
            for i, xsb in enumerate(xsbs)]


def _unparsable(text: str) -> bool:
    answer = tag_content(text, "answer")
    return parse_plan(text if answer is None else answer) is None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the mini model, prepared if missing)")
    parser.add_argument("--levels", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--turns", type=int, default=6, help="multi-turn: model turns per episode")
    parser.add_argument("--plan-tokens", type=int, default=64, help="single-turn: tokens for the whole plan")
    parser.add_argument("--turn-tokens", type=int, default=16, help="multi-turn: tokens per turn")
    args = parser.parse_args()

    path = str(args.model or ensure_mini())
    policy, tokenizer = Policy(path), AutoTokenizer.from_pretrained(path, padding_side="left")
    processor, xsbs = PromptProcessor(path), levels(args.levels, args.seed)
    optimal = [len(solve(Level.from_xsb(x))) for x in xsbs]

    single = HFEngine()
    single.bind(policy, tokenizer)
    start = time.perf_counter()
    prompts = processor(_rows(xsbs, PLAN))
    plans = [g[0] for g in single.generate(prompts, SamplingConfig(n=1, temperature=0.0,
                                                                   max_new_tokens=args.plan_tokens))]
    scores = SokobanReward()([c.text for c in plans], prompts.rows)
    single_s = time.perf_counter() - start

    multi = MultiTurnEngine(SokobanGame(images=False), engine=HFEngine(), max_turns=args.turns,
                            max_episode_tokens=args.turns * (args.turn_tokens + 200))
    multi.bind(policy, tokenizer)
    start = time.perf_counter()
    episodes = [g[0] for g in multi.generate(processor(_rows(xsbs, PLAY)),
                                             SamplingConfig(n=1, temperature=0.0, max_new_tokens=args.turn_tokens))]
    multi_s = time.perf_counter() - start

    solved_single = scores.components["solved"]
    solved_multi = [float(c.episode["solved"]) for c in episodes]
    print(f"model {path}, {len(xsbs)} one-box levels (optimal plans {min(optimal)}-{max(optimal)} moves), greedy")
    print(f"{'':<12}{'solved':>8}{'model tokens/episode':>22}{'all tokens/episode':>20}{'turns':>7}"
          f"{'invalid turns':>15}{'seconds':>9}")
    print(f"{'single-turn':<12}{sum(solved_single):>5.0f}/{len(xsbs):<2}"
          f"{statistics.mean(len(c.token_ids) for c in plans):>22.1f}"
          f"{statistics.mean(len(c.token_ids) for c in plans):>20.1f}{1:>7}"
          f"{sum(_unparsable(c.text) for c in plans) / len(plans):>15.1f}"
          f"{single_s:>9.1f}")
    print(f"{'multi-turn':<12}{sum(solved_multi):>5.0f}/{len(xsbs):<2}"
          f"{statistics.mean(sum(c.loss_mask) for c in episodes):>22.1f}"
          f"{statistics.mean(len(c.token_ids) for c in episodes):>20.1f}"
          f"{statistics.mean(c.episode['turns'] for c in episodes):>7.1f}"
          f"{statistics.mean(c.episode['invalid_actions'] for c in episodes):>15.1f}{multi_s:>9.1f}")
    print("invalid turns: mean per episode (single-turn: the one plan has no parsable moves)")
    print(f"example single-turn answer: {plans[0].text[:160]!r}")
    print(f"example multi-turn episode: {episodes[0].text[:300]!r}")


if __name__ == "__main__":
    main()
