"""`AlgorithmConfig`: every choice of the RL update (estimator, KL, loss, clipping, DAPO tricks) as one YAML group.

LightningCLI exposes it as `model.algorithm`, so each field is a flag such as `--model.algorithm.kl.coef 0.01`; the
string under each field is its `--help` text. Values are checked when the config is built (`__post_init__`), and
combinations that cannot work together (e.g. `gae` without a critic) by `check(...)`, which the module calls before
the first rollout; both raise `ValueError` naming the flag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import ClassVar, Literal

from lmmr1.modules.algorithms import (
    ADVANTAGE_ESTIMATORS,
    GROUP_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
)
from lmmr1.modules.grad_clip import MODES as GRAD_CLIP_MODES
from lmmr1.modules.grad_clip import DynamicGradClip

AdvantageName = Literal["gae", "reinforce_pp", "reinforce_baseline", "rloo", "grpo", "dr_grpo"]
KLEstimatorName = Literal["k1", "k2", "k3"]
PolicyLossName = Literal["ppo", "gspo"]
AggregationName = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
GradClipMode = Literal["none", "fixed", "adaptive", "zscore"]
# Literal types (not plain str) so that jsonargparse rejects a typo at parse time, naming the key and listing the
# choices in --help; tests/test_algorithm_config.py keeps them equal to the registries' keys.
NAME_TYPES = {AdvantageName: ADVANTAGE_ESTIMATORS, KLEstimatorName: KL_ESTIMATORS, PolicyLossName: POLICY_LOSSES,
              AggregationName: LOSS_AGGREGATIONS, GradClipMode: GRAD_CLIP_MODES}

FLAG = "--model.algorithm"
"""Where LightningCLI mounts `AlgorithmConfig`; error messages name flags under it."""


def _choice(flag: str, value: str, choices: object) -> None:
    if value not in choices:
        raise ValueError(f"{flag}: unknown {value!r}; choose from {sorted(choices)}")


def _require(ok: bool, flag: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{flag}: {message}")


def _require_finite(config: object, flag: str) -> None:
    """Every float field of `config` is a finite number (inf or NaN would turn losses or rewards into NaN)."""
    for f in fields(config):
        value = getattr(config, f.name)
        _require(not isinstance(value, float) or math.isfinite(value), f"{flag}.{f.name}",
                 f"must be a finite number, got {value}")


@dataclass
class KLConfig:
    """KL regularisation towards the frozen reference policy."""

    _flag: ClassVar[str] = f"{FLAG}.kl"
    estimator: KLEstimatorName = "k3"
    """Per-token KL estimator: k1 | k2 | k3 (Schulman 2020; k3 is unbiased, low-variance and >= 0)."""
    coef: float = 1e-3
    """KL coefficient (initial value when adaptive); 0 turns KL off and skips the reference model entirely."""
    placement: Literal["loss", "reward"] = "loss"
    """'loss': add coef * KL to the policy loss (GRPO); 'reward': subtract it from per-token rewards before the
    advantage estimate (PPO / REINFORCE++)."""
    target: float | None = None
    """Target KL for the adaptive coefficient (Ziegler et al., arXiv:1909.08593); None keeps `coef` fixed."""
    horizon: int = 10000
    """Adaptive coefficient: samples over which the KL error is corrected (larger = slower changes)."""

    def __post_init__(self) -> None:
        _require_finite(self, self._flag)
        _choice(f"{self._flag}.estimator", self.estimator, KL_ESTIMATORS)
        _choice(f"{self._flag}.placement", self.placement, ("loss", "reward"))
        _require(self.coef >= 0, f"{self._flag}.coef", f"must be >= 0, got {self.coef}")
        _require(self.target is None or self.target > 0, f"{self._flag}.target", f"must be > 0, got {self.target}")
        _require(self.target is None or self.coef > 0, f"{self._flag}.coef",
                 "must be > 0 with an adaptive target (the controller scales it multiplicatively)")
        _require(self.horizon > 0, f"{self._flag}.horizon", f"must be > 0, got {self.horizon}")


@dataclass
class LossConfig:
    """The policy loss and how its per-token terms are reduced."""

    _flag: ClassVar[str] = f"{FLAG}.loss"
    name: PolicyLossName = "ppo"
    """Policy loss: ppo (token ratio, arXiv:1707.06347) | gspo (sequence ratio, arXiv:2507.18071)."""
    clip_low: float = 0.2
    """Lower clip range: the ratio is clipped at 1 - clip_low."""
    clip_high: float = 0.28
    """Upper clip range, 1 + clip_high; above clip_low is DAPO's clip-higher (arXiv:2503.14476)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 bounding the loss of negative-advantage tokens (arXiv:1912.09729); None = off."""
    aggregation: AggregationName = "token-mean"
    """token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm (Dr. GRPO, needs max_len)."""
    max_len: int | None = None
    """Constant length divisor of seq-mean-token-sum-norm, usually sampling.max_new_tokens."""

    def __post_init__(self) -> None:
        _require_finite(self, self._flag)
        _choice(f"{self._flag}.name", self.name, POLICY_LOSSES)
        _choice(f"{self._flag}.aggregation", self.aggregation, LOSS_AGGREGATIONS)
        _require(0 <= self.clip_low < 1, f"{self._flag}.clip_low", f"must be in [0, 1), got {self.clip_low}")
        _require(self.clip_high >= 0, f"{self._flag}.clip_high", f"must be >= 0, got {self.clip_high}")
        _require(self.dual_clip is None or self.dual_clip > 1, f"{self._flag}.dual_clip",
                 f"must be > 1 (e.g. 3.0) or null, got {self.dual_clip}")
        _require(self.max_len is None or self.max_len > 0, f"{self._flag}.max_len", f"must be > 0, got {self.max_len}")
        _require(self.aggregation != "seq-mean-token-sum-norm" or self.max_len is not None, f"{self._flag}.max_len",
                 "is required by aggregation 'seq-mean-token-sum-norm' (set it to sampling.max_new_tokens)")

    def kwargs(self) -> dict[str, object]:
        """The keyword arguments for POLICY_LOSSES[name]."""
        return {"clip_low": self.clip_low, "clip_high": self.clip_high, "dual_clip": self.dual_clip,
                "aggregation": self.aggregation, "max_len": self.max_len}


@dataclass
class GradClipConfig:
    """Gradient clipping (see lmmr1/modules/grad_clip.py)."""

    _flag: ClassVar[str] = f"{FLAG}.grad_clip"
    mode: GradClipMode = "adaptive"
    """none | fixed (max_norm) | adaptive (percentile of recent norms, AutoClip) | zscore (EMA mean + z std, ZClip)."""
    max_norm: float = 1.0
    """Threshold of 'fixed', and of the adaptive modes during warm-up."""
    percentile: float = 90.0
    """'adaptive': the percentile of the recent norms used as threshold."""
    history: int = 100
    """'adaptive': number of recent norms kept."""
    warmup: int = 10
    """Adaptive modes: steps clipped at max_norm before the history takes over."""
    factor: float = 1.0
    """'adaptive': multiplier on the percentile; 1 = AutoClip, ~1.5 = clip only spikes, not ordinary steps."""
    zscore: float = 2.5
    """'zscore': standard deviations above the EMA mean where clipping starts."""
    ema_decay: float = 0.97
    """'zscore': decay of the EMA of the norm's mean and variance."""

    def __post_init__(self) -> None:
        _require_finite(self, self._flag)
        _choice(f"{self._flag}.mode", self.mode, GRAD_CLIP_MODES)
        _require(self.max_norm > 0, f"{self._flag}.max_norm", f"must be > 0, got {self.max_norm}")
        _require(0 < self.percentile <= 100, f"{self._flag}.percentile", f"must be in (0, 100], got {self.percentile}")
        _require(self.history >= 1, f"{self._flag}.history", f"must be >= 1, got {self.history}")
        _require(self.warmup >= 0, f"{self._flag}.warmup", f"must be >= 0, got {self.warmup}")
        _require(self.factor > 0, f"{self._flag}.factor", f"must be > 0, got {self.factor}")
        _require(self.zscore > 0, f"{self._flag}.zscore", f"must be > 0, got {self.zscore}")
        _require(0 < self.ema_decay < 1, f"{self._flag}.ema_decay", f"must be in (0, 1), got {self.ema_decay}")

    def build(self) -> DynamicGradClip:
        """A fresh clipper with these settings."""
        return DynamicGradClip(mode=self.mode, max_norm=self.max_norm, percentile=self.percentile,
                               history=self.history, warmup=self.warmup, factor=self.factor, zscore=self.zscore,
                               ema_decay=self.ema_decay)


@dataclass
class DynamicSamplingConfig:
    """DAPO dynamic sampling (arXiv:2503.14476): re-sample prompts whose group rewards are all equal."""

    _flag: ClassVar[str] = f"{FLAG}.dynamic_sampling"
    enabled: bool = False
    """Drop groups with identical rewards (no signal) and re-sample their prompts."""
    max_extra_rounds: int = 2
    """Extra generation rounds per step before the remaining zero-signal prompts are dropped."""

    def __post_init__(self) -> None:
        _require(self.max_extra_rounds >= 0, f"{self._flag}.max_extra_rounds",
                 f"must be >= 0, got {self.max_extra_rounds}")


@dataclass
class OverlongConfig:
    """DAPO overlong handling (arXiv:2503.14476): soft length penalty and/or masking truncated responses."""

    _flag: ClassVar[str] = f"{FLAG}.overlong"
    buffer: int = 0
    """Length of the soft penalty ramp before max_new_tokens, in tokens; 0 turns the penalty off."""
    factor: float = 1.0
    """Penalty at max_new_tokens (the ramp goes from 0 to -factor)."""
    mask_truncated: bool = False
    """Drop responses cut off at max_new_tokens from the loss (overlong filtering)."""

    def __post_init__(self) -> None:
        _require_finite(self, self._flag)
        _require(self.buffer >= 0, f"{self._flag}.buffer", f"must be >= 0, got {self.buffer}")
        _require(self.factor >= 0, f"{self._flag}.factor", f"must be >= 0, got {self.factor}")


@dataclass
class AlgorithmConfig:
    """The RL update: advantage estimator, KL, policy loss, optimisation schedule and stabilisers."""

    advantage: AdvantageName = "grpo"
    """gae | reinforce_pp | reinforce_baseline | rloo | grpo | dr_grpo (see README's table)."""
    gamma: float = 1.0
    """Discount over response tokens (gae, and the token-level returns of the other estimators)."""
    lam: float = 1.0
    """GAE lambda (gae only)."""
    kl: KLConfig = field(default_factory=KLConfig)
    """KL to the reference policy."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Policy loss, clipping and aggregation."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (0 = off)."""
    value_clip: float | None = 0.2
    """Critic value clipping range for gae; null disables it."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    train_batch_size: int | None = None
    """Samples per optimizer step, over all ranks (OpenRLHF's train_batch_size); a rollout of data.batch_size x
    sampling.n samples then takes that many / train_batch_size optimizer steps per epoch. null = one step per epoch."""
    shuffle: bool = True
    """Shuffle the rollout's samples before cutting them into optimizer steps (each rank its own share)."""
    micro_batch_size: int = 4
    """Samples per forward/backward on one rank; gradients are accumulated up to each optimizer step."""
    micro_batch_tokens: int | None = None
    """Form micro-batches by a token budget instead (real tokens with `policy.packing`, rows x padded length
    without); null = `micro_batch_size` rows each. With `policy.sequence_parallel_size` k it counts the group's whole
    packed row, of which each rank holds 1/k."""
    tis_cap: float | None = None
    """Truncated importance sampling: weight each token by min(pi_train / pi_rollout, tis_cap) to correct for the
    rollout engine's numerical mismatch (verl's TIS); null = off."""
    recompute_old_logprobs: bool = True
    """Recompute the old log-probs with a policy forward; False uses the engine's log-probs instead (exact when the
    engine samples from the live policy, e.g. HFEngine, and ppo_epochs is 1; saves one forward pass per step)."""
    grad_clip: GradClipConfig = field(default_factory=GradClipConfig)
    """Gradient clipping."""
    max_nonfinite_steps: int = 3
    """Optimizer steps with a NaN/inf loss or gradient are skipped (no update, counted in train/skipped_steps); this
    many in a row stop training with an error (0: stop at the first). Under DeepSpeed a non-finite loss stops at
    once: its partitioned gradients cannot be dropped."""
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    """DAPO dynamic sampling."""
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    """DAPO overlong handling."""

    def __post_init__(self) -> None:
        # YAML/CLI layers may hand nested groups over as dicts; accept them so AlgorithmConfig(kl={"coef": 0}) works.
        for name, cls in (("kl", KLConfig), ("loss", LossConfig), ("grad_clip", GradClipConfig),
                          ("dynamic_sampling", DynamicSamplingConfig), ("overlong", OverlongConfig)):
            if isinstance(getattr(self, name), dict):
                unknown = sorted(set(getattr(self, name)) - {f.name for f in fields(cls)})
                _require(not unknown, f"{FLAG}.{name}", f"unknown key(s) {unknown}; choose from "
                         f"{[f.name for f in fields(cls)]}")
                setattr(self, name, cls(**getattr(self, name)))
        _require_finite(self, FLAG)
        _choice(f"{FLAG}.advantage", self.advantage, ADVANTAGE_ESTIMATORS)
        _require(0 <= self.gamma <= 1, f"{FLAG}.gamma", f"must be in [0, 1], got {self.gamma}")
        _require(0 <= self.lam <= 1, f"{FLAG}.lam", f"must be in [0, 1], got {self.lam}")
        _require(self.entropy_coef >= 0, f"{FLAG}.entropy_coef", f"must be >= 0, got {self.entropy_coef}")
        _require(self.value_clip is None or self.value_clip > 0, f"{FLAG}.value_clip",
                 f"must be > 0 or null, got {self.value_clip}")
        _require(self.tis_cap is None or self.tis_cap >= 1, f"{FLAG}.tis_cap",
                 f"must be >= 1 (e.g. 2.0) or null, got {self.tis_cap}")
        _require(self.ppo_epochs >= 1, f"{FLAG}.ppo_epochs", f"must be >= 1, got {self.ppo_epochs}")
        _require(self.train_batch_size is None or self.train_batch_size >= 1, f"{FLAG}.train_batch_size",
                 f"must be >= 1 or null, got {self.train_batch_size}")
        _require(self.max_nonfinite_steps >= 0, f"{FLAG}.max_nonfinite_steps",
                 f"must be >= 0, got {self.max_nonfinite_steps}")
        _require(self.micro_batch_size >= 1, f"{FLAG}.micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        _require(self.micro_batch_tokens is None or self.micro_batch_tokens >= 1, f"{FLAG}.micro_batch_tokens",
                 f"must be >= 1 or null, got {self.micro_batch_tokens}")
        # Dr. GRPO's point is that both normalisations are removed: std in the advantage AND per-sequence length in
        # the loss (arXiv:2503.20783 sec. 3.1); any other aggregation brings a length bias back.
        _require(self.advantage != "dr_grpo" or self.loss.aggregation == "seq-mean-token-sum-norm",
                 f"{FLAG}.loss.aggregation", f"advantage 'dr_grpo' needs 'seq-mean-token-sum-norm' (constant-length "
                 f"normalisation, with loss.max_len), got {self.loss.aggregation!r}")
        # Combinations that would run but silently not do what their names promise:
        _require(self.tis_cap is None or self.recompute_old_logprobs, f"{FLAG}.tis_cap",
                 "has no effect with recompute_old_logprobs: false (the old log-probs then are the engine's, so every "
                 "importance weight is 1); recompute them or drop tis_cap")
        _require(self.advantage != "reinforce_pp" or self.kl.coef == 0 or self.kl.placement == "reward",
                 f"{FLAG}.kl.placement", "advantage 'reinforce_pp' is defined with the KL penalty in the per-token "
                 "reward (arXiv:2501.03262); set kl.placement: reward (or kl.coef: 0)")
        _require(self.loss.name != "gspo" or self.loss.aggregation == "seq-mean-token-mean",
                 f"{FLAG}.loss.aggregation", f"loss 'gspo' optimises one ratio per sequence and equals its objective "
                 f"only with 'seq-mean-token-mean' (token-mean weights sequences by length), got "
                 f"{self.loss.aggregation!r}")

    @property
    def uses_critic(self) -> bool:
        """True when the estimator needs per-token values from a critic (gae)."""
        return self.advantage == "gae"

    @property
    def needs_reference(self) -> bool:
        """True when a reference policy forward is needed (a non-zero KL coefficient)."""
        return self.kl.coef > 0

    def check(self, *, has_critic: bool, group_size: int, max_new_tokens: int | None = None) -> None:
        """Reject combinations with the rest of the module's settings, before any rollout. (A KL reference always
        exists when kl.coef > 0: the module builds it from the policy's folder.)

        Args:
            has_critic: whether the module holds a critic (value model).
            group_size: samples per prompt, G (sampling.n).
            max_new_tokens: the generation budget, to check overlong.buffer against (optional).
        """
        _require(not self.uses_critic or has_critic, f"{FLAG}.advantage",
                 "'gae' needs a critic (per-token values) and this model has none; use grpo, rloo, "
                 "reinforce_baseline, reinforce_pp or dr_grpo")
        _require(self.advantage not in GROUP_ESTIMATORS or group_size >= 2, f"{FLAG}.advantage",
                 f"{self.advantage!r} compares samples of the same prompt and needs sampling.n >= 2, got {group_size}")
        _require(not self.dynamic_sampling.enabled or group_size >= 2, f"{FLAG}.dynamic_sampling.enabled",
                 f"dynamic sampling drops groups with equal rewards and needs sampling.n >= 2, got {group_size}")
        _require(max_new_tokens is None or self.overlong.buffer <= max_new_tokens, f"{FLAG}.overlong.buffer",
                 f"{self.overlong.buffer} is longer than sampling.max_new_tokens={max_new_tokens}")
