"""Rollouts with Hugging Face `generate` on the live policy (no weight copy, so nothing to sync).

The default engine on CPU and in tests. Prompts are left-padded, each repeated n times, and split into generation
batches by a token budget so long prompts do not blow up memory. A text prompt's n samples share one prefill: its
tokens (all but the last) run through the decoder once and the KV cache is copied to its n rows before `generate`
continues from it (images, and ZeRO-3's lock-stepped ranks, take the plain path).

Tokens are sampled from the distribution their log-probs are computed from: `generate` gets a generation config built
from `SamplingConfig` alone, and the model folder's saved defaults (generation_config.json: repetition penalty, top-k,
minimum length, ...) are kept out of it. A row's end is where generation stopped it (its eos, or the token that
completed a stop string), never read off the padding: the pad token may be the eos token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from transformers import GenerationConfig
from transformers.generation.stopping_criteria import StoppingCriteriaList, StopStringCriteria

from lmmr1.data.processor import PromptBatch, concat_images
from lmmr1.distributed import global_max, world_size, zero3_partitioned
from lmmr1.distributed.vision import vision_tower_before_generation
from lmmr1.models.families import family_of
from lmmr1.rollout.base import Completion, RolloutEngine, SamplingConfig


class HFEngine(RolloutEngine):
    """`model.generate` with sampled-token log-probs from the raw logits."""

    def __init__(self, max_batch_tokens: int = 65536) -> None:
        """
        Args:
            max_batch_tokens: rows per generate call are capped so rows * (prompt + max_new_tokens) fits this budget.
        """
        self.max_batch_tokens = max_batch_tokens

    def _vision_token_ids(self) -> list[int]:
        """Image placeholder tokens must never be sampled: a generated one would claim an image feature."""
        return family_of(self.policy.model.config).banned_token_ids(self.tokenizer)

    def _chunks(self, n_rows: int, row_tokens: int) -> list[range]:
        per_call = max(1, self.max_batch_tokens // max(row_tokens, 1))
        return [range(i, min(i + per_call, n_rows)) for i in range(0, n_rows, per_call)]

    def _generation_config(self, sampling: SamplingConfig) -> GenerationConfig:
        """Everything `generate` samples with, from `sampling` alone (stop strings: see `_StopStringEnds`)."""
        sample = sampling.temperature > 0
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sample,
            eos_token_id=family_of(self.policy.model.config).eos_token_id(self.tokenizer),
            pad_token_id=self.tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,  # raw logits: the log-probs are the policy's, as in training
            use_cache=True,
            suppress_tokens=self._vision_token_ids() or None,
        )
        if sample:  # top_k explicitly, 0 included: transformers' global default would be 50
            config.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        return config

    @torch.no_grad()
    def generate(self, prompts: PromptBatch, sampling: SamplingConfig, *, seed: int = 0) -> list[list[Completion]]:
        model = self.policy.model
        device = next(model.parameters()).device
        rows = [i for i in range(len(prompts)) for _ in range(sampling.n)]  # prompt index of each of the N rows
        options = dict(generation_config=self._generation_config(sampling))
        if world_size() > 1 and zero3_partitioned(model):
            options.update(synced_gpus=True)  # ranks keep stepping until all are done: each step gathers weights
        completions: list[Completion] = []
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[]), _without_saved_defaults(model):
                torch.manual_seed(seed)
                row_tokens = prompts.input_ids.shape[1] + sampling.max_new_tokens
                chunks = self._chunks(len(rows), row_tokens)
                for chunk in chunks:
                    completions += self._generate_chunk(prompts, [rows[i] for i in chunk], options, sampling, device)
                if options.get("synced_gpus"):  # every rank must make as many generate calls (each is collective)
                    for _ in range(global_max(len(chunks)) - len(chunks)):
                        self._generate_chunk(prompts, rows[:1], options, sampling, device)
        finally:
            model.train(was_training)
        return [completions[i * sampling.n : (i + 1) * sampling.n] for i in range(len(prompts))]

    def _generate_chunk(self, prompts, rows, options, sampling, device) -> list[Completion]:  # noqa: ANN001
        index = torch.tensor(rows)
        inputs = {"input_ids": prompts.input_ids[index].to(device),
                  "attention_mask": prompts.attention_mask[index].to(device)}
        pixels, grids = concat_images([prompts.pixel_values[i] for i in rows],
                                      [prompts.image_grid_thw[i] for i in rows])
        inputs.update(family_of(self.policy.model.config).image_inputs(
            self.policy.model.config, inputs["input_ids"], None if pixels is None else pixels.to(device),
            None if grids is None else grids.to(device), generation=True))
        vision_tower_before_generation(self.policy.model.model, has_images=pixels is not None)
        stops = _StopStringEnds(self.tokenizer, sampling.stop, inputs["input_ids"].shape[1]) if sampling.stop else None
        if pixels is None and not options.get("synced_gpus"):
            options = {**options, **self._shared_prefill(inputs["input_ids"], inputs["attention_mask"], rows)}
        out = self.policy.model.generate(**inputs, **options,
                                         stopping_criteria=StoppingCriteriaList([stops] if stops else []))
        new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]  # (rows, <= max_new_tokens)
        temperature = sampling.temperature if sampling.temperature > 0 else 1.0
        # one step's (rows, V) logits in float32 at a time, log p = logit - logsumexp: never a (rows, steps, V) copy
        token_logprobs = torch.stack([_token_logprobs(logits, new_tokens[:, i], temperature)
                                      for i, logits in enumerate(out.logits)], dim=1)  # (rows, steps)
        eos_id = options["generation_config"].eos_token_id
        stop_ends = stops.ends.tolist() if stops else [0] * len(rows)
        result = []
        for tokens, logprobs, stop_end in zip(new_tokens.tolist(), token_logprobs.tolist(), stop_ends):
            # where generate stopped the row (a sampled eos, or the token completing a stop string); the positions
            # after it are padding, and the pad token may be the eos token, so they are never searched for an end
            ends = [tokens.index(eos_id) + 1] if eos_id in tokens else []
            ends += [stop_end] if stop_end > 0 else []
            length = min(ends, default=len(tokens))
            text = self.tokenizer.decode(tokens[:length], skip_special_tokens=True)
            result.append(Completion(tokens[:length], text, logprobs[:length], "stop" if ends else "length"))
        return result

    def _shared_prefill(self, input_ids: Tensor, attention_mask: Tensor, rows: list[int]) -> dict:
        """{"past_key_values": the KV cache of every row's prompt but its last token, each distinct prompt computed
        once}, or {} when no prompt repeats. `generate` then runs only the last prompt token and the new ones."""
        distinct = list(dict.fromkeys(rows))
        if len(distinct) == len(rows) or input_ids.shape[1] < 2:
            return {}
        first = torch.tensor([rows.index(r) for r in distinct], device=input_ids.device)
        ids, mask = input_ids[first, :-1], attention_mask[first, :-1]
        backbone = self.policy.model.model
        positions = family_of(backbone).positions(backbone, ids, mask, None)
        cache = backbone(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True).past_key_values
        cache.batch_select_indices(torch.tensor([distinct.index(r) for r in rows], device=input_ids.device))
        if hasattr(backbone, "rope_deltas"):  # M-RoPE families: text-only rows, no offset (else a stale one is used)
            backbone.rope_deltas = None
        return {"past_key_values": cache}


def _token_logprobs(logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    """(rows,) float32 log-probs of `tokens` under raw (rows, V) logits divided by the sampling temperature."""
    logits = logits.float() / temperature
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@contextmanager
def _without_saved_defaults(model: nn.Module) -> Iterator[None]:
    """`generate` fills every option its config leaves unset from `model.generation_config`, the folder's saved
    defaults (transformers' `_prepare_generation_config`), before its global ones; a blank one stands in meanwhile."""
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


class _StopStringEnds(StopStringCriteria):
    """transformers' stop-string criterion (matches across token boundaries, and across the prompt's end) that also
    records where it stopped each row: `ends[r]` = response tokens up to the one completing the first match, 0 while
    none. Past that point `generate` pads the row, so this, not the padding, says where the row ends."""

    def __init__(self, tokenizer, stop: list[str], prompt_len: int) -> None:  # noqa: ANN001
        super().__init__(tokenizer=tokenizer, stop_strings=list(stop))
        self.prompt_len = prompt_len
        self.ends: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor | None, **kwargs) -> Tensor:  # noqa: ANN003
        done = super().__call__(input_ids, scores, **kwargs)
        if self.ends is None:
            self.ends = torch.zeros(input_ids.shape[0], dtype=torch.long)
        first = done.cpu() & (self.ends == 0)
        self.ends[first] = input_ids.shape[1] - self.prompt_len
        return done
