"""Rule-based rewards: one reward per file behind the `Reward` protocol, plus routing, plug-ins and a server.

Pick one with `build_reward(spec)` (a name such as "math", a plug-in "file.py:fn", a YAML file or a mapping with
routes), or from YAML with `class_path: lmmr1.rewards.MathReward`. Run `lmmr1 score --help` to score a file offline.
"""

from lmmr1.rewards.accuracy import AccuracyReward, extract_prediction
from lmmr1.rewards.base import Reward, RewardOutput
from lmmr1.rewards.build import BUILTINS, build_reward
from lmmr1.rewards.composite import MathReward, RoutedReward, WeightedSum
from lmmr1.rewards.format import FormatReward
from lmmr1.rewards.lmm_r1_math import LmmR1MathReward
from lmmr1.rewards.lmm_r1_sokoban import LmmR1SokobanReward
from lmmr1.rewards.plugin import PluginReward
from lmmr1.rewards.remote import RemoteReward, RequestRefused, RewardServerError
from lmmr1.rewards.sokoban import SokobanReward
from lmmr1.rewards.verify_pool import VerifyPool

__all__ = [
    "BUILTINS",
    "AccuracyReward",
    "FormatReward",
    "LmmR1MathReward",
    "LmmR1SokobanReward",
    "MathReward",
    "PluginReward",
    "RemoteReward",
    "RequestRefused",
    "Reward",
    "RewardOutput",
    "RewardServerError",
    "RoutedReward",
    "SokobanReward",
    "VerifyPool",
    "WeightedSum",
    "build_reward",
    "extract_prediction",
]
