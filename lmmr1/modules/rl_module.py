"""The RL LightningModule: one training step = rollout -> rewards -> advantages -> clipped policy update.

It orchestrates and does no math: every formula lives in `lmmr1.modules.algorithms`, chosen by name from
`AlgorithmConfig`. Manual optimization, so PPO epochs, micro-batches and gradient clipping are explicit.
Run: `lmmr1 fit -c configs/demo/smoke.yaml`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from transformers import AutoTokenizer

from lmmr1.callbacks.weight_sync import WeightSync, holds_own_weights
from lmmr1.data.processor import PromptBatch
from lmmr1.distributed import (
    all_gather_objects,
    any_rank,
    data_parallel,
    global_max,
    global_stats,
    global_sum,
)
from lmmr1.distributed.sequence_parallel import broadcast_from_group_leader, init_sequence_parallel, sequence_parallel
from lmmr1.modules.algorithm_config import AlgorithmConfig
from lmmr1.modules.algorithms import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    aggregate,
    build_kl_controller,
    entropy_bonus,
    filter_groups,
    first_in_stream,
    loss_units,
    micro_batch_share,
    overlong_penalty,
    truncated_importance_weights,
    value_loss,
)
from lmmr1.modules.critic import Critic
from lmmr1.modules.evaluation import (
    EvalConfig,
    EvalMeans,
    eval_prefix,
    greedy_metrics,
    log_eval_means,
    log_mean,
    pass_metrics,
)
from lmmr1.modules.experience import Experience
from lmmr1.modules.master_weights import MasterWeights
from lmmr1.modules.policy import Policy
from lmmr1.rewards import Reward, RewardOutput, build_reward
from lmmr1.rollout.base import RolloutEngine, SamplingConfig
from lmmr1.rollout.hf import HFEngine
from lmmr1.rollout.multi_turn import MultiTurnEngine, episode_means


def _select_scores(scores: RewardOutput, rows: list[int]) -> RewardOutput:
    components = {k: [v[i] for i in rows] for k, v in scores.components.items()}
    return RewardOutput([scores.total[i] for i in rows], components, scores.stats)


def _merge_scores(parts: list[RewardOutput]) -> RewardOutput:
    """The scores of several generation rounds as one, in order (reward statistics such as timeouts add up)."""
    names = {k for p in parts for k in p.components}
    stats: dict[str, float] = {}
    for p in parts:
        for k, v in p.stats.items():
            stats[k] = stats.get(k, 0.0) + float(v)
    return RewardOutput([t for p in parts for t in p.total],
                        {k: [v for p in parts for v in p.components.get(k, [float("nan")] * len(p.total))]
                         for k in names}, stats)


PERF_PHASES = ("generate", "reward", "old_logprob", "ref", "train")
"""Phases of a training step whose wall seconds are logged every step as `perf/<phase>_s`."""


@contextmanager
def _timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    """Add the block's wall time to `seconds[phase]`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start


@dataclass
class Rollout:
    """One step's sampled experience: what is trained on, and everything generated (for honest reward curves)."""

    exp: Experience
    """The samples trained on (with dynamic sampling: the kept groups, cut to the batch size)."""
    scores: RewardOutput
    """Their rewards."""
    generated: RewardOutput
    """Rewards of every sample generated this step, kept or not."""
    generated_groups: int
    """Prompt groups generated on this rank."""
    rounds: int
    """Generation batches drawn (1 + extra batches of dynamic sampling)."""
    first_row: Experience
    """One generated sample, kept or not: the template of the zero-weight fillers that keep ranks in step."""


class RLModule(L.LightningModule):
    """Actor (+ frozen reference) trained with rule-based rewards."""

    def __init__(
        self,
        policy: Policy,
        reward: Reward | str | dict[str, Any] = "math",
        engine: RolloutEngine | None = None,
        sampling: SamplingConfig | None = None,
        algorithm: AlgorithmConfig | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        evaluation: EvalConfig | None = None,
        critic: Critic | None = None,
    ) -> None:
        """
        Args:
            policy: the model being trained; a frozen copy becomes the KL reference when `algorithm.kl.coef > 0`.
            reward: a Reward (class_path), or a spec `build_reward` understands: a name ("math", "sokoban", ...), a
                plug-in "file.py:fn", a YAML path, or a mapping with `routes` by datasource (see README).
            engine: rollout engine (default: Hugging Face generate on the live policy).
            sampling: how completions are sampled (n = group size G).
            algorithm: advantage estimator, KL, loss, clipping, PPO epochs (see README's table).
            optimizer: e.g. {class_path: torch.optim.AdamW, init_args: {lr: 1.0e-6}} (default AdamW lr 1e-6).
            lr_scheduler: e.g. {class_path: torch.optim.lr_scheduler.LinearLR, init_args: {start_factor: 0.1,
                total_iters: 10}}; stepped once per optimizer step (warm-up, decay).
            evaluation: validation decoding (greedy accuracy always; pass@k with n > 1 samples).
            critic: value model for `advantage: gae` (initialised from the policy's weights unless given a path).
        """
        super().__init__()
        self.automatic_optimization = False
        self.policy = policy
        self.reward = build_reward(reward)
        self.engine = engine or HFEngine()
        self.sampling = sampling or SamplingConfig()
        self.algorithm = algorithm or AlgorithmConfig()
        self.algorithm.check(has_critic=critic is not None, group_size=self.sampling.n,
                             max_new_tokens=self.sampling.max_new_tokens)
        if critic is not None and critic.backbone is None:
            critic.build(policy.path)
        if critic is not None and critic.packing is None:
            critic.packing = policy.packing
        if critic is not None and policy.share_prompts and not critic.packing:
            raise ValueError("--model.critic.init_args.packing false: the policy shares prompts "
                             "(--model.policy.init_args.share_prompts true), which the critic's forwards follow; "
                             "pack the critic too or stop sharing")
        if critic is not None:
            critic.follow_sequence_parallel(policy.sequence_parallel_size)
        self.critic = critic
        self.make_optimizer, self.make_lr_scheduler = optimizer, lr_scheduler
        self.eval_means = EvalMeans()  # validation/test means, gathered over ranks at the end of each epoch
        self.evaluation = evaluation or EvalConfig()
        # plain dicts, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({"sampling": asdict(self.sampling), "algorithm": asdict(self.algorithm),
                                   "evaluation": asdict(self.evaluation), "policy": policy.settings()})
        self.reference = None
        if self.algorithm.needs_reference:
            # built like the policy (dtype, attention kernel, packing): a kernel difference alone would be a KL floor
            self.reference = Policy(policy.path, dtype=str(next(policy.parameters()).dtype).removeprefix("torch."),
                                    attn_implementation=policy.attn_implementation,
                                    logprob_chunk=policy.logprob_chunk, packing=policy.packing,
                                    sequence_parallel_size=policy.sequence_parallel_size,
                                    share_prompts=policy.share_prompts)
            self.reference.requires_grad_(False).eval()
        self.kl_controller = build_kl_controller(self.algorithm.kl)
        self.grad_clip = self.algorithm.grad_clip.build()
        self.perf = dict.fromkeys(PERF_PHASES, 0.0)  # this step's seconds per phase (rank-local), logged as perf/*
        self.master: MasterWeights | None = None  # float32 copies of bf16/fp16 weights for the optimizer
        self._saved_master: list[Tensor] | None = None
        self.skipped_steps = 0  # optimizer steps dropped for a non-finite loss or gradient, and how many in a row
        self.nonfinite_in_a_row = 0

    # ---- Lightning plumbing -------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        init_sequence_parallel(self.policy.sequence_parallel_size)  # before any dataloader asks for its share
        if sequence_parallel().active:
            rank_zero_info(f"sequence parallelism: {data_parallel().size} data-parallel replica(s) x "
                           f"{sequence_parallel().size} ranks per packed row")
        self.tokenizer = AutoTokenizer.from_pretrained(self.policy.path, padding_side="left")
        self.engine.bind(self.policy, self.tokenizer)
        if stage == "fit" and holds_own_weights(self.engine) and not any(
                isinstance(c, WeightSync) for c in self.trainer.callbacks):
            raise ValueError(f"--model.engine: {type(self.engine).__name__} samples from its own copy of the weights, "
                             f"and nothing would refresh it after an update (training would go on against the "
                             f"starting policy); add the callback lmmr1.callbacks.weight_sync.WeightSync to "
                             f"--trainer.callbacks")
        datamodule = self.trainer.datamodule
        if stage == "fit" and hasattr(datamodule, "all_train_rows"):
            self.reward.check_rows(datamodule.all_train_rows())  # uncovered datasources fail now, not mid-run
        self.reward.start()  # math-verify workers import while the first rollout generates

    def configure_optimizers(self) -> Any:
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad]}]
        if self.critic is not None:
            groups.append(self.critic.param_group())  # one optimizer (DeepSpeed drives one), own lr per group
        if not isinstance(getattr(self._trainer, "strategy", None), DeepSpeedStrategy):  # DeepSpeed keeps its own
            self.master = MasterWeights(groups) or None  # bf16 weights: the optimizer steps float32 copies
            if self.master is not None:
                groups = self.master.groups
                if self._saved_master is not None:
                    self.master.load_state_dict(self._saved_master)
        optimizer = torch.optim.AdamW(groups, lr=1e-6) if self.make_optimizer is None else self.make_optimizer(groups)
        if self.make_lr_scheduler is None:
            return optimizer
        scheduler = self.make_lr_scheduler(optimizer)
        if getattr(scheduler, "total_steps", 0) is None:  # a schedule over the run's length (WarmupCosine)
            scheduler.total_steps = self._total_optimizer_steps()  # step 0's factor does not depend on it
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def _total_optimizer_steps(self) -> int:
        """Optimizer steps of the whole run: max_steps rollouts x ppo_epochs x ceil(rollout samples / train_batch_size)
        (the rollout being data.batch_size prompts x sampling.n samples, all ranks)."""
        max_steps = self.trainer.max_steps
        prompts = getattr(self.trainer.datamodule, "batch_size", None)
        if max_steps is None or max_steps < 1 or prompts is None:
            raise ValueError("--model.lr_scheduler.total_steps is null, and it can be derived only from "
                             "--trainer.max_steps and --data.batch_size; set max_steps or total_steps")
        size = self.algorithm.train_batch_size
        per_rollout = 1 if size is None else -(-prompts * self.sampling.n // size)
        return max_steps * self.algorithm.ppo_epochs * per_rollout

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["policy_settings"] = self.policy.settings()
        checkpoint["kl_controller"] = self.kl_controller.state_dict()
        checkpoint["grad_clip"] = self.grad_clip.state_dict()
        checkpoint["skipped_steps"] = (self.skipped_steps, self.nonfinite_in_a_row)
        if self.master is not None:
            checkpoint["master_weights"] = self.master.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.kl_controller.load_state_dict(checkpoint["kl_controller"])
        self.grad_clip.load_state_dict(checkpoint["grad_clip"])
        self.skipped_steps, self.nonfinite_in_a_row = checkpoint.get("skipped_steps", (0, 0))
        self._saved_master = checkpoint.get("master_weights")  # restored when configure_optimizers makes the copies

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        # The reference is a frozen copy of the initial weights, rebuilt from disk; keep it out of checkpoints.
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if not k.startswith("reference.")}

    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True, **kwargs: Any):  # noqa: ANN201
        missing = {k: v for k, v in super().state_dict().items() if k.startswith("reference.")}
        return super().load_state_dict({**missing, **state_dict}, strict=strict, **kwargs)

    # ---- one RL step ----------------------------------------------------------------------------------------------
    # `global_step` counts RL steps: one rollout (a global batch of prompts) and every optimizer step taken on it.
    # max_steps, val_check_interval, checkpoint intervals and curriculum stages all count in these units.
    def training_step(self, batch: PromptBatch, batch_idx: int) -> dict[str, Any]:
        start = time.perf_counter()
        self.perf = dict.fromkeys(PERF_PHASES, 0.0)
        algo = self.algorithm
        rollout = self._rollout(batch)
        self.engine.sleep()  # an engine with its own weights frees memory for training; WeightSync wakes it
        filler = self._inert(rollout.first_row)
        exp = self._score_tokens(rollout.exp, rollout.scores, filler)
        optimizer = self.optimizers()
        history: list[dict[str, Tensor]] = []
        clip: dict[str, Tensor] = {}
        samples = int(global_sum(torch.tensor(len(exp))))
        steps = [rows for epoch in range(algo.ppo_epochs) for rows in self._mini_batch_rows(len(exp), epoch)]
        if not samples:  # no rank kept a group: no update at all (Adam's moments and the KL term stay put)
            steps = []
            self._count_step_without_update(optimizer)
        train_start = time.perf_counter()
        for step, rows in enumerate(steps):
            last = step == len(steps) - 1
            mini = exp.select(rows)
            normaliser = self._loss_normaliser(mini)
            micros = self._padded_micro_batches(mini, filler)
            finite = True
            for i, (micro, real) in enumerate(micros):
                self._begin_micro_batch(last=i == len(micros) - 1)
                loss, micro_metrics = self._loss(micro, normaliser)
                finite_here = bool(torch.isfinite(loss))
                finite = finite and finite_here
                self._stop_on_nonfinite_deepspeed_loss(finite_here)
                self.manual_backward(loss if real else loss * 0.0)  # a filler keeps the ranks' collectives paired
                if real and finite_here:
                    history.append(micro_metrics)
            if self._skip_nonfinite(optimizer, finite, last):
                continue
            clip = self._clip_and_step(optimizer, last=last)
            optimizer.zero_grad(set_to_none=True)
            if self.make_lr_scheduler is not None:  # manual optimization: Lightning does not step schedulers
                self.lr_schedulers().step()
        self.perf["train"] = time.perf_counter() - train_start
        kl = self._global_token_mean(KL_ESTIMATORS[algo.kl.estimator](exp.old_logprobs, exp.ref_logprobs),
                                     exp.response_mask) if exp.ref_logprobs is not None else torch.zeros(())
        if samples:
            self.kl_controller.update(float(kl), samples)
        self._log_step(exp, rollout, history, clip, kl, time.perf_counter() - start, optimizer_steps=len(steps))
        return {"samples": self._sample_records(exp, rollout.scores)}

    def _skip_nonfinite(self, optimizer: Any, loss_finite: bool, last: bool) -> bool:
        """True (and the step's gradients dropped) when any rank's loss or the gradient is NaN/inf; the skip is
        counted, and more than `max_nonfinite_steps` in a row stop training with an error."""
        if self._deepspeed_engine is not None:  # non-finite losses already stopped; DeepSpeed holds the gradients
            return False
        trainable = [p.grad for p in self.parameters() if p.requires_grad and p.grad is not None]
        grads_finite = not trainable or bool(torch.isfinite(torch.nn.utils.get_total_norm(trainable)))
        if not any_rank(not (loss_finite and grads_finite)):
            self.nonfinite_in_a_row = 0
            return False
        optimizer.zero_grad(set_to_none=True)
        self.zero_grad(set_to_none=True)  # the model's own gradients too, when the optimizer holds master copies
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row > self.algorithm.max_nonfinite_steps:
            raise FloatingPointError(
                f"step {self.global_step}: the loss or gradient was NaN/inf in {self.nonfinite_in_a_row} optimizer "
                f"steps in a row (--model.algorithm.max_nonfinite_steps {self.algorithm.max_nonfinite_steps}); "
                f"the last checkpoint is intact. Look for NaN rewards or advantages, or lower the learning rate")
        rank_zero_warn(f"step {self.global_step}: NaN/inf loss or gradient; optimizer step skipped "
                       f"({self.nonfinite_in_a_row} in a row)")
        if last:
            self._count_step_without_update(optimizer)
        return True

    def _stop_on_nonfinite_deepspeed_loss(self, finite: bool) -> None:
        """Under DeepSpeed, gradients go into partitioned buffers at backward and cannot be dropped afterwards: a
        NaN/inf loss on any rank stops training before it is back-propagated."""
        if self._deepspeed_engine is not None and any_rank(not finite):
            raise FloatingPointError(f"step {self.global_step}: NaN/inf loss under DeepSpeed; stopped before the "
                                     f"backward so the weights and the last checkpoint stay intact")

    def _count_step_without_update(self, optimizer: Any) -> None:
        """Advance `global_step` (an RL step happened) without touching the weights or the optimizer's state.
        Lightning counts manual-optimization steps in its optimizer wrapper's step hooks; they run here without the
        step in between (a DeepSpeed engine must not step: it would apply zero gradients and weight decay)."""
        optimizer._on_before_step()
        optimizer._on_after_step()

    def _mini_batch_rows(self, n_rows: int, epoch: int) -> list[list[int]]:
        """This rank's rows of each optimizer step of one PPO epoch. `train_batch_size` counts samples over all ranks;
        every rank takes the same number of steps (agreed globally), each on its own share of the step's samples."""
        size = self.algorithm.train_batch_size
        steps = 1 if size is None else max(1, -(-int(global_sum(torch.tensor(n_rows))) // size))
        order = list(range(n_rows))
        if steps > 1 and self.algorithm.shuffle:
            random.Random(f"{self.sampling.seed}:{self.global_step}:{epoch}:{data_parallel().rank}").shuffle(order)
        return [order[k * n_rows // steps : (k + 1) * n_rows // steps] for k in range(steps)]

    def _loss_normaliser(self, mini: Experience) -> Tensor:
        """The global denominator of the loss of one optimizer step: valid tokens (token-mean) or rows, all ranks."""
        return global_sum(loss_units(mini.response_mask, self.algorithm.loss.aggregation))

    def _global_token_mean(self, x: Tensor, mask: Tensor) -> Tensor:
        total = global_sum(torch.stack([(x * mask).sum().float(), mask.sum().float()]))
        return total[0] / total[1].clamp(min=1)

    def _clip_and_step(self, optimizer: Any, last: bool = True) -> dict[str, Tensor]:
        """Dynamic gradient clipping, then the optimizer step. Under DeepSpeed ZeRO the gradients are partitioned
        inside the engine, so the engine clips by its own global norm at our threshold and the norm is recorded after
        the step (see lmmr1/modules/grad_clip.py). Only the `last` step of a rollout goes through Lightning's
        optimizer wrapper, which is what advances `global_step`: one RL step, however many optimizer steps."""
        engine = self._deepspeed_engine
        if engine is None:
            if self.master is not None:
                self.master.grads_to_master()
            clip = self.grad_clip(p for group in optimizer.param_groups for p in group["params"])
            self._optimizer_step(optimizer, last)
            if self.master is not None:
                self.master.master_to_model()
            return clip
        threshold = self.grad_clip.threshold(self.device)
        engine.optimizer.clip_grad = float(threshold)
        self._optimizer_step(optimizer, last)
        norm = torch.as_tensor(engine.get_global_grad_norm() or 0.0, dtype=torch.float32, device=self.device)
        self.grad_clip.record(norm, threshold)
        return {"grad_norm": norm, "grad_clip_threshold": threshold, "grad_clipped": (norm > threshold).float()}

    @property
    def _deepspeed_engine(self) -> Any:
        """The DeepSpeed engine when training under a DeepSpeed strategy, else None."""
        return getattr(self.trainer.strategy, "deepspeed_engine", None) if self._trainer is not None else None

    def _begin_micro_batch(self, last: bool) -> None:
        """Under DeepSpeed, do what the engine's own forward does before each micro-batch (our micro-batches run
        inside one engine forward, the training step): advance ZeRO's micro-step so gradients add up instead of
        being copied over, and mark the step's last backward as the accumulation boundary where they are reduced.
        Without it a step's micro-batches replaced each other's gradients (measured: wrong norm and update)."""
        engine = self._deepspeed_engine
        if engine is None:
            return
        clear = getattr(engine.optimizer, "clear_backward_seen_flag", None)
        if clear is not None:
            clear()
        engine.set_gradient_accumulation_boundary(last)

    def _optimizer_step(self, optimizer: Any, last: bool) -> None:
        if last or self._trainer is None:
            optimizer.step()
        else:  # the strategy's step (DeepSpeed engine, DDP, precision) without Lightning's step counter
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None, model=self)

    def _generate(self, batch: PromptBatch, seed: int) -> tuple[Experience, RewardOutput]:
        with _timed(self.perf, "generate"):
            completions = broadcast_from_group_leader(self.engine.generate(batch, self.sampling, seed=seed))
            exp = Experience.from_rollout(batch, completions, self.tokenizer.pad_token_id).to(self.device)
        with _timed(self.perf, "reward"):
            return exp, self.reward(exp.responses, exp.rows)

    def _rollout_seed(self, batch: PromptBatch) -> int:
        """From the global stream position of this rank's first prompt: ranks sample differently, resume repeats."""
        first = min((row.get("_position", 0) for row in batch.rows), default=0)
        return self.sampling.seed * 1_000_003 + int(first)

    def _rollout(self, batch: PromptBatch) -> Rollout:
        """Sample G completions per prompt and score them. With dynamic sampling (DAPO, arXiv:2503.14476), groups whose
        rewards are all equal carry no signal and are dropped; new prompts are drawn from the stream, a batch at a
        time (at most `max_extra_rounds` more), until the kept groups fill the batch, which is then cut to its size
        keeping the earliest prompts of the stream. Every rank draws as many batches (the decision is global)."""
        G = self.sampling.n
        exp, scores = self._generate(batch, self._rollout_seed(batch))
        first_row = exp.select([0])
        if not self.algorithm.dynamic_sampling.enabled:
            return Rollout(exp, scores, scores, generated_groups=len(batch), rounds=1, first_row=exp.select([0]))
        target = int(global_sum(torch.tensor(len(batch))))  # prompts per step, all ranks
        parts: list[tuple[Experience, RewardOutput, list[int]]] = []
        generated: list[RewardOutput] = []
        for extra in range(self.algorithm.dynamic_sampling.max_extra_rounds + 1):
            if extra:
                batch = self._next_prompts()
                if batch is None:  # a finite prompt stream ran out
                    break
                exp, scores = self._generate(batch, self._rollout_seed(batch))
            generated.append(scores)
            keep = filter_groups(torch.tensor(scores.total), G).tolist()
            groups = [g for g, k in enumerate(keep) if k]
            rows = [g * G + j for g in groups for j in range(G)]
            # stream order: (round, stream position), or the rank's own order for rows that carry no position
            order = [(extra, batch.rows[g].get("_position", data_parallel().rank * 2**40 + g)) for g in groups]
            parts.append((exp.select(rows), _select_scores(scores, rows), order))
            if int(global_sum(torch.tensor(sum(len(p) for _, _, p in parts)))) >= target:
                break
        positions = [p for _, _, part in parts for p in part]
        chosen = first_in_stream(positions, all_gather_objects(positions), target)
        rows = [g * G + j for g, ok in enumerate(chosen) if ok for j in range(G)]
        kept = Experience.concat([e for e, _, _ in parts]).select(rows)
        return Rollout(kept, _select_scores(_merge_scores([s for _, s, _ in parts]), rows), _merge_scores(generated),
                       generated_groups=sum(len(s.total) for s in generated) // G, rounds=len(generated),
                       first_row=first_row)

    def _next_prompts(self) -> PromptBatch | None:
        """The next batch of this rank's prompt stream, drawn inside a training step (DAPO's extra generation
        batches); None when a finite stream has run out. It comes from the fit loop's own data fetcher, so the stream
        stays one: later steps continue after it, and the datamodule's resume position (updated by the
        batch-transfer hook) counts it."""
        fetcher = self.trainer.fit_loop._data_fetcher  # Lightning has no public handle on the running train iterator
        try:
            batch, _, _ = next(fetcher)
        except StopIteration:
            return None
        return self.trainer.strategy.batch_to_device(batch, dataloader_idx=0)

    @torch.no_grad()
    def _score_tokens(self, exp: Experience, scores: RewardOutput, filler: Experience) -> Experience:
        """Old/reference log-probs, KL-in-reward, overlong penalty and advantages for the whole batch."""
        algo = self.algorithm
        if algo.recompute_old_logprobs:
            with _timed(self.perf, "old_logprob"):
                exp.old_logprobs = self._forward_all(exp, filler, lambda m: self.policy.logprobs(
                    **m.model_inputs(self.policy.share_prompts), temperature=self._temperature, entropy=False)[0])
        else:
            exp.old_logprobs = exp.rollout_logprobs
        if self.reference is not None:
            with _timed(self.perf, "ref"):
                exp.ref_logprobs = self._forward_all(exp, filler, lambda m: self.reference.logprobs(
                    **m.model_inputs(self.policy.share_prompts), temperature=self._temperature, entropy=False)[0])
        if self.critic is not None:
            exp.values = self._forward_all(exp, filler, lambda m: self.critic.values(
                **m.model_inputs(self.policy.share_prompts)))
        rewards = torch.tensor(scores.total, device=self.device, dtype=torch.float32)
        if algo.overlong.buffer > 0:
            rewards = rewards + overlong_penalty(exp.response_mask.sum(-1), max_new_tokens=self.sampling.max_new_tokens,
                                                 buffer=algo.overlong.buffer, factor=algo.overlong.factor)
        if algo.overlong.mask_truncated:
            exp.response_mask = exp.response_mask * (~exp.truncated).unsqueeze(-1).float()
        token_rewards = None
        if algo.kl.placement == "reward" and exp.ref_logprobs is not None:
            kl = KL_ESTIMATORS[algo.kl.estimator](exp.old_logprobs, exp.ref_logprobs)
            token_rewards = -self.kl_controller.coef * kl * exp.response_mask
        exp.rewards = rewards
        exp.advantages, exp.returns = ADVANTAGE_ESTIMATORS[algo.advantage](
            rewards, exp.response_mask, group_size=exp.group_size, token_rewards=token_rewards, values=exp.values,
            gamma=algo.gamma, lam=algo.lam, reduce=global_sum)
        return exp

    def _forward_all(self, exp: Experience, filler: Experience, forward: Any) -> Tensor:
        """`forward` over the micro-batches of `exp`, concatenated (fillers run for pairing, their output dropped)."""
        outputs = []
        for micro, real in self._padded_micro_batches(exp, filler):
            out = forward(micro)
            if real:
                outputs.append(out)
        return torch.cat(outputs) if outputs else exp.response_mask.new_zeros(0, exp.response_len)

    def _inert(self, row: Experience) -> Experience:
        """A zero-weight filler row: every scored field present (so the loss runs) and neutral."""
        zeros = torch.zeros_like(row.rollout_logprobs)
        return replace(row, old_logprobs=row.rollout_logprobs, advantages=zeros, returns=zeros,
                       rewards=zeros.new_zeros(len(row)),
                       ref_logprobs=row.rollout_logprobs if self.reference is not None else None,
                       values=zeros if self.critic is not None else None)

    def _micro_batches(self, exp: Experience) -> list[Experience]:
        algo = self.algorithm
        return exp.micro_batches(algo.micro_batch_size, max_tokens=algo.micro_batch_tokens, packed=self.policy.packing)

    def _padded_micro_batches(self, exp: Experience, filler: Experience) -> list[tuple[Experience, bool]]:
        """Micro-batches of `exp` as (micro, real), padded with one-row fillers to the largest count of any rank:
        each forward is a collective under ZeRO-3 and each backward under DDP, so all ranks must run as many."""
        micros = [(m, True) for m in self._micro_batches(exp)] if len(exp) else []
        if data_parallel().active:
            micros += [(filler, False)] * (global_max(len(micros)) - len(micros))
        return micros

    @property
    def _temperature(self) -> float:
        return self.sampling.temperature if self.sampling.temperature > 0 else 1.0

    def _loss(self, micro: Experience, normaliser: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Policy loss (+ KL, - entropy) of one micro-batch, scaled by its share of the optimizer step's global batch
        (`normaliser`: its valid tokens for token-mean, else its rows, over all ranks), so that the accumulated and
        rank-averaged gradients equal the gradient of the whole global batch."""
        algo = self.algorithm
        inputs = micro.model_inputs(self.policy.share_prompts)  # the policy's and the critic's forward
        logprobs, entropy = self.policy.logprobs(**inputs, temperature=self._temperature,
                                                 entropy=bool(algo.entropy_coef))
        if entropy is None:  # only logged: the sampled tokens' surprisal, an unbiased estimate (E_p[-log p] = H)
            entropy = -micro.rollout_logprobs
        mask = micro.response_mask
        advantages = micro.advantages
        if algo.tis_cap is not None:  # TIS: correct for the engine/trainer log-prob mismatch, token by token
            advantages = advantages * truncated_importance_weights(micro.old_logprobs, micro.rollout_logprobs, mask,
                                                                   cap=algo.tis_cap)
        loss, metrics = POLICY_LOSSES[algo.loss.name](logprobs, micro.old_logprobs, advantages, mask,
                                                      **algo.loss.kwargs())
        agg = dict(aggregation=algo.loss.aggregation, max_len=algo.loss.max_len)
        metrics = {**metrics, "policy_loss": loss.detach()}  # the policy term alone; every other term has its name
        if algo.kl.placement == "loss" and micro.ref_logprobs is not None:
            kl = KL_ESTIMATORS[algo.kl.estimator](logprobs, micro.ref_logprobs)
            kl_loss = self.kl_controller.coef * aggregate(kl, mask, algo.loss.aggregation, max_len=algo.loss.max_len)
            loss = loss + kl_loss
            metrics["kl_loss"] = kl_loss.detach()
        if self.critic is not None:  # separate parameters and lr group, so no value-loss coefficient is needed
            values = self.critic.values(**inputs)
            value_loss_, value_metrics = value_loss(values, micro.values, micro.returns, mask, clip=algo.value_clip,
                                                    **agg)
            loss = loss + value_loss_
            metrics = {**metrics, **value_metrics, "value_loss": value_loss_.detach()}
        if algo.entropy_coef:
            entropy_loss = entropy_bonus(entropy, mask, coef=algo.entropy_coef, **agg)
            loss = loss + entropy_loss
            metrics["entropy_loss"] = entropy_loss.detach()
        metrics = {**metrics, "loss": loss.detach(), "entropy": aggregate(entropy.detach(), mask, "token-mean")}
        # DDP and DeepSpeed average gradients over the ranks, hence the world size
        share = micro_batch_share(mask, normaliser, algo.loss.aggregation) * data_parallel().size
        return loss * share, metrics

    def _log_step(self, exp: Experience, rollout: Rollout, history: list[dict[str, Tensor]], clip: dict[str, Tensor],
                  kl: Tensor, seconds: float, optimizer_steps: int) -> None:
        """Log the step's metrics over the global batch: every rank contributes its sums and counts. Rewards are over
        every sample generated (with dynamic sampling, dropped groups too: the curve is not biased towards the kept
        ones); the other rollout and train metrics are over the samples trained on."""
        mask = exp.response_mask  # the tokens that get gradient (without truncated rows under mask_truncated)
        tokens, rows = float(mask.sum()), float(len(exp))
        generated = float(exp.attention_mask[:, -exp.response_len:].sum())  # every sampled token
        scores = rollout.generated
        means = {
            "train/reward/total": (sum(scores.total), float(len(scores.total))),
            "train/advantage_abs_mean": (float((exp.advantages.abs() * mask).sum()), tokens),
            "rollout/response_len_mean": (generated, rows),
            "rollout/truncated_frac": (float(exp.truncated.float().sum()), rows),
            "rollout/logprob_gap": (float(((exp.rollout_logprobs - exp.old_logprobs).abs() * mask).sum()), tokens),
            **{f"train/{k}": (float(v), 1.0) for k, v in clip.items()},
        }
        for name, values in scores.components.items():
            kept = [v for v in values if v == v]
            means[f"train/reward/{name}"] = (sum(kept), float(len(kept)))
        for name in history[0] if history else []:
            means[f"train/{name}"] = (float(sum(m[name] for m in history)), float(len(history)))
        sums = {"train/samples": rows, **{f"train/reward_stats/{k}": float(v) for k, v in scores.stats.items()}}
        if isinstance(self.engine, MultiTurnEngine):  # every rank logs the same keys, episodes or not
            means.update(episode_means(exp.rows))  # response_len_mean: the model's tokens, not the environment's
        if self.skipped_steps:
            means["train/skipped_steps"] = (float(self.skipped_steps), 1.0)  # the same count on every rank
        if self.algorithm.dynamic_sampling.enabled:
            kept_groups = rows / self.sampling.n
            sums.update({"rollout/generated_groups": float(rollout.generated_groups),
                         "rollout/kept_groups": kept_groups,
                         "rollout/dropped_groups": rollout.generated_groups - kept_groups})
        logs = global_stats(means, sums, {"train/step_time": seconds, "rollout/generation_rounds": rollout.rounds})
        logs.update({"train/kl": float(kl), "train/kl_coef": float(self.kl_controller.coef),
                     "train/optimizer_steps": float(optimizer_steps),
                     **{f"perf/{phase}_s": seconds for phase, seconds in self.perf.items()}})
        self.log_dict(logs, batch_size=len(exp))
        self.log("reward", logs["train/reward/total"], prog_bar=True, logger=False, batch_size=len(exp))
        if "train/reward/accuracy" in logs:
            self.log("acc", logs["train/reward/accuracy"], prog_bar=True, logger=False, batch_size=len(exp))
        self.log("kl", logs["train/kl"], prog_bar=True, logger=False, batch_size=len(exp))
        self.log("s/step", logs["train/step_time"], prog_bar=True, logger=False, batch_size=len(exp))

    def _sample_records(self, exp: Experience, scores: RewardOutput) -> list[dict[str, Any]]:
        """Per-sample rows for the sample table callback (plain Python values)."""
        first = exp.response_mask.argmax(-1)
        advantages = exp.advantages.gather(1, first.unsqueeze(1)).squeeze(1).tolist()
        return [{"datasource": row.get("datasource"), "answer": row.get("answer"), "where": row.get("_where"),
                 "response": response, "reward": scores.total[i], "advantage": advantages[i],
                 "rewards": {k: v[i] for k, v in scores.components.items() if v[i] == v[i]}}
                for i, (row, response) in enumerate(zip(exp.rows, exp.responses))]

    # ---- validation: the same engine and reward, greedy accuracy + pass@k ----------------------------------------
    def validation_step(self, batch: PromptBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        prefix = eval_prefix(self, dataloader_idx)
        greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=self.sampling.max_new_tokens,
                                stop=self.sampling.stop)
        real = [i for i, row in enumerate(batch.rows) if not row.get("_pad")]  # rows that pad a rank's share
        completions = [g[0] for g in self.engine.generate(batch, greedy, seed=0)]
        completions = [completions[i] for i in real]
        rows = [completions[j].row_for(batch.rows[i]) for j, i in enumerate(real)]  # + a multi-turn episode
        if not rows:
            return
        scores = self.reward([c.text for c in completions], rows)
        metrics = greedy_metrics(scores, [len(c.token_ids) for c in completions], rows)
        if self.evaluation.n > 1:
            sampled = replace(greedy, n=self.evaluation.n, temperature=self.evaluation.temperature)
            groups = self.engine.generate(batch, sampled, seed=batch_idx)
            groups = [groups[i] for i in real]
            flat_rows = [c.row_for(batch.rows[i]) for i, g in zip(real, groups) for c in g]
            sample_scores = self.reward([c.text for g in groups for c in g], flat_rows)
            metrics.update(pass_metrics(sample_scores, self.evaluation.n, self.evaluation.k))
        for name, (value, count) in metrics.items():
            log_mean(self, f"{prefix}/{name}", value, count)

    def on_validation_epoch_end(self) -> None:
        log_eval_means(self)

    def on_test_epoch_end(self) -> None:
        log_eval_means(self)

    def test_step(self, batch: PromptBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """`lmmr1 test` evaluates like validation (held-out sets, same engine and reward)."""
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_fit_end(self) -> None:
        self.reward.close()

