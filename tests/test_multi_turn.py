"""Multi-turn agent rollouts: environments, the episode loop, the mask and log-probs of assembled conversations."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer

from lmmr1.data.processor import PromptProcessor
from lmmr1.envs import GuessNumber, Level, SokobanGame, generate_level, sokoban_game, solve
from lmmr1.envs import guess as guess_module
from lmmr1.modules.algorithm_config import AlgorithmConfig
from lmmr1.modules.experience import Experience
from lmmr1.modules.policy import Policy
from lmmr1.modules.rl_module import RLModule
from lmmr1.rewards.episode import EpisodeReward
from lmmr1.rollout.base import Completion, RolloutEngine, SamplingConfig
from lmmr1.rollout.multi_turn import MultiTurnEngine

CORRIDOR = "#####\n#@$.#\n#####"
LEVELS = [CORRIDOR, "######\n#@ $.#\n######", "#######\n#@    #\n# $  .#\n#     #\n#######"] + [
    generate_level(random.Random(seed), 6, 6, 1).to_xsb() for seed in range(3)]


def _row(xsb: str, where: str = "mem:1") -> dict:
    return {"message": [{"role": "user", "content": "Push the box onto the goal, one move per turn."}], "env": xsb,
            "_where": where}


class ScriptedEngine(RolloutEngine):
    """Plays `script(row, turn)` as the model's turn, turn = assistant turns already in the prompt (log-prob 0)."""

    def __init__(self, script) -> None:  # noqa: ANN001
        self.script, self.calls = script, []

    def generate(self, prompts, sampling, *, seed=0):  # noqa: ANN001
        self.calls.append(len(prompts))
        eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        out = []
        for ids, mask, row in zip(prompts.input_ids, prompts.attention_mask, prompts.rows):
            turn = self.tokenizer.decode(ids[mask.bool()]).count("<|im_start|>assistant") - 1
            text = self.script(row, turn)
            tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"][: sampling.max_new_tokens - 1]
            out.append([Completion(tokens + [eos], text, [0.0] * (len(tokens) + 1), "stop")
                        for _ in range(sampling.n)])
        return out


def _solver_script(row: dict, turn: int) -> str:
    return f"<answer>{solve(Level.from_xsb(row['env']))[turn]}</answer>"


@pytest.fixture(scope="module")
def tools(tiny_vl_path):
    return PromptProcessor(tiny_vl_path), AutoTokenizer.from_pretrained(tiny_vl_path, padding_side="left")


def _engine(tiny_vl_path, tokenizer, inner, **options) -> MultiTurnEngine:
    engine = MultiTurnEngine(options.pop("env", SokobanGame()), engine=inner, **options)
    engine.bind(type("P", (), {"path": str(tiny_vl_path)})(), tokenizer)
    return engine


# ---- the environments ------------------------------------------------------------------------------------------
def test_sokoban_game_feedback_penalty_and_solve():
    env = SokobanGame(invalid_penalty=0.25, images=False)
    first = env.reset(_row("######\n#@ $.#\n######"))
    assert first.text.startswith("Boxes on goals: 0/1.")
    invalid = env.step("let me think")  # no move: the documented feedback, the penalty, nothing moves
    assert (invalid.observation.text.splitlines()[0], invalid.reward, invalid.done, invalid.info["invalid"]) == (
        sokoban_game.INVALID_FEEDBACK, -0.25, False, True)
    blocked = env.step("<answer>up right</answer>")  # up walks into the wall: a valid turn, the move is named blocked
    assert blocked.observation.text.splitlines()[0] == "Moved up (blocked) right. Boxes on goals: 0/1."
    assert (blocked.reward, blocked.done, blocked.info["noop_moves"]) == (0.0, False, 1)
    solved = env.step("R")
    assert (solved.observation.text.splitlines()[0], solved.reward, solved.done) == (
        "Moved right. Boxes on goals: 1/1. Solved!", 1.0, True)


def test_sokoban_game_shows_the_new_frame_and_caps_moves_per_turn():
    env = SokobanGame(max_moves_per_turn=1)
    assert len(env.reset(_row(LEVELS[1])).images) == 1
    step = env.step("<answer>right right</answer>")  # only the first move is taken
    assert step.observation.text == "Moved right. Boxes on goals: 0/1." and len(step.observation.images) == 1
    assert env.level.player == (1, 2)


def test_guess_number_is_a_text_environment():
    env = GuessNumber()
    assert env.reset({"answer": "37"}).images == []
    assert [env.step(a).observation.text for a in ("<answer>50</answer>", "25", "?")] == [
        "Lower.", "Higher.", guess_module.INVALID_FEEDBACK]
    assert env.step("<answer>37</answer>").done


# ---- the episode loop (a scripted policy, so trajectories are exact) --------------------------------------------
def test_solver_plan_one_move_per_turn_solves_every_level_in_exactly_its_length(tiny_vl_path, tools):
    processor, tokenizer = tools
    engine = _engine(tiny_vl_path, tokenizer, ScriptedEngine(_solver_script), max_turns=40)
    episodes = [g[0] for g in engine.generate(processor([_row(x) for x in LEVELS]), SamplingConfig(n=1))]
    for xsb, c in zip(LEVELS, episodes):
        plan = solve(Level.from_xsb(xsb))
        assert c.episode["solved"] and c.episode["ended"] == "done" and c.episode["turns"] == len(plan), xsb
        assert c.episode["rewards"] == [0.0] * (len(plan) - 1) + [1.0]
        frames = 0 if c.image_grid_thw is None else c.image_grid_thw.shape[0]
        assert frames == len(plan) - 1  # a frame after every turn but the last
    assert EpisodeReward()([c.text for c in episodes], [c.row_for({}) for c in episodes]).total == [1.0] * len(LEVELS)


def test_turn_and_token_budgets_end_episodes(tiny_vl_path, tools):
    processor, tokenizer = tools
    prompts = processor([_row(LEVELS[2])])  # a 4-move plan
    engine = _engine(tiny_vl_path, tokenizer, ScriptedEngine(_solver_script), max_turns=3)
    (c,), = engine.generate(prompts, SamplingConfig(n=1))
    assert (c.episode["turns"], c.episode["ended"], c.episode["solved"], c.finish_reason) == (3, "turns", False, "stop")
    engine = _engine(tiny_vl_path, tokenizer, ScriptedEngine(_solver_script), max_turns=40, max_episode_tokens=80,
                     env=SokobanGame(images=False))
    (c,), = engine.generate(prompts, SamplingConfig(n=1, max_new_tokens=16))
    assert (c.episode["ended"], c.finish_reason) == ("tokens", "length") and len(c.token_ids) <= 80


def test_invalid_actions_are_answered_with_feedback_tokens_that_get_no_gradient(tiny_vl_path, tools):
    processor, tokenizer = tools
    script = lambda row, turn: "hmm" if turn == 0 else "<answer>right</answer>"  # noqa: E731
    engine = _engine(tiny_vl_path, tokenizer, ScriptedEngine(script), env=SokobanGame(images=False))
    (c,), = engine.generate(processor([_row(CORRIDOR)]), SamplingConfig(n=1))
    assert c.episode["invalid_actions"] == 1 and c.episode["rewards"] == [-0.1, 1.0]
    model = tokenizer.decode([t for t, m in zip(c.token_ids, c.loss_mask) if m])
    environment = tokenizer.decode([t for t, m in zip(c.token_ids, c.loss_mask) if not m])
    assert model == "hmm<|im_end|><answer>right</answer><|im_end|>"
    assert environment == f"\n<|im_start|>user\n{sokoban_game.INVALID_FEEDBACK}\n{CORRIDOR}<|im_end|>\n" \
                          "<|im_start|>assistant\n"


def _stumbling_script(row: dict, turn: int) -> str:
    """The solver's plan with one invalid turn after the first move: episodes of different lengths and content."""
    return "no" if turn == 1 else _solver_script(row, turn if turn == 0 else turn - 1)


def test_batched_episodes_of_different_lengths_equal_one_at_a_time(tiny_vl_path, tools):
    processor, tokenizer = tools
    inner = ScriptedEngine(_stumbling_script)
    engine = _engine(tiny_vl_path, tokenizer, inner, max_turns=40)
    batched = [c for g in engine.generate(processor([_row(x) for x in LEVELS]), SamplingConfig(n=2)) for c in g]
    assert inner.calls[0] == 2 * len(LEVELS) and inner.calls[-1] < inner.calls[0]  # finished episodes drop out
    single = [c for x in LEVELS for c in engine.generate(processor([_row(x)]), SamplingConfig(n=2))[0]]
    assert len({c.episode["turns"] for c in batched}) > 2
    for b, s in zip(batched, single, strict=True):
        assert (b.token_ids, b.loss_mask, b.logprobs, b.episode) == (s.token_ids, s.loss_mask, s.logprobs, s.episode)
        torch.testing.assert_close(b.pixel_values, s.pixel_values, rtol=0, atol=0)
        torch.testing.assert_close(b.image_grid_thw, s.image_grid_thw, rtol=0, atol=0)


# ---- the real model: log-probs over the assembled conversation, and the loss mask --------------------------------
@pytest.fixture(scope="module")
def rollout(tiny_vl_path, tools):
    """Two image episodes (a Sokoban frame after every turn) and two text episodes of the tiny VL model."""
    from lmmr1.rollout.hf import HFEngine

    processor, tokenizer = tools
    policy = Policy(str(tiny_vl_path))
    sampling = SamplingConfig(n=2, temperature=1.0, max_new_tokens=6)
    parts = []
    for env, row in ((SokobanGame(image_side=56), _row(LEVELS[1])), (GuessNumber(), {**_row(""), "answer": "7"})):
        engine = MultiTurnEngine(env, engine=HFEngine(), max_turns=3)
        engine.bind(policy, tokenizer)
        prompts = processor([row])
        completions = engine.generate(prompts, sampling, seed=5)
        exp = Experience.from_rollout(prompts, completions, tokenizer.pad_token_id)
        exp.environment = torch.zeros_like(exp.response_mask, dtype=torch.bool)  # from the engine, not the mask
        for i, c in enumerate(c for group in completions for c in group):
            exp.environment[i, : len(c.loss_mask)] = torch.tensor(c.loss_mask) == 0
        parts.append(exp)
    return policy, tokenizer, parts


def test_logprobs_over_the_assembled_conversation_equal_the_engine_turn_logprobs(rollout):
    policy, _, parts = rollout
    for exp in parts:
        mask = exp.response_mask
        assert bool(exp.environment.any())  # environment turns inside the responses
        with torch.no_grad():
            logprobs, _ = policy.logprobs(**exp.model_inputs())
        gap = ((logprobs - exp.rollout_logprobs).abs() * mask).max()
        assert gap <= 1e-4, gap
    images = parts[0]
    assert all(g.shape[0] > 1 for g in images.image_grid_thw)  # the later turns' frames are in the rows


def test_environment_tokens_get_no_gradient(rollout):
    policy, tokenizer, parts = rollout
    exp = parts[0]
    module = RLModule(policy=policy, reward=EpisodeReward(), engine=MultiTurnEngine(),
                      sampling=SamplingConfig(n=2, max_new_tokens=6),
                      algorithm=AlgorithmConfig(kl={"coef": 0.0}))
    scores = EpisodeReward()(exp.responses, exp.rows)
    exp = module._score_tokens(exp, scores, module._inert(exp.select([0])))
    exp.advantages = exp.advantages + torch.randn_like(exp.advantages)  # token-varying, so every target matters
    environment = exp.environment
    assert bool(environment.any())

    def loss_and_grad(e: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        policy.zero_grad()
        loss, _ = module._loss(e, module._loss_normaliser(e))
        loss.backward()
        return loss.detach(), policy.model.lm_head.weight.grad.clone()

    base = loss_and_grad(exp)
    noise = torch.randn_like(exp.advantages) * 5
    perturbed = Experience.select(exp, list(range(len(exp))))
    perturbed.advantages = torch.where(environment, noise, exp.advantages)  # the environment tokens' targets
    perturbed.old_logprobs = torch.where(environment, noise, exp.old_logprobs)
    after = loss_and_grad(perturbed)
    torch.testing.assert_close(after[0], base[0], rtol=0, atol=0)
    torch.testing.assert_close(after[1], base[1], rtol=0, atol=0)
    model_token = exp.response_mask.bool()
    control = Experience.select(exp, list(range(len(exp))))
    control.advantages = torch.where(model_token, noise, exp.advantages)  # a model token's target does count
    assert not torch.equal(loss_and_grad(control)[1], base[1])


def test_the_same_rollout_seed_replays_the_same_episodes(rollout, tiny_vl_path, tools):
    """What resume relies on: the rollout seed comes from the stream position, and turns derive theirs from it."""
    from lmmr1.rollout.hf import HFEngine

    policy, tokenizer, parts = rollout
    processor, _ = tools
    engine = MultiTurnEngine(SokobanGame(image_side=56), engine=HFEngine(), max_turns=3)
    engine.bind(policy, tokenizer)
    prompts = processor([_row(LEVELS[1])])
    sampling = SamplingConfig(n=2, temperature=1.0, max_new_tokens=6)
    again = Experience.from_rollout(prompts, engine.generate(prompts, sampling, seed=5), tokenizer.pad_token_id)
    assert torch.equal(again.input_ids, parts[0].input_ids) and torch.equal(again.response_mask, parts[0].response_mask)
    other = Experience.from_rollout(prompts, engine.generate(prompts, sampling, seed=6), tokenizer.pad_token_id)
    assert not torch.equal(other.input_ids, parts[0].input_ids)
