"""Keeps a rollout engine that holds its own weights (vLLM) in step with the policy, around the training phase.

    trainer: {callbacks: [{class_path: lmmr1.callbacks.weight_sync.WeightSync}]}

Before each batch's rollout (`on_train_batch_start`) and before validation: wake the engine and, if an optimizer step
changed the policy since the last sync, stream the policy's weights into it (LoRA merged; under DeepSpeed ZeRO-3
gathered group by group). The LightningModule then only calls `engine.generate`, and puts the engine back to sleep
after its rollout. After each sync a few prompts of the batch are sampled and the engine's log-probs are compared
with the policy's own (`rollout/sync_gap_mean`, `rollout/sync_gap_max`); a gap past `warn_gap` is a warning, since it
means the engine samples from weights other than the ones being trained (a broken or partial sync).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lmmr1.distributed import zero3_partitioned
from lmmr1.modules.policy import is_lora_layer, lora_merged_weight
from lmmr1.rollout.base import RolloutEngine, SamplingConfig


def holds_own_weights(engine: RolloutEngine) -> bool:
    """Engines that share the policy's weights (HFEngine) keep the base class's no-op `update_weights`; a wrapping
    engine (the multi-turn engine's `inner`) holds what the engine it wraps holds."""
    inner = getattr(engine, "inner", None)
    if isinstance(inner, RolloutEngine):
        return holds_own_weights(inner)
    return type(engine).update_weights is not RolloutEngine.update_weights


def _group_weights(module: nn.Module, prefix: str) -> Iterator[tuple[str, Tensor]]:
    """HF-named tensors of one module whose parameters are gathered; peft LoRA layers are merged on the fly."""
    if is_lora_layer(module):  # base weight + active adapters, into a new tensor (the model is never touched)
        yield f"{prefix}weight", lora_merged_weight(module)
        if module.base_layer.bias is not None:
            yield f"{prefix}bias", module.base_layer.bias.detach().clone()
        return
    for name, param in module.named_parameters(recurse=False):
        yield f"{prefix}{name}", param.detach().clone()  # clone: the gathered storage is released on exit


def zero3_weights(model: nn.Module, chunk_mb: float = 512.0) -> Iterator[tuple[str, Tensor]]:
    """Stream a ZeRO-3 partitioned model's full weights: modules are gathered a chunk (~chunk_mb) at a time with
    `deepspeed.zero.GatheredParameters`, their tensors copied out and the partitions released again."""
    import deepspeed

    def owners() -> Iterator[tuple[str, nn.Module]]:  # modules with their own params; LoRA layers as one unit
        skip: tuple[str, ...] = ()
        for name, module in model.named_modules():
            if skip and name.startswith(skip):
                continue
            if is_lora_layer(module):
                skip = (f"{name}.",)
                yield name, module
            elif any(True for _ in module.parameters(recurse=False)):
                yield name, module

    chunk: list[tuple[str, nn.Module]] = []
    size = 0.0
    for name, module in [*owners(), (None, None)]:
        if module is not None:
            chunk.append((name, module))
            size += sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in module.parameters()) / 2**20
        if chunk and (module is None or size >= chunk_mb):
            params = [p for _, m in chunk for p in m.parameters()]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                for prefix, owner in chunk:
                    yield from _group_weights(owner, f"{prefix}." if prefix else "")
            chunk, size = [], 0.0


def policy_weights(policy: Any, chunk_mb: float = 512.0) -> Iterator[tuple[str, Tensor]]:
    """The policy's HF-named weights for an engine: `lm_head.weight` included even when tied to the embeddings
    (vLLM loads its tied head from that name), LoRA merged, ZeRO-3 partitions gathered chunk by chunk."""
    model = policy.model
    if not zero3_partitioned(model):
        yield from policy.weights_for_sync().items()  # state_dict names: tied lm_head.weight is in it
        return
    # every module owning a parameter is visited, so a tied lm_head yields lm_head.weight like the embeddings
    yield from zero3_weights(model, chunk_mb)


class WeightSync(L.Callback):
    """Wake + sync (+ sync check) before rollouts; nothing for engines that share the policy's weights."""

    def __init__(self, check_prompts: int = 2, check_tokens: int = 16, warn_gap: float = 0.05,
                 chunk_mb: float = 512.0) -> None:
        """
        Args:
            check_prompts: prompts of the batch sampled after each sync to compare engine and policy log-probs
                (0 = no check).
            check_tokens: response tokens per check sample.
            warn_gap: warn when the mean |engine - policy| log-prob gap of the check exceeds this.
            chunk_mb: under ZeRO-3, parameters gathered per chunk of the stream.
        """
        self.check_prompts, self.check_tokens, self.warn_gap, self.chunk_mb = (check_prompts, check_tokens,
                                                                                warn_gap, chunk_mb)
        self._synced_step: int | None = None

    def _sync(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """Push the weights if an optimizer step changed them; True if a sync happened."""
        engine = pl_module.engine
        engine.wake()
        if not holds_own_weights(engine) or self._synced_step == trainer.global_step:
            return False
        first = self._synced_step is None and trainer.global_step == 0  # the engine loaded these weights itself
        self._synced_step = trainer.global_step
        if first:
            return False
        start = time.perf_counter()
        engine.update_weights(policy_weights(pl_module.policy, self.chunk_mb))
        pl_module.log("rollout/weight_sync_s", time.perf_counter() - start, batch_size=1)
        return True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._sync(trainer, pl_module) and self.check_prompts > 0:
            gap_mean, gap_max = self.sync_gap(pl_module, batch.select(list(range(min(self.check_prompts,
                                                                                     len(batch))))))
            pl_module.log_dict({"rollout/sync_gap_mean": gap_mean, "rollout/sync_gap_max": gap_max}, batch_size=1)
            if gap_mean > self.warn_gap:
                warnings.warn(f"step {trainer.global_step}: after the weight sync the engine's log-probs differ from "
                              f"the policy's by {gap_mean:.3g} on average (max {gap_max:.3g}), more than warn_gap="
                              f"{self.warn_gap}: the engine is not sampling from the trained weights", stacklevel=1)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(trainer, pl_module)  # validation scores must come from the current weights

    def sync_gap(self, pl_module: L.LightningModule, prompts: Any) -> tuple[float, float]:
        """Mean and max |engine - policy| log-prob over the response tokens of one sample per prompt."""
        from lmmr1.modules.experience import Experience

        temperature = pl_module.sampling.temperature or 1.0
        sampling = SamplingConfig(n=1, temperature=temperature, max_new_tokens=self.check_tokens)
        engine = getattr(pl_module.engine, "inner", pl_module.engine)  # a multi-turn engine: one turn, no episodes
        completions = engine.generate(prompts, sampling, seed=pl_module.global_step)
        exp = Experience.from_rollout(prompts, completions, pl_module.tokenizer.pad_token_id).to(pl_module.device)
        with torch.no_grad():
            logprobs, _ = pl_module.policy.logprobs(**exp.model_inputs(), temperature=temperature)
        gap = (logprobs.float() - exp.rollout_logprobs).abs() * exp.response_mask
        return float(gap.sum() / exp.response_mask.sum().clamp(min=1)), float(gap.max())
