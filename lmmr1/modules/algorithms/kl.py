"""KL divergence to the reference policy: per-token estimators (k1, k2, k3) and the coefficient controllers.

Estimators follow Schulman, "Approximating KL Divergence" (2020, http://joschu.net/blog/kl-approx.html). With samples
from the policy and log_ratio = ref_logprobs - logprobs (= log r, r = p_ref / p_policy):

| name | formula              | properties                                                          |
|------|----------------------|---------------------------------------------------------------------|
| k1   | -log r               | unbiased for KL(policy || ref), high variance, can be negative      |
| k2   | (log r)^2 / 2        | biased, low variance, >= 0; its gradient is the true KL gradient    |
| k3   | (r - 1) - log r      | unbiased, low variance, >= 0 (GRPO's choice, arXiv:2402.03300 eq. 4) |

k3 is clamped: the log-ratio to [-20, 20] before `exp` (no overflow) and the result to [0, 10] (one token whose
probability collapsed cannot dominate the loss), as verl's `low_var_kl`.

The coefficient is fixed, or adapted towards a target KL as in Ziegler et al. (arXiv:1909.08593, sec. 2.2) and the
PPO paper's adaptive KL penalty (arXiv:1707.06347, sec. 4).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from lmmr1.modules.algorithms.registry import KL_ESTIMATORS

K3_LOG_RATIO_CLAMP = 20.0
K3_MAX = 10.0


@KL_ESTIMATORS.register("k1")
def k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """-log r = logprobs - ref_logprobs, per token (N, T)."""
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("k2")
def k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """(log r)^2 / 2, per token (N, T)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


@KL_ESTIMATORS.register("k3")
def k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """(r - 1) - log r with r = exp(ref - logp), clamped to [0, 10], per token (N, T). `expm1` keeps it exact near
    r = 1, where exp(x) - x - 1 would cancel to a tiny negative number in float32."""
    log_ratio = (ref_logprobs - logprobs).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return (torch.expm1(log_ratio) - log_ratio).clamp(0.0, K3_MAX)


class FixedKLController:
    """A constant KL coefficient (the usual setting for GRPO-style training)."""

    def __init__(self, coef: float) -> None:
        self.coef = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op; present so the trainer treats both controllers alike."""

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coef = float(state["coef"])


class AdaptiveKLController:
    """Proportional controller steering the measured KL towards `target` (Ziegler et al., arXiv:1909.08593):

        e = clip(KL / target - 1, -0.2, 0.2);   coef <- coef * (1 + e * n_steps / horizon)

    The clip bounds how fast the coefficient moves (at most x(1 +- 0.2 * n_steps / horizon) per update); `n_steps` is
    the number of samples the KL was measured on, so the speed does not depend on how the batch is split.
    """

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got target={target}, horizon={horizon}")
        self.coef, self.target, self.horizon = float(init_coef), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coef = float(state["coef"])  # target/horizon come from the (possibly edited) config, not the checkpoint


class _KLSettings(Protocol):
    coef: float
    target: float | None
    horizon: int


def build_kl_controller(kl_config: _KLSettings) -> FixedKLController | AdaptiveKLController:
    """Fixed controller when `kl_config.target` is None, adaptive otherwise (see `KLConfig`)."""
    if kl_config.target is None:
        return FixedKLController(kl_config.coef)
    return AdaptiveKLController(kl_config.coef, kl_config.target, kl_config.horizon)
