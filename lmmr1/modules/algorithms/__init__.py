"""The RL algorithm core of lmmr1: pure functions over tensors and masks, chosen by name from `AlgorithmConfig`.

    ADVANTAGE_ESTIMATORS  gae, reinforce_pp, reinforce_baseline, rloo, grpo, dr_grpo        (advantages.py)
    KL_ESTIMATORS         k1, k2, k3 + Fixed/Adaptive KL coefficient controllers             (kl.py)
    POLICY_LOSSES         ppo (clip-higher, dual-clip), gspo; value_loss; entropy_bonus      (policy_losses.py)
    LOSS_AGGREGATIONS     token-mean, seq-mean-token-mean, seq-mean-token-sum, -sum-norm      (aggregation.py)
    filter_groups, first_in_stream  DAPO dynamic sampling                                         (dynamic_sampling.py)
    overlong_penalty      DAPO soft overlong punishment                                       (overlong.py)
    truncated_importance_weights  TIS for the rollout/training log-prob mismatch             (importance.py)

Nothing here logs, touches devices or global state, or calls `.item()`: the LightningModule orchestrates, these
functions compute, and each one is tested against a slow reference loop (tests/test_algorithms*.py).
"""

from lmmr1.modules.algorithms.advantages import GROUP_ESTIMATORS, discounted_returns
from lmmr1.modules.algorithms.aggregation import (
    aggregate,
    loss_units,
    masked_mean,
    masked_whiten,
    micro_batch_share,
)
from lmmr1.modules.algorithms.dynamic_sampling import filter_groups, first_in_stream
from lmmr1.modules.algorithms.importance import truncated_importance_weights
from lmmr1.modules.algorithms.kl import AdaptiveKLController, FixedKLController, build_kl_controller
from lmmr1.modules.algorithms.overlong import overlong_penalty
from lmmr1.modules.algorithms.policy_losses import entropy_bonus, value_loss
from lmmr1.modules.algorithms.registry import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    Registry,
)

__all__ = [
    "truncated_importance_weights",
    "ADVANTAGE_ESTIMATORS",
    "GROUP_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "POLICY_LOSSES",
    "AdaptiveKLController",
    "FixedKLController",
    "Registry",
    "aggregate",
    "build_kl_controller",
    "discounted_returns",
    "entropy_bonus",
    "filter_groups",
    "first_in_stream",
    "masked_mean",
    "masked_whiten",
    "loss_units",
    "micro_batch_share",
    "overlong_penalty",
    "value_loss",
]
