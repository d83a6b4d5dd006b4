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
from lmmr1.rollout.multi_turn import MultiTurnEngine, episode_means

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


@pytest.mark.parametrize(("action", "reward"), [
    # level #@$ .#: box 2 cells from the goal; progress_reward 0.25 per cell, format_reward 0.5, invalid_penalty 0.1
    ("<answer>right</answer>", 0.25 + 0.5),  # box pushed one cell closer; every word a move
    ("left", 0.0 + 0.5),  # into the wall: no progress, still a well-formed move
    ("up 660", -0.1 + 0.5 * 0.5),  # invalid turn, half its words are moves
    ("hmm", -0.1),  # invalid, no move word: the penalty alone
    ("right right", 1.0 + 2 * 0.25 + 0.5),  # solved: the solved reward plus both cells of progress
])
def test_sokoban_shaping_rewards_progress_and_move_words(action, reward):
    env = SokobanGame(invalid_penalty=0.1, progress_reward=0.25, format_reward=0.5, images=False)
    env.reset(_row("######\n#@$ .#\n######"))
    step = env.step(action)
    assert step.reward == pytest.approx(reward) and step.info["shaping"] == pytest.approx(reward - (
        1.0 if step.done else 0.0) + (0.1 if step.info["invalid"] else 0.0))


def test_progress_shaping_telescopes_to_the_distance_a_plan_removes():
    """Potential-based: whatever the route, an episode's progress terms sum to coef x (initial - final distance)."""
    for xsb in LEVELS:
        env = SokobanGame(progress_reward=0.5, images=False)
        env.reset(_row(xsb))
        start = sokoban_game.box_distance(env.level)
        rewards = [env.step(move).reward for move in solve(Level.from_xsb(xsb))]
        assert sum(rewards) == pytest.approx(1.0 + 0.5 * start), xsb


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
    means = episode_means([c.row_for({})])  # the logged length is the model's tokens; the episode's is all of them
    assert means["rollout/response_len_mean"] == (float(len(tokenizer(model)["input_ids"])), 1.0)
    assert means["rollout/episode_len_mean"] == (float(len(c.token_ids)), 1.0)


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


# ---- training on episodes: resume, and the demo config learns ---------------------------------------------------
class RecordingEngine(MultiTurnEngine):
    """The multi-turn engine, keeping every rollout's episodes (token ids and loss masks) for comparison."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.episodes: list[list[tuple[list[int], list[int]]]] = []

    def generate(self, prompts, sampling, *, seed=0):  # noqa: ANN001
        groups = super().generate(prompts, sampling, seed=seed)
        self.episodes.append([(c.token_ids, c.loss_mask) for g in groups for c in g])
        return groups


def _fit_agent(tiny_vl_path, levels, root, max_steps, ckpt_path=None):  # noqa: ANN001, ANN202
    import lightning as L

    from lmmr1.data.datamodule import DatasetSpec, PromptDataModule
    from tests.test_fit_e2e import LengthReward

    engine = RecordingEngine(SokobanGame(image_side=56, progress_reward=0.1, format_reward=0.1), max_turns=2)
    module = RLModule(policy=Policy(str(tiny_vl_path)), engine=engine,
                      reward=LengthReward(),  # episode texts differ in length: a signal on every step, weights move
                      sampling=SamplingConfig(n=2, max_new_tokens=6),
                      algorithm=AlgorithmConfig(kl={"coef": 0.0}),  # no reference pass: half the time
                      optimizer=lambda params: torch.optim.Adam(params, lr=1e-2))
    data = PromptDataModule(datasets=[DatasetSpec(levels)], batch_size=2, seed=3, processor_path=str(tiny_vl_path))
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, default_root_dir=root, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer


@pytest.mark.slow
def test_two_plus_two_agent_steps_replay_the_episodes_and_weights_of_four(tiny_vl_path, tmp_path):
    from lmmr1.data.synthetic import make

    levels = str(make("sokoban-agent", n=8, seed=0, out=tmp_path / "levels", difficulty=1))
    full, _ = _fit_agent(tiny_vl_path, levels, tmp_path / "full", max_steps=4)
    first, trainer = _fit_agent(tiny_vl_path, levels, tmp_path / "first", max_steps=2)
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    resumed, _ = _fit_agent(tiny_vl_path, levels, tmp_path / "resumed", max_steps=4, ckpt_path=tmp_path / "two.ckpt")
    assert len(full.engine.episodes) == 4 and first.engine.episodes == full.engine.episodes[:2]
    assert resumed.engine.episodes == full.engine.episodes[2:]  # the same episodes, token for token
    assert full.engine.episodes[2] != full.engine.episodes[3]  # (and not one episode replayed every step)
    start = Policy(str(tiny_vl_path)).model.state_dict()
    for (name, p), q in zip(full.policy.model.named_parameters(), resumed.policy.model.parameters()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, start[n]) for n, p in full.policy.model.named_parameters())


@pytest.mark.slow
def test_one_step_of_the_demo_config_varies_the_reward_and_moves_the_weights(tmp_path, monkeypatch):
    """`lmmr1 fit -c configs/demo/sokoban_agent.yaml`: the shaping gives the random tiny model a group whose episodes
    score differently, so the very first step has advantages and changes the policy."""
    import csv
    import json
    from pathlib import Path

    from lmmr1.cli import main
    from lmmr1.models.tiny import build_tiny

    config = str(Path(__file__).parents[1] / "configs" / "demo" / "sokoban_agent.yaml")
    monkeypatch.chdir(tmp_path)
    start = Policy(str(build_tiny(tmp_path / "models" / "tiny-vl"))).model.state_dict()
    trained = {}
    monkeypatch.setattr(RLModule, "on_fit_end", lambda self: trained.update(self.policy.model.state_dict()))
    main(["fit", "-c", config, "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false"])
    run = tmp_path / "runs" / "sokoban_agent" / "csv" / "version_0"
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len({s["reward"] for s in samples}) > 1 and any(s["advantage"] != 0 for s in samples)
    with open(run / "metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r.get("train/advantage_abs_mean")]
    assert float(logged[0]["train/advantage_abs_mean"]) > 0
    changed = [n for n, p in trained.items() if not torch.equal(p, start[n])]
    assert len(changed) > len(start) // 2, sorted(set(start) - set(changed))


class PromptRecorder(ScriptedEngine):
    """A scripted engine that keeps every turn's prompt batch."""

    def __init__(self, script) -> None:  # noqa: ANN001
        super().__init__(script)
        self.prompts = []

    def generate(self, prompts, sampling, *, seed=0):  # noqa: ANN001
        self.prompts.append(prompts)
        return super().generate(prompts, sampling, seed=seed)


def test_the_frames_of_later_turns_reach_a_vllm_request(tiny_vl_path, tools, monkeypatch):
    """vLLM encodes images itself: each turn's request carries every frame the environment showed so far (after the
    prompt's own images), one collapsed image placeholder per image. Stand-in vllm module: no vLLM on CPU here."""
    import sys
    import types

    from lmmr1.models.families import family_of
    from lmmr1.rollout.vllm import VLLMEngine
    from tests.test_vllm_ranks import FakeLLM, FakeSamplingParams

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    processor, tokenizer = tools
    vllm_engine = VLLMEngine()
    vllm_engine.bind(types.SimpleNamespace(path=str(tiny_vl_path)), tokenizer)
    recorder = PromptRecorder(lambda row, turn: "hmm")  # invalid every turn: feedback and a new frame each time
    engine = _engine(tiny_vl_path, tokenizer, recorder, env=SokobanGame(), max_turns=3)
    (episode,), = engine.generate(processor([_row(LEVELS[1])]), SamplingConfig(n=1, max_new_tokens=8))
    assert len(recorder.prompts) == 3 and episode.pixel_values is not None
    image_item = tokenizer.convert_tokens_to_ids(family_of(_config(tiny_vl_path)).image_token)
    for turn, batch in enumerate(recorder.prompts):
        request, train_ids = vllm_engine._request(batch, 0)
        images = request.get("multi_modal_data", {}).get("image", [])
        assert len(images) == turn and all(hasattr(image, "size") for image in images)  # PIL frames, in order
        assert request["prompt_token_ids"].count(image_item) == turn  # one collapsed placeholder per image
        assert train_ids == batch.input_ids[0][batch.attention_mask[0].bool()].tolist()


def _config(path):  # noqa: ANN001, ANN202
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)
