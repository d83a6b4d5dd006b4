"""The typed batch that flows through one RL step: sampled sequences plus everything computed about them.

Shape letters: B prompts, G samples per prompt, N = B*G rows, P prompt tokens, T response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from lmmr1.data.processor import PromptBatch, concat_images
from lmmr1.rollout.base import Completion


@dataclass
class Experience:
    input_ids: Tensor  # (N, P+T) left-padded prompt + right-padded response
    attention_mask: Tensor  # (N, P+T)
    response_mask: Tensor  # (N, T) float, 1 = a generated token that gets gradient
    rollout_logprobs: Tensor  # (N, T) the engine's log-probs of the sampled tokens
    truncated: Tensor  # (N,) bool, finish_reason == "length"
    pixel_values: list[Tensor | None]  # (N,) per-row image patches
    image_grid_thw: list[Tensor | None]  # (N,) per-row image grids
    responses: list[str]  # (N,) decoded responses
    rows: list[dict[str, Any]]  # (N,) data row of each sample's prompt
    group_size: int  # G
    old_logprobs: Tensor | None = None  # (N, T) policy log-probs before the update (no grad)
    ref_logprobs: Tensor | None = None  # (N, T) reference model log-probs
    values: Tensor | None = None  # (N, T) critic values before the update
    rewards: Tensor | None = None  # (N,) total sequence reward
    advantages: Tensor | None = None  # (N, T)
    returns: Tensor | None = None  # (N, T)

    @classmethod
    def from_rollout(cls, prompts: PromptBatch, completions: list[list[Completion]], pad_id: int) -> Experience:
        """Lay the B prompts' G completions out as N = B*G rows (group-contiguous)."""
        group_size = len(completions[0])
        flat = [(i, c) for i, group in enumerate(completions) for c in group]
        index = torch.tensor([i for i, _ in flat])
        T = max(1, max(len(c.token_ids) for _, c in flat))
        response = torch.full((len(flat), T), pad_id, dtype=torch.long)
        response_mask = torch.zeros(len(flat), T)
        rollout_logprobs = torch.zeros(len(flat), T)
        response_attention = torch.zeros(len(flat), T, dtype=torch.long)
        for row, (_, c) in enumerate(flat):
            response[row, : len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long)
            response_attention[row, : len(c.token_ids)] = 1
            # a multi-turn episode's environment tokens are attended to but get no gradient
            response_mask[row, : len(c.token_ids)] = 1 if c.loss_mask is None else torch.tensor(c.loss_mask)
            rollout_logprobs[row, : len(c.logprobs)] = torch.tensor(c.logprobs)
        return cls(
            input_ids=torch.cat([prompts.input_ids[index], response], dim=1),
            attention_mask=torch.cat([prompts.attention_mask[index], response_attention], dim=1),
            response_mask=response_mask,
            rollout_logprobs=rollout_logprobs,
            truncated=torch.tensor([c.finish_reason == "length" for _, c in flat]),
            pixel_values=[_cat(prompts.pixel_values[i], c.pixel_values) for i, c in flat],
            image_grid_thw=[_cat(prompts.image_grid_thw[i], c.image_grid_thw) for i, c in flat],
            responses=[c.text for _, c in flat],
            rows=[c.row_for(prompts.rows[i]) for i, c in flat],
            group_size=group_size,
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]

    def select(self, index: list[int]) -> Experience:
        """The rows at `index` (a micro-batch); tensors and lists are sliced alike."""
        idx = torch.tensor(index, dtype=torch.long)
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = value[idx.to(value.device)]
            elif isinstance(value, list):
                changes[f.name] = [value[i] for i in index]
        return replace(self, **changes)

    def micro_batches(self, size: int, max_tokens: int | None = None, packed: bool = False) -> list[Experience]:
        """Consecutive rows, `size` at a time; with `max_tokens`, as many rows as fit that many tokens instead (real
        tokens when packed, rows x padded length otherwise; a row longer than the budget goes alone)."""
        if max_tokens is None:
            return [self.select(list(range(i, min(i + size, len(self))))) for i in range(0, len(self), size)]
        costs = self.attention_mask.sum(-1).tolist() if packed else [self.input_ids.shape[1]] * len(self)
        groups: list[list[int]] = [[]]
        total = 0
        for row, cost in enumerate(costs):
            if groups[-1] and total + cost > max_tokens:
                groups.append([])
                total = 0
            groups[-1].append(row)
            total += cost
        return [self.select(group) for group in groups]

    def to(self, device: torch.device | str) -> Experience:
        changes = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                   if isinstance(getattr(self, f.name), Tensor)}
        return replace(self, **changes)

    def prompt_leaders(self) -> Tensor:
        """(N,) for each row, the first of the consecutive rows that share its prompt: the same prompt tokens and the
        same image tensors (samples of one prompt hold the very same ones; a row with images of its own, e.g. from
        a later turn of an episode, leads its own group)."""
        prompt_len = self.input_ids.shape[1] - self.response_len
        prompts = self.input_ids[:, :prompt_len] * self.attention_mask[:, :prompt_len]
        leaders = list(range(len(self)))
        for row in range(1, len(self)):
            if (self.pixel_values[row] is self.pixel_values[row - 1]
                    and self.image_grid_thw[row] is self.image_grid_thw[row - 1]
                    and torch.equal(self.attention_mask[row, :prompt_len], self.attention_mask[row - 1, :prompt_len])
                    and torch.equal(prompts[row], prompts[row - 1])):
                leaders[row] = leaders[row - 1]
        return torch.tensor(leaders, device=self.input_ids.device)

    def model_inputs(self, share_prompts: bool = False) -> dict[str, Any]:
        """Keyword arguments for `Policy.logprobs` (images concatenated in row order). `share_prompts`: rows of one
        prompt carry it once (`prompt_leaders`), so only the leading rows' images are passed."""
        leaders = self.prompt_leaders() if share_prompts else None
        rows = range(len(self)) if leaders is None else [n for n in range(len(self)) if int(leaders[n]) == n]
        pixels, grids = concat_images([self.pixel_values[n] for n in rows], [self.image_grid_thw[n] for n in rows])
        device = self.input_ids.device
        inputs = dict(input_ids=self.input_ids, attention_mask=self.attention_mask, response_len=self.response_len,
                      pixel_values=None if pixels is None else pixels.to(device),
                      image_grid_thw=None if grids is None else grids.to(device))
        return inputs if leaders is None else inputs | {"prompt_leaders": leaders}

    @classmethod
    def concat(cls, parts: list[Experience]) -> Experience:
        """Row-wise concatenation of rollouts (e.g. of different prompt batches): prompts are left-padded to the
        longest prompt and responses right-padded to the longest response, as each part already is inside. Only the
        rollout fields are kept; scoring comes after."""
        T = max(p.response_len for p in parts)
        P = max(p.input_ids.shape[1] - p.response_len for p in parts)

        def cat(name: str) -> Tensor:
            return torch.cat([torch.nn.functional.pad(getattr(p, name), (0, T - p.response_len)) for p in parts])

        def cat_sequence(name: str) -> Tensor:  # (N, P + T): left-pad the prompt part, right-pad the response part
            padded = []
            for p in parts:
                prompt_len = p.input_ids.shape[1] - p.response_len
                padded.append(torch.nn.functional.pad(getattr(p, name), (P - prompt_len, T - p.response_len)))
            return torch.cat(padded)

        return cls(
            input_ids=cat_sequence("input_ids"),  # padded with 0: masked out by attention_mask and response_mask
            attention_mask=cat_sequence("attention_mask"),
            response_mask=cat("response_mask"),
            rollout_logprobs=cat("rollout_logprobs"),
            truncated=torch.cat([p.truncated for p in parts]),
            pixel_values=[x for p in parts for x in p.pixel_values],
            image_grid_thw=[x for p in parts for x in p.image_grid_thw],
            responses=[x for p in parts for x in p.responses],
            rows=[x for p in parts for x in p.rows],
            group_size=parts[0].group_size,
        )


def _cat(prompt: Tensor | None, response: Tensor | None) -> Tensor | None:
    """A row's images in token order: the prompt's, then those inside the response (later turns of an episode)."""
    if response is None:
        return prompt
    return response if prompt is None else torch.cat([prompt, response])
