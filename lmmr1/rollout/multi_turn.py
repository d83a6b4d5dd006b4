"""Multi-turn agent rollouts: an inner engine writes a turn, an environment answers, the answer becomes the next user
turn, until the episode is done or a turn / token budget runs out.

Every episode (sample) is returned as one `Completion`: the whole conversation after the prompt, model turns and the
environment's turns alike, with `loss_mask` 0 on the environment's tokens (they are attended to, never trained on),
the engine's per-turn log-probs on the model's tokens, and the frames of later turns as the response's images. So
the trainer's step stays one loop: `Experience.from_rollout` lays the episodes out as rows like single responses.

Turns are batched across episodes; finished episodes drop out of the batch. The conversation is kept as token ids,
never re-tokenized: each environment turn is rendered with the tokenizer's chat template exactly as it appears in
the full conversation (end of the model's turn, the user turn with its image placeholders expanded, the next
generation prompt) and appended as tokens, so the log-probs recomputed over the assembled conversation (Qwen-VL's
M-RoPE positions over all its images included) are the ones the engine sampled with.

    model:
      engine: {class_path: lmmr1.rollout.MultiTurnEngine, init_args: {env: sokoban, max_turns: 8}}
      reward: {class_path: lmmr1.rewards.episode.EpisodeReward}
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from lmmr1.data.processor import PromptBatch, PromptProcessor
from lmmr1.envs.environment import Environment, Observation
from lmmr1.rollout.base import Completion, RolloutEngine, SamplingConfig
from lmmr1.rollout.hf import HFEngine


@dataclass
class _Episode:
    prompt: int  # index of its prompt in the batch
    env: Environment
    tokens: list[int] = field(default_factory=list)  # the conversation after the prompt
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    pixel_values: list[Tensor] = field(default_factory=list)
    image_grid_thw: list[Tensor] = field(default_factory=list)
    frames: list[Any] = field(default_factory=list)  # the environment's images (PIL), for engines that take images
    rewards: list[float] = field(default_factory=list)  # one per model turn
    invalid_actions: int = 0
    solved: bool = False
    ended: str = ""  # "done" (the environment ended it), "turns" or "tokens" (a budget did); "" while running

    def record(self, env_name: str) -> dict[str, Any]:
        return {"env": env_name, "rewards": list(self.rewards), "turns": len(self.rewards),
                "invalid_actions": self.invalid_actions, "solved": self.solved, "ended": self.ended,
                "model_tokens": sum(self.loss_mask), "tokens": len(self.tokens)}


class MultiTurnEngine(RolloutEngine):
    """Drives `engine` turn by turn against one `env` per episode (`sampling.n` episodes per prompt)."""

    def __init__(self, env: Environment | str = "sokoban", engine: RolloutEngine | None = None, max_turns: int = 8,
                 max_episode_tokens: int = 4096, min_pixels: int = 4 * 28 * 28,
                 max_pixels: int = 16384 * 28 * 28) -> None:
        """
        Args:
            env: the environment prototype (cloned per episode): a name in `lmmr1.envs.ENVIRONMENTS` ("sokoban",
                "guess") or an Environment (class_path / init_args).
            engine: generates each turn (default: Hugging Face generate on the live policy).
            max_turns: model turns per episode; an episode still running after them ends (`ended: turns`).
            max_episode_tokens: response tokens per episode, model and environment turns together; an episode whose
                next turn (environment answer + `sampling.max_new_tokens`) would not fit ends (`ended: tokens`,
                finish_reason 'length').
            min_pixels / max_pixels: resize bounds of the environment's frames (keep them equal to --data's).
        """
        if isinstance(env, str):
            from lmmr1.envs import ENVIRONMENTS

            if env not in ENVIRONMENTS:
                raise ValueError(f"--model.engine.init_args.env: unknown environment {env!r}; choose from "
                                 f"{sorted(ENVIRONMENTS)} or give an Environment class_path")
            env = ENVIRONMENTS[env]()
        if max_turns < 1:
            raise ValueError(f"--model.engine.init_args.max_turns must be >= 1, got {max_turns}")
        if max_episode_tokens < 1:
            raise ValueError(f"--model.engine.init_args.max_episode_tokens must be >= 1, got {max_episode_tokens}")
        self.env, self.inner = env, engine or HFEngine()
        self.max_turns, self.max_episode_tokens = max_turns, max_episode_tokens
        self.pixel_bounds = dict(min_pixels=min_pixels, max_pixels=max_pixels)

    # ---- the inner engine does the sampling and holds (or shares) the weights ---------------------------------
    def bind(self, policy, tokenizer) -> None:  # noqa: ANN001
        super().bind(policy, tokenizer)
        self.inner.bind(policy, tokenizer)
        self.processor = PromptProcessor(policy.path, **self.pixel_bounds)  # the frames, as the data's images
        self.image_token = self.processor.family.image_token
        self.eos_id = self.processor.family.eos_token_id(tokenizer)
        self._turn_end = self._template_turn_end()

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        self.inner.update_weights(named_tensors)

    def sleep(self) -> None:
        self.inner.sleep()

    def wake(self) -> None:
        self.inner.wake()

    # ---- the chat template of an environment turn -------------------------------------------------------------
    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    _PROBE = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}]

    def _template_turn_end(self) -> str:
        """What the template writes after an assistant turn's content (ChatML: end-of-turn token + newline)."""
        opened = self._render(self._PROBE[:1], generation_prompt=True)
        closed = self._render(self._PROBE)
        if not closed.startswith(opened + "B"):
            raise ValueError("the tokenizer's chat template does not render an assistant turn as generation prompt + "
                             "content; multi-turn rollouts need that to append turns as tokens")
        return closed[len(opened) + 1 :]

    def _user_turn(self, observation: Observation) -> str:
        """The observation as the template renders a user turn after an assistant turn, generation prompt included."""
        content: str | list[dict[str, Any]] = observation.text
        if observation.images:
            content = [{"type": "image"} for _ in observation.images] + [{"type": "text", "text": observation.text}]
        full = self._render(self._PROBE + [{"role": "user", "content": content}], generation_prompt=True)
        closed = self._render(self._PROBE)
        assert full.startswith(closed), "chat template renders earlier turns differently once a turn is added"
        return full[len(closed) :]

    def _environment_tokens(self, completion: Completion, observation: Observation
                            ) -> tuple[list[int], Tensor | None, Tensor | None]:
        """Tokens that close the model's turn and open the next one around `observation`, and its images."""
        eos_text = self.tokenizer.convert_ids_to_tokens(self.eos_id)
        turn_end = self._turn_end
        ended_by_eos = bool(completion.token_ids) and completion.token_ids[-1] == self.eos_id
        if ended_by_eos and turn_end.startswith(eos_text):
            turn_end = turn_end[len(eos_text) :]  # the model wrote it; a truncated turn gets it from here
        text = turn_end + self._user_turn(observation)
        pixels = grid = None
        if observation.images:
            text, pixels, grid = self._encode_images(text, observation.images)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"], pixels, grid

    def _encode_images(self, text: str, images: list) -> tuple[str, Tensor, Tensor | None]:  # noqa: ANN001
        """`text` with its image placeholders expanded, and the images' pixel values and grids, as prompts get them."""
        where = f"environment {self.env.name}"
        if self.processor.image_processor is None:
            raise ValueError(f"{where}: it shows images but the model has no image processor (text-only model); "
                             f"configure the environment without images")
        text, pixels, grid, _ = self.processor.encode_images(text, images, where)
        return text, pixels, grid

    # ---- the episode loop -------------------------------------------------------------------------------------
    def _turn_prompts(self, prompts: PromptBatch, episodes: list[_Episode]) -> PromptBatch:
        """Each running episode's conversation so far as one left-padded prompt, with all its images."""
        pad = self.tokenizer.pad_token_id
        rows = []
        for e in episodes:
            prompt = prompts.input_ids[e.prompt][prompts.attention_mask[e.prompt].bool()].tolist()
            rows.append(prompt + e.tokens)
        length = max(map(len, rows))
        input_ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows], dtype=torch.long)
        attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        pixels, grids = [], []
        for e in episodes:
            own = [p for p in [prompts.pixel_values[e.prompt], *e.pixel_values] if p is not None]
            own_grids = [g for g in [prompts.image_grid_thw[e.prompt], *e.image_grid_thw] if g is not None]
            pixels.append(torch.cat(own) if own else None)
            grids.append(torch.cat(own_grids) if own_grids else None)
        # `_frames`: the later turns' images themselves, for engines that encode images on their own (vLLM)
        rows = [{**prompts.rows[e.prompt], "_frames": list(e.frames)} if e.frames else prompts.rows[e.prompt]
                for e in episodes]
        return PromptBatch(input_ids, attention_mask, rows, pixels, grids)

    @torch.no_grad()
    def generate(self, prompts: PromptBatch, sampling: SamplingConfig, *, seed: int = 0) -> list[list[Completion]]:
        episodes = []
        for i, row in enumerate(prompts.rows):
            for _ in range(sampling.n):
                env = self.env.clone()
                env.reset(row)
                episodes.append(_Episode(i, env))
        turn_sampling = replace(sampling, n=1)
        for turn in range(self.max_turns):
            running = [e for e in episodes if not e.ended]
            if not running:
                break
            # one seed per (rollout, turn): a rerun (or a resumed run) replays the same episodes
            outputs = self.inner.generate(self._turn_prompts(prompts, running), turn_sampling,
                                          seed=(seed * 1_000_003 + turn) % 2**63)
            for e, (completion,) in zip(running, outputs, strict=True):
                self._advance(e, completion, last_turn=turn == self.max_turns - 1,
                              max_new_tokens=sampling.max_new_tokens)
        results = [self._completion(e) for e in episodes]
        return [results[i * sampling.n : (i + 1) * sampling.n] for i in range(len(prompts))]

    def _advance(self, e: _Episode, completion: Completion, last_turn: bool, max_new_tokens: int) -> None:
        """Append the model's turn, let the environment answer, and append its answer unless the episode ends."""
        e.tokens += completion.token_ids
        e.loss_mask += [1] * len(completion.token_ids)
        e.logprobs += completion.logprobs
        step = e.env.step(completion.text)
        e.rewards.append(float(step.reward))
        e.invalid_actions += bool(step.info.get("invalid", False))
        e.solved = e.solved or bool(step.info.get("solved", False))
        if step.done:
            e.ended = "done"
            return
        if last_turn:
            e.ended = "turns"
            return
        tokens, pixels, grid = self._environment_tokens(completion, step.observation)
        if len(e.tokens) + len(tokens) + max_new_tokens > self.max_episode_tokens:
            e.ended = "tokens"
            return
        e.tokens += tokens
        e.loss_mask += [0] * len(tokens)
        e.logprobs += [0.0] * len(tokens)
        if pixels is not None:
            e.pixel_values.append(pixels)
            e.image_grid_thw.append(grid)
            e.frames.extend(step.observation.images)

    def _completion(self, e: _Episode) -> Completion:
        text = self.tokenizer.decode(e.tokens, skip_special_tokens=False)
        if self.image_token:
            text = re.sub(f"({re.escape(self.image_token)})+", "", text)  # readable: no runs of image tokens
        return Completion(
            token_ids=list(e.tokens), text=text, logprobs=list(e.logprobs),
            finish_reason="length" if e.ended == "tokens" else "stop", loss_mask=list(e.loss_mask),
            pixel_values=torch.cat(e.pixel_values) if e.pixel_values else None,
            image_grid_thw=torch.cat(e.image_grid_thw) if e.image_grid_thw else None,
            episode=e.record(self.env.name))


def episode_means(rows: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per-episode metrics of a batch's rows as (sum, count): turns, invalid actions, solved rate, and lengths:
    `rollout/response_len_mean` counts the model's own tokens (it replaces the plain count, which would include the
    environment's turns), `rollout/episode_len_mean` every token of the conversation after the prompt."""
    episodes = [row["_episode"] for row in rows if "_episode" in row]
    n = float(len(episodes))
    return {"rollout/response_len_mean": (float(sum(e["model_tokens"] for e in episodes)), n),
            "rollout/episode_len_mean": (float(sum(e["tokens"] for e in episodes)), n),
            "rollout/turns_mean": (float(sum(e["turns"] for e in episodes)), n),
            "rollout/invalid_actions_mean": (float(sum(e["invalid_actions"] for e in episodes)), n),
            "rollout/solved_rate": (float(sum(e["solved"] for e in episodes)), n),
            "rollout/turn_budget_ended_frac": (float(sum(e["ended"] != "done" for e in episodes)), n)}
