"""Supervised fine-tuning on (prompt, answer) rows: the cross-entropy of the answer tokens given prompt + images.

Its first job is vision alignment (`configs/demo/align_vision.yaml`): a fresh vision tower + merger learn to speak
the frozen language model's language by reading synthetic images, before RL. Validation decodes greedily through the
rollout engine and scores exact match, per datasource.

A fresh tower learns slowly through a frozen language model (every step is a full LM forward and backward, and the
gradient reaching the image tokens is weak at first). `ctc_steps` adds a cheap first phase without the LM: the image
tokens of each picture, scored by cosine against the LM's own token embeddings, learn to spell the target's tokens
left to right under a CTC loss (arXiv:cs/0606061), so they start the second phase pointing at the embeddings of the
tokens they show.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from transformers import AutoTokenizer

from lmmr1.data.processor import PromptBatch, concat_images
from lmmr1.modules.evaluation import EvalMeans, eval_prefix, log_eval_means, log_mean
from lmmr1.modules.policy import Policy
from lmmr1.rollout.base import RolloutEngine, SamplingConfig
from lmmr1.rollout.hf import HFEngine


class SFTModule(L.LightningModule):
    """Teacher-forced answer tokens; automatic optimization, so Lightning's gradient clipping, accumulation and LR
    schedulers apply as usual."""

    def __init__(
        self,
        policy: Policy,
        target_key: str = "answer",
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        engine: RolloutEngine | None = None,
        max_new_tokens: int = 8,
        ctc_steps: int = 0,
        ctc_blank: str = " ",
        ctc_scale: float = 20.0,
    ) -> None:
        """
        Args:
            policy: the model; its `freeze` decides what trains (vision alignment: the language model and LM head).
            target_key: the row field holding the target text; the end-of-turn token is appended to it.
            optimizer: e.g. {class_path: torch.optim.AdamW, init_args: {lr: 1.0e-3}} (default AdamW lr 1e-4).
            lr_scheduler: stepped once per optimizer step, e.g. a warm-up.
            engine: generation for validation (default: Hugging Face generate on the live policy).
            max_new_tokens: greedy decoding budget in validation.
            ctc_steps: optimizer steps of the LM-free CTC phase before answer cross-entropy (0 = none); needs one
                image per row and a model whose input embeddings are its output embeddings' vocabulary.
            ctc_blank: the text of the token that plays CTC's blank (an image token that shows nothing).
            ctc_scale: inverse temperature of the cosine scores in the CTC phase.
        """
        super().__init__()
        self.policy, self.target_key = policy, target_key
        self.make_optimizer, self.make_lr_scheduler = optimizer, lr_scheduler
        self.engine = engine or HFEngine()
        self.decoding = SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
        self.ctc_steps, self.ctc_blank, self.ctc_scale = ctc_steps, ctc_blank, ctc_scale
        self.eval_means = EvalMeans()  # validation/test means, gathered over ranks at the end of each epoch
        self.save_hyperparameters({"policy": policy.settings(), "target_key": target_key})

    def setup(self, stage: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(self.policy.path, padding_side="left")
        self.engine.bind(self.policy, self.tokenizer)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4) if self.make_optimizer is None else self.make_optimizer(params)
        if self.make_lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.make_lr_scheduler(optimizer), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["policy_settings"] = self.policy.settings()  # `lmmr1 model export` rebuilds the policy from it

    def targets(self, batch: PromptBatch) -> tuple[dict[str, Any], Tensor]:
        """`Policy.logprobs` inputs of prompt + target rows, and the (B, T) mask of the target tokens."""
        pieces = []
        for i, row in enumerate(batch.rows):
            text = row.get(self.target_key)
            if not isinstance(text, str) or not text:
                raise ValueError(f"{row.get('_where', f'batch row {i}')}: {self.target_key!r} is missing or empty; "
                                 f"SFT needs the target text there")
            pieces.append(self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id])
        T = max(map(len, pieces))
        target = torch.full((len(pieces), T), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(pieces), T, dtype=torch.long)
        for i, ids in enumerate(pieces):
            target[i, : len(ids)], mask[i, : len(ids)] = torch.tensor(ids), 1
        target, mask = target.to(batch.input_ids.device), mask.to(batch.input_ids.device)
        pixels, grids = concat_images(batch.pixel_values, batch.image_grid_thw)
        inputs = dict(input_ids=torch.cat([batch.input_ids, target], 1),
                      attention_mask=torch.cat([batch.attention_mask, mask], 1), response_len=T,
                      pixel_values=None if pixels is None else pixels.to(self.device),
                      image_grid_thw=None if grids is None else grids.to(self.device))
        return inputs, mask.float()

    def loss(self, batch: PromptBatch) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy over all target tokens, and the share of rows whose every target token has p > 1/2
        (then each is the argmax: a cheap lower bound of teacher-forced exact match)."""
        inputs, mask = self.targets(batch)
        logprobs, _ = self.policy.logprobs(**inputs)
        loss = -(logprobs * mask).sum() / mask.sum()
        exact = ((logprobs.detach() > -0.6931) | (mask == 0)).all(-1).float().mean()
        return loss, exact

    def ctc_loss(self, batch: PromptBatch) -> Tensor:
        """CTC of each row's target tokens over its image tokens (mean over rows of the per-token-normalised loss).

        A frame's score for a token is `ctc_scale` x the cosine between the image token and the token's input
        embedding, over the tokens of this batch's targets plus the blank: the small, similar embeddings of digits
        make a full-vocabulary softmax of raw dot products reward norm growth rather than pointing at the digit.
        """
        for i, (pixels, grids, row) in enumerate(zip(batch.pixel_values, batch.image_grid_thw, batch.rows)):
            if _image_count(pixels, grids) != 1:
                raise ValueError(f"{row.get('_where', f'batch row {i}')}: the CTC phase (ctc_steps) needs exactly one "
                                 f"image per row")
        blank = self.tokenizer(self.ctc_blank, add_special_tokens=False)["input_ids"]
        if len(blank) != 1:
            raise ValueError(f"--model.init_args.ctc_blank: {self.ctc_blank!r} is {len(blank)} tokens, must be one")
        targets = [self.tokenizer(row[self.target_key], add_special_tokens=False)["input_ids"] for row in batch.rows]
        classes = sorted({t for ts in targets for t in ts} | set(blank))
        column = {token: i for i, token in enumerate(classes)}
        pixels, grids = concat_images(batch.pixel_values, batch.image_grid_thw)
        family = self.policy.family
        try:
            features = family.image_features(self.policy.model.model, pixels.to(self.device),
                                             None if grids is None else grids.to(self.device))
        except NotImplementedError:
            raise ValueError(f"--model.init_args.ctc_steps: the CTC phase needs the image features of the "
                             f"{family.name} family, which its adapter does not provide; set ctc_steps: 0") from None
        frames = torch.nn.functional.normalize(torch.cat(features).float(), dim=-1)
        embeddings = self.policy.model.get_input_embeddings().weight[classes].float()
        logp = (self.ctc_scale * frames @ torch.nn.functional.normalize(embeddings, dim=-1).T).log_softmax(-1)
        lengths = [len(f) for f in features]
        logp = torch.stack([torch.nn.functional.pad(piece, (0, 0, 0, max(lengths) - len(piece)))
                            for piece in logp.split(lengths)], dim=1)  # (frames, B, classes)
        return torch.nn.functional.ctc_loss(
            logp, torch.tensor([column[t] for ts in targets for t in ts], device=self.device),
            input_lengths=torch.tensor(lengths), target_lengths=torch.tensor(list(map(len, targets))),
            blank=column[blank[0]], zero_infinity=True)

    def training_step(self, batch: PromptBatch, batch_idx: int) -> Tensor:
        if self.global_step < self.ctc_steps:
            loss = self.ctc_loss(batch)
            self.log("train/ctc_loss", loss, prog_bar=True, batch_size=len(batch))
            return loss
        loss, exact = self.loss(batch)
        self.log_dict({"train/loss": loss, "train/exact": exact}, prog_bar=True, batch_size=len(batch))
        return loss

    def validation_step(self, batch: PromptBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Greedy exact match of the stripped generation against the target, per validation set and datasource."""
        prefix = eval_prefix(self, dataloader_idx)
        completions = self.engine.generate(batch, self.decoding)
        for row, group in zip(batch.rows, completions):
            if row.get("_pad"):  # repeats a row to even out the ranks' shares; not counted
                continue
            right = float(group[0].text.strip() == str(row.get(self.target_key, "")).strip())
            for name in (f"{prefix}/exact", f"{prefix}/{row.get('datasource', 'unknown')}/exact"):
                log_mean(self, name, right)

    def on_validation_epoch_end(self) -> None:
        log_eval_means(self)

    def on_test_epoch_end(self) -> None:
        log_eval_means(self)

    def test_step(self, batch: PromptBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx, dataloader_idx)


def _image_count(pixels: Tensor | None, grids: Tensor | None) -> int:
    """Images of one row in the families' layout: one grid row each where images have grids, else one pixel block."""
    if pixels is None:
        return 0
    return len(grids) if grids is not None else len(pixels)
