"""Rollouts with Hugging Face `generate` on the live policy (no weight copy, so nothing to sync).

The default engine on CPU and in tests. Prompts are left-padded, each repeated n times, and split into generation
batches by a token budget so long prompts do not blow up memory.
"""

from __future__ import annotations

import torch

from lmmr1.data.processor import PromptBatch, concat_images
from lmmr1.distributed import data_parallel, global_max, zero3_partitioned
from lmmr1.distributed.vision import vision_tower_before_generation
from lmmr1.modules.packing import mm_token_type_ids
from lmmr1.rollout.base import Completion, RolloutEngine, SamplingConfig

VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


class HFEngine(RolloutEngine):
    """`model.generate` with sampled-token log-probs from the raw logits."""

    def __init__(self, max_batch_tokens: int = 65536) -> None:
        """
        Args:
            max_batch_tokens: rows per generate call are capped so rows * (prompt + max_new_tokens) fits this budget.
        """
        self.max_batch_tokens = max_batch_tokens

    def _vision_token_ids(self) -> list[int]:
        """Image placeholder tokens must never be sampled: a generated <|image_pad|> would claim an image feature."""
        ids = [self.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
        return [i for i in ids if i is not None and i != self.tokenizer.unk_token_id]

    def _chunks(self, n_rows: int, row_tokens: int) -> list[range]:
        per_call = max(1, self.max_batch_tokens // max(row_tokens, 1))
        return [range(i, min(i + per_call, n_rows)) for i in range(0, n_rows, per_call)]

    @torch.no_grad()
    def generate(self, prompts: PromptBatch, sampling: SamplingConfig, *, seed: int = 0) -> list[list[Completion]]:
        model = self.policy.model
        device = next(model.parameters()).device
        rows = [i for i in range(len(prompts)) for _ in range(sampling.n)]  # prompt index of each of the N rows
        eos_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        options = dict(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sampling.temperature > 0,
            temperature=sampling.temperature if sampling.temperature > 0 else None,
            top_p=sampling.top_p if sampling.temperature > 0 else None,
            top_k=sampling.top_k if sampling.temperature > 0 else None,
            eos_token_id=eos_id,
            pad_token_id=self.tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
            use_cache=True,
            suppress_tokens=self._vision_token_ids() or None,
        )
        if sampling.stop:
            options.update(stop_strings=sampling.stop, tokenizer=self.tokenizer)
        if data_parallel().active and zero3_partitioned(model):
            options.update(synced_gpus=True)  # ranks keep stepping until all are done: each step gathers weights
        completions: list[Completion] = []
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[]):
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
        if pixels is not None:  # the modality map switches Qwen-VL generation to M-RoPE, as in training and vLLM
            inputs.update(pixel_values=pixels.to(device), image_grid_thw=grids.to(device),
                          mm_token_type_ids=mm_token_type_ids(self.policy.model.config, inputs["input_ids"]))
        vision_tower_before_generation(self.policy.model.model, has_images=pixels is not None)
        out = self.policy.model.generate(**inputs, **options)
        new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]  # (rows, <= max_new_tokens)
        logits = torch.stack(out.logits, dim=1).float()  # (rows, steps, V)
        if sampling.temperature > 0:
            logits = logits / sampling.temperature
        token_logprobs = torch.log_softmax(logits, -1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        eos_id, pad_id = options["eos_token_id"], options["pad_token_id"]
        result = []
        for tokens, logprobs in zip(new_tokens.tolist(), token_logprobs.tolist()):
            length = len(tokens)
            if eos_id in tokens:
                length = tokens.index(eos_id) + 1
            elif pad_id in tokens:  # stopped by a stop string; the rest is padding
                length = tokens.index(pad_id)
            stopped = length < sampling.max_new_tokens or tokens[length - 1] == eos_id
            text = self.tokenizer.decode(tokens[:length], skip_special_tokens=True)
            result.append(Completion(tokens[:length], text, logprobs[:length], "stop" if stopped else "length"))
        return result
